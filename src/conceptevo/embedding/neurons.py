"""Base neuron embedding: skip-gram with negative sampling over co-activation pairs.

METHOD §4 (the paper's Eqs 11-13 and Algorithm 1). The objective, maximised by
gradient ascent, is::

    J1 = sum over (n, m) in D of
           log s(v_n . v_m)
         + sum_{r in R_n} log(1 - s(v_n . v_r))
         + sum_{r in R_m} log(1 - s(v_m . v_r))

with ``s`` the sigmoid and ``R_n``, ``R_m`` two separate sets of ``negatives``
neurons drawn uniformly at random (with replacement, from all neurons) for every
pair. Each epoch redraws D (a fresh shuffle of every ``N_x``), visits its pairs in
a fresh random order, and applies Algorithm 1's update to each pair in turn::

    v_n += lr * [(1 - s(v_n.v_m)) v_m - sum_{r in R_n} s(v_n.v_r) v_r]     (Eq 12)
    v_m += lr * [(1 - s(v_n.v_m)) v_n - sum_{r in R_m} s(v_m.v_r) v_r]     (Eq 13)

Both gradients are taken at the vectors as they were before the pair's update.
As in Algorithm 1 only ``v_n`` and ``v_m`` move; negative neurons' vectors are
read, not updated. A neuron that is never in a pair therefore keeps its initial
vector.

The learning rate is the paper's 0.05, by default decayed linearly over the run
(epoch e of E uses ``lr * max(1 - e/E, 1e-4)``, as word2vec does); the paper's
constant rate (``lr_schedule="constant"``) leaves the vectors jittering with
the last pairs' updates, so nearest neighbours keep changing and fewer of them
share a concept (docs/fidelity.md measures both).

The per-pair loop runs in a numba kernel over flat ``heads``/``tails``/negative
arrays (single-threaded, so results are deterministic given the seed, with all
random draws made by numpy outside the kernel). :func:`embed_neurons_reference`
runs the same updates in plain Python/numpy, one pair at a time, with the same
draws; it exists as the baseline for tests and the benchmark.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from numba import njit
from tqdm.auto import tqdm

from ..config import LR_SCHEDULES, EmbeddingConfig
from ..errors import ConceptEvoError, check_memory, check_positive
from ..containers import NeuronEmbedding
from ._util import check_int, check_nonnegative, make_rng, stimuli_arrays
from .pairs import _ImageGroups, check_indices, stimulus_memberships

log = logging.getLogger(__name__)

#: Default number of epochs, from :class:`conceptevo.config.EmbeddingConfig` (the one place
#: every default of the embedding lives); chosen with ``bench/bench_fidelity.py``.
DEFAULT_EPOCHS = EmbeddingConfig.epochs

#: Neurons whose nearest neighbours the early-stopping rule follows (a fixed sample).
STOP_SAMPLE = 2000
#: Nearest neighbours per neuron the early-stopping rule compares.
STOP_NEIGHBORS = 10


# --------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------
# Reassociation lets LLVM vectorise the 30-long dot products and updates. NaN/inf
# semantics are kept (no "nnan"/"ninf"), so a diverging run is still detected.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _term(x):
    """``(log s(x), 1 - s(x))`` from one exp: the J1 term of a score x and its gradient weight.

    For a positive pair x = v_n.v_m; for a negative pair x = -v_n.v_r, whose
    term is log(1 - s(v_n.v_r)) = log s(x) and whose weight 1 - s(x) = s(v_n.v_r).
    Computed in float64; ``log(1 + e)`` with e = exp(-|x|) in (0, 1] is accurate
    to ~1e-16 absolute.
    """
    x = float(x)
    e = math.exp(-abs(x))
    log_s = min(x, 0.0) - math.log(1.0 + e)
    if x >= 0.0:
        return log_s, e / (1.0 + e)
    return log_s, 1.0 / (1.0 + e)


@njit(cache=True, fastmath=_FASTMATH)
def _sgd_epoch(vectors, heads, tails, neg_n, neg_m, lr):
    """One pass of Algorithm 1 over the pairs, in order, updating float32 ``vectors`` in place.

    Vectors, dot products and gradients are float32 (as in word2vec and umap:
    half the memory traffic, twice the SIMD width); the sigmoid terms and the
    returned sums are float64. Returns ``(running J1, mean gradient norm)``: the
    J1 terms and the norms of the Eq 12/13 gradients, each taken just before its
    pair's update.
    """
    dim = vectors.shape[1]
    num_neg = neg_n.shape[1]
    grad_n = np.empty(dim, dtype=np.float32)
    grad_m = np.empty(dim, dtype=np.float32)
    rate = np.float32(lr)
    j1 = 0.0
    gsum = 0.0
    for p in range(heads.shape[0]):
        n = heads[p]
        m = tails[p]
        x = np.float32(0.0)
        for i in range(dim):
            x += vectors[n, i] * vectors[m, i]
        t, g = _term(x)
        j1 += t
        g = np.float32(g)
        for i in range(dim):
            grad_n[i] = g * vectors[m, i]                      # Eq 12, first part
            grad_m[i] = g * vectors[n, i]                      # Eq 13, first part
        for j in range(num_neg):
            r = neg_n[p, j]
            x = np.float32(0.0)
            for i in range(dim):
                x -= vectors[n, i] * vectors[r, i]
            t, s = _term(x)
            j1 += t
            s = np.float32(s)
            for i in range(dim):
                grad_n[i] -= s * vectors[r, i]                 # Eq 12, negatives of n
            r = neg_m[p, j]
            x = np.float32(0.0)
            for i in range(dim):
                x -= vectors[m, i] * vectors[r, i]
            t, s = _term(x)
            j1 += t
            s = np.float32(s)
            for i in range(dim):
                grad_m[i] -= s * vectors[r, i]                 # Eq 13, negatives of m
        qn = np.float32(0.0)
        qm = np.float32(0.0)
        for i in range(dim):
            qn += grad_n[i] * grad_n[i]
            qm += grad_m[i] * grad_m[i]
            vectors[n, i] += rate * grad_n[i]
            vectors[m, i] += rate * grad_m[i]
        gsum += math.sqrt(qn) + math.sqrt(qm)
    return j1, gsum / max(2 * heads.shape[0], 1)


@njit(cache=True, fastmath=_FASTMATH)
def objective(vectors, heads, tails, neg_n, neg_m):
    """Exact J1 of ``vectors`` on one draw of pairs and negatives (no update), summed in float64.

    ``heads``, ``tails``: int [P]; ``neg_n``, ``neg_m``: int [P, R] (see :func:`sample_epoch`).
    """
    dim = vectors.shape[1]
    j1 = 0.0
    for p in range(heads.shape[0]):
        n = heads[p]
        m = tails[p]
        x = 0.0
        for i in range(dim):
            x += vectors[n, i] * vectors[m, i]
        j1 += _term(x)[0]
        for j in range(neg_n.shape[1]):
            r = neg_n[p, j]
            x = 0.0
            for i in range(dim):
                x -= vectors[n, i] * vectors[r, i]
            j1 += _term(x)[0]
            r = neg_m[p, j]
            x = 0.0
            for i in range(dim):
                x -= vectors[m, i] * vectors[r, i]
            j1 += _term(x)[0]
    return j1


# --------------------------------------------------------------------------------------
# Pure-Python reference (Algorithm 1 as printed, one pair at a time)
# --------------------------------------------------------------------------------------
def _py_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _py_log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sgd_epoch_python(vectors, heads, tails, neg_n, neg_m, lr):
    """Same contract as the numba kernel, written as a plain per-pair loop over numpy float32 vectors."""
    j1 = 0.0
    gsum = 0.0
    for p in range(len(heads)):
        n, m = int(heads[p]), int(tails[p])
        v_n = vectors[n].copy()
        v_m = vectors[m].copy()
        d = float(v_n @ v_m)
        j1 += _py_log_sigmoid(d)
        grad_n = (1.0 - _py_sigmoid(d)) * v_m          # Eq 12, positive part
        grad_m = (1.0 - _py_sigmoid(d)) * v_n          # Eq 13, positive part
        for r in neg_n[p]:
            v_r = vectors[r]
            d = float(v_n @ v_r)
            j1 += _py_log_sigmoid(-d)
            grad_n = grad_n - _py_sigmoid(d) * v_r
        for r in neg_m[p]:
            v_r = vectors[r]
            d = float(v_m @ v_r)
            j1 += _py_log_sigmoid(-d)
            grad_m = grad_m - _py_sigmoid(d) * v_r
        vectors[n] = v_n + lr * grad_n
        vectors[m] = v_m + lr * grad_m
        gsum += float(np.linalg.norm(grad_n)) + float(np.linalg.norm(grad_m))
    return j1, gsum / max(2 * len(heads), 1)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
def _draw(groups: _ImageGroups, num_neurons: int, negatives: int, rng: np.random.Generator):
    heads, tails = groups.draw(rng)
    order = rng.permutation(heads.size)
    heads, tails = heads[order], tails[order]
    neg = rng.integers(0, num_neurons, size=(2, heads.size, negatives), dtype=np.int32)
    return heads, tails, neg[0], neg[1]


def sample_epoch(indices, negatives: int = 3, rng=None):
    """One epoch's random draws, as :func:`embed_neurons` makes them: ``(heads, tails, neg_n, neg_m)``.

    D is redrawn from the stimulus table ``indices`` (``int [N, k]``), its pairs
    put in a random order, and ``negatives`` random neurons drawn uniformly
    (with replacement) for each side of each pair (int32 ``[P, negatives]``
    each). Use it with :func:`objective` to score embeddings on a fixed draw.
    """
    arr = check_indices(indices)
    check_int("negatives", negatives, 0)
    return _draw(_ImageGroups(*stimulus_memberships(arr)), arr.shape[0], negatives, make_rng(rng, "rng"))


def _check_params(dim, negatives, lr, epochs, lr_schedule="constant", tol=0.0, patience=1, check_every=1):
    check_int("dim", dim, 1)
    check_int("negatives", negatives, 0)
    check_positive("lr", lr)
    check_int("epochs", epochs, 1)
    if lr_schedule not in LR_SCHEDULES:
        raise ConceptEvoError(f"lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {lr_schedule!r}")
    check_nonnegative("tol", tol)
    check_int("patience", patience, 1)
    check_int("check_every", check_every, 1)


def epoch_lr(lr: float, epoch: int, epochs: int, lr_schedule: str) -> float:
    """Learning rate of epoch ``epoch`` (0-based) of ``epochs``: ``lr``, or for "linear" ``lr * max(1 - epoch/epochs, 1e-4)``."""
    if lr_schedule == "constant":
        return float(lr)
    return float(lr) * max(1.0 - epoch / epochs, 1e-4)


def _prepare(stimuli, dim, seed):
    ids, indices, _ = stimuli_arrays(stimuli)
    if len(ids) < 2:
        raise ConceptEvoError(f"stimuli has {len(ids)} neuron(s); a neuron embedding needs at least 2 neurons")
    neurons, images = stimulus_memberships(indices)
    _, inverse, counts = np.unique(images, return_inverse=True, return_counts=True)
    shared = counts[inverse] >= 2
    num_pairs = int(np.sum(counts - 1))
    if num_pairs == 0:
        raise ConceptEvoError("no two neurons share a stimulus image, so there are no co-activation pairs to learn "
                              "from; find stimuli with a larger k or on more images")
    paired = np.zeros(len(ids), dtype=bool)
    paired[neurons[shared]] = True
    lonely = int((~paired).sum())
    if lonely:
        log.info("%d of %d neurons share no stimulus image with another neuron; they keep their random "
                 "initial vectors", lonely, len(ids))
    check_memory(len(ids) * dim * 12.0, f"a neuron embedding of {len(ids)} neurons in dim={dim}",
                 "lower dim (the paper uses 30)")  # the float64 draw and the float32 vectors
    rng = make_rng(seed)
    vectors = rng.uniform(-0.5, 0.5, size=(len(ids), dim)).astype(np.float32)
    return ids, _ImageGroups(neurons, images), num_pairs, rng, vectors


def nearest_neighbors(vectors, queries, k: int, groups=None) -> np.ndarray:
    """int ``[len(queries), k]``: for each row index in ``queries``, its ``k`` nearest other rows (Euclidean), any order.

    With ``groups`` (one label per row), rows of the query's own group are left out too (e.g. a checkpoint's
    neurons, to find a neuron's nearest neighbours among other checkpoints').
    """
    v = np.asarray(vectors, dtype=np.float64)
    q = np.asarray(queries, dtype=np.int64)
    k = min(int(k), len(v) - 1)
    sq = (v * v).sum(1)
    out = np.empty((q.size, k), dtype=np.int64)
    for s in range(0, q.size, 512):
        rows = q[s:s + 512]
        d = sq[None, :] - 2 * v[rows] @ v.T
        d[np.arange(rows.size), rows] = np.inf
        if groups is not None:
            d[groups[rows][:, None] == groups[None, :]] = np.inf
        out[s:s + rows.size] = np.argpartition(d, k - 1, axis=1)[:, :k]
    return out


def _shared(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, how many of the neighbours in row i of ``a`` are also in row i of ``b``."""
    return (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)


def changed_share(before: np.ndarray, after: np.ndarray) -> float:
    """Share of the neighbours in ``after`` (rows of neighbour indices) that were not in the same row of ``before``."""
    if before.size == 0:
        return 0.0
    return float(1.0 - _shared(after, before).sum() / after.size)


def neighbor_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Jaccard index of the neighbour sets in row i of ``a`` and of ``b``."""
    shared = _shared(a, b)
    return float(np.mean(shared / (a.shape[1] + b.shape[1] - shared)))


class _NeighborStop:
    """The early-stopping rule on what users see: how much the nearest-neighbour sets still change.

    Every ``check_every`` epochs the 10 nearest neighbours of a fixed sample of
    neurons are found; ``c_i`` is the share of them that were not neighbours at
    the previous check. Stop at check i when ``c_{i - patience} - c_i < tol``:
    over the last ``patience`` checks the neighbourhoods stopped settling. Under
    a constant learning rate ``c`` levels off well above 0 (the updates keep
    shuffling neighbours) about when concept purity does; under the linear
    decay it keeps falling until the last epochs, so the rule rarely fires.
    """

    def __init__(self, num_neurons, tol, patience, check_every):
        self.tol, self.patience, self.every = float(tol), int(patience), int(check_every)
        self.sample = np.sort(np.random.default_rng(0).choice(num_neurons, size=min(num_neurons, STOP_SAMPLE),
                                                              replace=False))
        self.prev = None
        self.changes: list[float] = []
        self.reason = ""

    def __call__(self, epoch: int, vectors) -> bool:
        if epoch % self.every:
            return False
        nn = nearest_neighbors(vectors, self.sample, STOP_NEIGHBORS)
        if self.prev is not None:
            self.changes.append(changed_share(self.prev, nn))
        self.prev = nn
        c = self.changes
        if len(c) > self.patience and c[-1 - self.patience] - c[-1] < self.tol:
            self.reason = (f"early stop at epoch {epoch}: the share of changed {STOP_NEIGHBORS}-nearest neighbours "
                           f"between checks {self.every} epochs apart fell by {c[-1 - self.patience] - c[-1]:.3f} "
                           f"< tol {self.tol:g} over the last {self.patience} checks (now {c[-1]:.3f})")
            return True
        return False


def embed_neurons(stimuli, dim: int = EmbeddingConfig.dim, negatives: int = EmbeddingConfig.negatives,
                  lr: float = EmbeddingConfig.lr, epochs: int = EmbeddingConfig.epochs,
                  seed=EmbeddingConfig.seed, lr_schedule: str = EmbeddingConfig.lr_schedule,
                  early_stop: bool = EmbeddingConfig.early_stop, tol: float = EmbeddingConfig.tol,
                  patience: int = EmbeddingConfig.patience, check_every: int = EmbeddingConfig.check_every,
                  progress: bool = True) -> NeuronEmbedding:
    """Learn the base neuron embedding from the base checkpoint's stimuli (Algorithm 1).

    Every default comes from :class:`conceptevo.config.EmbeddingConfig` (the
    ``[embedding]`` table of a study config), so the API and ``conceptevo run``
    behave the same.

    Parameters
    ----------
    stimuli : Stimuli
        The base checkpoint's stimuli (uses ``.neuron_ids`` and ``.indices``).
    dim : int
        Embedding dimension (paper: 30).
    negatives : int
        R, random neurons per side of each pair (paper: 3; 0 disables them).
    lr : float
        Learning rate of the per-pair gradient ascent (paper: 0.05).
    epochs : int
        Epochs to run (the most, with ``early_stop``).
    seed : int, numpy Generator or None
        Seeds the initial vectors and every epoch's draws; the same seed gives
        the same result.
    lr_schedule : {"linear", "constant"}
        "linear" (default): epoch e of E uses ``lr * max(1 - e/E, 1e-4)``, so the
        vectors settle as the rate falls; "constant": ``lr`` throughout (the
        paper's Algorithm 1 as printed).
    early_stop : bool
        Stop before ``epochs`` when the nearest-neighbour sets stop settling:
        every ``check_every`` epochs, the share ``c`` of a fixed sample of (up to
        2,000) neurons' 10 nearest neighbours that changed since the previous
        check is measured, and the run stops once ``c`` fell by less than
        ``tol`` over the last ``patience`` checks. Off by default: with the
        linear schedule the neighbourhoods keep improving to the last epoch.
        With the linear schedule a stop also cuts the decay short.
    tol, patience, check_every :
        Parameters of the early-stopping rule (tol is a share, 0..1).
    progress : bool
        Show a tqdm progress bar over epochs.

    Returns
    -------
    NeuronEmbedding
        float32 vectors, with ``j1_history``, ``epochs_run`` and, in
        ``config``, ``stop_reason`` (also logged) and ``neighbor_change`` (the
        rule's ``c`` at each check, when it was on).
    """
    _check_params(dim, negatives, lr, epochs, lr_schedule, tol, patience, check_every)
    if not isinstance(early_stop, (bool, np.bool_)):
        raise ConceptEvoError(f"early_stop must be True or False, got {early_stop!r}")
    ids, groups, num_pairs, rng, vectors = _prepare(stimuli, dim, seed)
    rule = _NeighborStop(len(ids), tol, patience, check_every) if early_stop else None
    history: list[float] = []
    reason = ""
    bar = tqdm(range(epochs), desc="neuron embedding", disable=not progress, leave=False)
    for epoch in bar:
        heads, tails, neg_n, neg_m = _draw(groups, len(ids), negatives, rng)
        rate = epoch_lr(lr, epoch, epochs, lr_schedule)
        j1, gnorm = _sgd_epoch(vectors, heads, tails, neg_n, neg_m, rate)
        if not np.isfinite(j1):
            raise ConceptEvoError(f"the neuron embedding diverged at epoch {epoch + 1} (J1 = {j1}); lower lr (now {lr})")
        history.append(j1)
        if progress:
            bar.set_postfix(j1_per_pair=f"{j1 / num_pairs:.4f}", grad=f"{gnorm:.3g}", lr=f"{rate:.3g}", refresh=False)
        if rule is not None and epoch + 1 < epochs and rule(epoch + 1, vectors):
            reason = rule.reason
            break
    bar.close()
    if not reason:
        reason = (f"ran all {epochs} epochs ({lr_schedule} learning rate"
                  + (", the early stop did not fire)" if early_stop else ", early stop off)"))
    log.info("neuron embedding: %d neurons, %d pairs/epoch, %d epochs, J1/pair %.4f -> %.4f; %s",
             len(ids), num_pairs, len(history), history[0] / num_pairs, history[-1] / num_pairs, reason)
    config = dict(dim=dim, negatives=negatives, lr=float(lr), lr_schedule=lr_schedule, epochs=epochs,
                  early_stop=bool(early_stop), tol=float(tol), patience=patience, check_every=check_every,
                  seed=seed if isinstance(seed, (int, type(None))) else repr(seed),
                  early_stopped=len(history) < epochs, stop_reason=reason,
                  neighbor_change=None if rule is None else [round(c, 5) for c in rule.changes])
    return NeuronEmbedding(ids, vectors, j1_history=np.array(history), epochs_run=len(history),
                           num_pairs=num_pairs, config=config)


def embed_neurons_reference(stimuli, dim: int = 30, negatives: int = 3, lr: float = 0.05, epochs: int = 10,
                            seed=0, max_pairs: int | None = None,
                            lr_schedule: str = EmbeddingConfig.lr_schedule) -> NeuronEmbedding:
    """Algorithm 1 in plain Python, one pair at a time (slow; the benchmark's baseline).

    Makes exactly the random draws of :func:`embed_neurons` with the same seed
    and applies the same updates, so its result matches the numba kernel's to
    rounding. No early stopping. ``max_pairs`` truncates every epoch to its
    first pairs (to time a fraction of an epoch).
    """
    _check_params(dim, negatives, lr, epochs, lr_schedule)
    ids, groups, num_pairs, rng, vectors = _prepare(stimuli, dim, seed)
    history = []
    for epoch in range(epochs):
        heads, tails, neg_n, neg_m = _draw(groups, len(ids), negatives, rng)
        if max_pairs is not None:
            heads, tails, neg_n, neg_m = heads[:max_pairs], tails[:max_pairs], neg_n[:max_pairs], neg_m[:max_pairs]
        j1, _ = _sgd_epoch_python(vectors, heads, tails, neg_n, neg_m, epoch_lr(lr, epoch, epochs, lr_schedule))
        history.append(j1)
    return NeuronEmbedding(ids, vectors, j1_history=np.array(history), epochs_run=epochs,
                           num_pairs=num_pairs, config=dict(dim=dim, negatives=negatives, lr=float(lr),
                                                            lr_schedule=lr_schedule, epochs=epochs, reference=True))


__all__ = ["NeuronEmbedding", "embed_neurons", "embed_neurons_reference", "objective", "sample_epoch",
           "DEFAULT_EPOCHS", "epoch_lr", "nearest_neighbors", "changed_share", "neighbor_jaccard"]
