"""Training diagnostics per checkpoint and per layer (METHOD §9; paper Sec 4.5).

**Concept diversity** of a set of neurons: for each dimension of their vectors
in the unified space, the differential entropy of that coordinate over the
neurons, averaged over the dimensions (:func:`diversity`; estimator in
:mod:`conceptevo.diagnostics.entropy`, Kozachenko-Leonenko by default). Higher
means the neurons are spread over more distinct concepts. Computed for all of a
checkpoint's neurons and per layer.

**Evolution speed**: the Euclidean distance a neuron's vector moves between two
checkpoints of one model, neurons matched by id (:func:`distance_moved`), and
its mean over the neurons (and per layer). :func:`milestone_speed` gives it
between the checkpoints nearest given training-accuracy milestones, as the
paper reports (0.25 -> 0.5 -> 0.75 top-1).

**Concept collapse** of a layer (:func:`collapse`): neuron n is *collapsed* when
at least ``min_others`` other neurons of the same layer share most of its
stimuli, i.e. the Jaccard index of the two stimulus sets,
``|X_n & X_m| / |X_n | X_m|``, is at least ``jaccard`` (default 0.5; with k = 10
that is 7 or more shared images of 10). ``min_others`` defaults to
``max(2, ceil(0.1 * (layer size - 1)))``: a neuron counts only when it sits in
a clump of at least ~10% of its layer, so two neurons that happen to like the
same images do not count. The layer's collapse is the share of its neurons that
are collapsed. Dead neurons (constant output) all take the first k images of
the pool (ties go to the lower index) and therefore collapse together, as do
neurons that all detect "background" (the paper's Appendix C).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import ConceptEvoError
from ..units import layer_of, rows_by_layer
from .entropy import METHODS, mean_entropy

log = logging.getLogger(__name__)

ALL = "all"  # key of the whole-checkpoint value in per-layer dicts


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def layer_groups(neuron_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Layer name -> row positions of its neurons, layers in order of first appearance."""
    return {name: np.asarray(rows, dtype=np.int64) for name, rows in rows_by_layer(neuron_ids).items()}


def _ids_vectors(embedding, vectors=None):
    """(neuron_ids, float64 vectors) of a NeuronEmbedding, or of (ids, vectors) given separately."""
    if vectors is None:
        try:
            ids, vectors = list(embedding.neuron_ids), embedding.vectors
        except AttributeError:
            raise ConceptEvoError(f"expected a NeuronEmbedding (with .neuron_ids and .vectors), got {type(embedding).__name__}") from None
    else:
        ids = list(embedding)
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != len(ids):
        raise ConceptEvoError(f"vectors must be [len(neuron_ids)={len(ids)}, dim], got shape {v.shape}")
    return [str(i) for i in ids], v


# ---------------------------------------------------------------------------------------------
# diversity
# ---------------------------------------------------------------------------------------------
def diversity(vectors, method: str = "knn", k: int = 3) -> float:
    """Concept diversity of neuron vectors ``[n, dim]`` (nats; NaN when too few finite rows)."""
    return mean_entropy(vectors, method=method, k=k)


def diversity_by_layer(embedding, vectors=None, method: str = "knn", k: int = 3) -> dict[str, float]:
    """Diversity of every layer's neurons and (key ``"all"``) of all neurons together.

    ``embedding``: a NeuronEmbedding, or a list of neuron ids with ``vectors``.
    A layer with k or fewer neurons gets NaN.
    """
    ids, v = _ids_vectors(embedding, vectors)
    out = {ALL: mean_entropy(v, method=method, k=k)}
    for layer, rows in layer_groups(ids).items():
        out[layer] = mean_entropy(v[rows], method=method, k=k)
    return out


# ---------------------------------------------------------------------------------------------
# evolution speed
# ---------------------------------------------------------------------------------------------
@dataclass
class Movement:
    """How far each neuron moved between two checkpoints (neurons matched by id)."""

    neuron_ids: list[str]
    distances: np.ndarray                       # float64 [n]; NaN where either vector is not finite
    by_layer: dict[str, float] = field(default_factory=dict)  # layer -> mean distance; "all" too

    @property
    def mean(self) -> float:
        return self.by_layer.get(ALL, float("nan"))


def row_distances(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Euclidean distance between matching rows (neurons aligned already), in the arrays' own precision.

    The one definition of "distance moved"; :func:`distance_moved` aligns neurons by id first.
    """
    return np.linalg.norm(np.asarray(after) - np.asarray(before), axis=1)


def distance_moved(before, after, before_vectors=None, after_vectors=None) -> Movement:
    """Euclidean distance each neuron's vector moved from ``before`` to ``after``.

    Both are NeuronEmbeddings of the same model (or lists of ids with the
    ``*_vectors`` arrays). Neurons are matched by id; ids present in only one
    are left out (logged). Raises when no id is shared.
    """
    ids_a, va = _ids_vectors(before, before_vectors)
    ids_b, vb = _ids_vectors(after, after_vectors)
    if va.shape[1] != vb.shape[1]:
        raise ConceptEvoError(f"the two embeddings have different dimensions ({va.shape[1]} and {vb.shape[1]}); "
                              "project both checkpoints onto the same base space")
    if ids_a == ids_b:
        ids, a, b = ids_a, va, vb
    else:
        pos = {nid: i for i, nid in enumerate(ids_b)}
        keep = [i for i, nid in enumerate(ids_a) if nid in pos]
        if not keep:
            raise ConceptEvoError("the two checkpoints share no neuron id; distance moved compares checkpoints "
                                  "of one model (neurons are matched by id)")
        if len(keep) < max(len(ids_a), len(ids_b)):
            log.info("distance moved: %d neurons in common (%d and %d)", len(keep), len(ids_a), len(ids_b))
        ids = [ids_a[i] for i in keep]
        a, b = va[keep], vb[[pos[n] for n in ids]]
    d = row_distances(a, b)
    by = {ALL: _nanmean(d)}
    for layer, rows in layer_groups(ids).items():
        by[layer] = _nanmean(d[rows])
    return Movement(ids, d, by)


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _projections(ws, model: str):
    tags = ws.tags(model)
    if len(tags) < 2:
        raise ConceptEvoError(
            f"model {model!r} has only {len(tags)} checkpoint ({', '.join(tags) or 'none'}); evolution speed "
            "needs at least two checkpoints of one model"
        )
    return tags


def milestone_speed(ws, model: str, milestones: Sequence[float] = (0.25, 0.5, 0.75), key: str = "train_top1",
                    tolerance: float = 0.15) -> list[dict]:
    """Mean distance moved between the checkpoints nearest consecutive accuracy milestones.

    The paper's evolution speed: e.g. a well-trained VGG16's neurons move 0.991 on
    average from the epoch nearest 0.25 training top-1 to the one nearest 0.5.
    Returns one dict per stage: ``from``/``to`` tags, their accuracies, the
    milestones, ``mean`` distance, ``by_layer`` means, ``epochs`` between them and
    ``per_epoch`` (mean / epochs, when both epochs are known). Raises when the
    model has one checkpoint, when a milestone is further than ``tolerance``
    from every checkpoint's accuracy, or when two milestones fall on the same
    checkpoint.
    """
    from ..importance.milestones import stages_from_milestones

    _projections(ws, model)
    cks = {c.tag: c for c in ws.checkpoints(model)}
    stages = stages_from_milestones(list(cks.values()), milestones, key=key, tolerance=tolerance)
    out = []
    for (m0, m1), (t0, t1) in zip(zip(milestones, milestones[1:]), stages):
        mv = distance_moved(ws.projection(model, t0), ws.projection(model, t1))
        e0, e1 = cks[t0].epoch, cks[t1].epoch
        epochs = (e1 - e0) if e0 is not None and e1 is not None else None
        out.append({
            "model": model, "from": t0, "to": t1, "milestones": [float(m0), float(m1)],
            "accuracy": [cks[t0].metrics.get(key), cks[t1].metrics.get(key)], "key": key,
            "mean": mv.mean, "by_layer": mv.by_layer, "epochs": epochs,
            "per_epoch": (mv.mean / epochs) if epochs else None,
        })
    return out


# ---------------------------------------------------------------------------------------------
# collapse
# ---------------------------------------------------------------------------------------------
def default_min_others(layer_size: int) -> int:
    return max(2, math.ceil(0.25 * (layer_size - 1)))


@dataclass
class Collapse:
    """Per layer, the share of collapsed neurons, and which neurons."""

    neuron_ids: list[str]
    collapsed: np.ndarray                     # bool [n]
    partners: np.ndarray                      # int [n]: other neurons of its layer above the Jaccard threshold
    by_layer: dict[str, float] = field(default_factory=dict)   # layer -> share; "all" too
    jaccard: float = 0.5
    min_others: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.by_layer.get(ALL, float("nan"))


def jaccard_matrix(indices: np.ndarray) -> np.ndarray:
    """Jaccard index of every pair of rows of ``indices`` ``[n, k]`` (stimulus sets; -1 = padding)."""
    idx = np.asarray(indices, dtype=np.int64)
    n = idx.shape[0]
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols = idx.ravel()
    ok = cols >= 0
    if not ok.any():
        return np.zeros((n, n))
    _, cols = np.unique(cols[ok], return_inverse=True)
    M = sp.csr_matrix((np.ones(len(cols)), (rows[ok], cols)), shape=(n, int(cols.max()) + 1))
    M.sum_duplicates()
    M.data[:] = 1.0  # an image repeated within one row counts once
    inter = np.asarray((M @ M.T).todense())
    size = np.asarray(M.sum(axis=1)).ravel()
    union = size[:, None] + size[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def collapse(stimuli, jaccard: float = 0.5, min_others: int | None = None) -> Collapse:
    """Share of each layer's neurons whose stimuli coincide heavily with many others' (module docstring).

    ``stimuli``: a Stimuli (``.neuron_ids``, ``.indices``). ``jaccard`` in (0, 1];
    ``min_others`` (default: 10% of the layer's other neurons, at least 2).
    """
    if not 0 < jaccard <= 1:
        raise ConceptEvoError(f"jaccard (the stimulus-overlap threshold) must be in (0, 1], got {jaccard!r}")
    if min_others is not None and (isinstance(min_others, bool) or not isinstance(min_others, (int, np.integer)) or min_others < 1):
        raise ConceptEvoError(f"min_others must be a positive integer, got {min_others!r}")
    try:
        ids, indices = [str(i) for i in stimuli.neuron_ids], np.asarray(stimuli.indices)
    except AttributeError:
        raise ConceptEvoError(f"collapse needs a Stimuli (with .neuron_ids and .indices), got {type(stimuli).__name__}") from None
    n = len(ids)
    collapsed = np.zeros(n, dtype=bool)
    partners = np.zeros(n, dtype=np.int64)
    by, mins = {}, {}
    for layer, rows in layer_groups(ids).items():
        J = jaccard_matrix(indices[rows])
        np.fill_diagonal(J, 0.0)
        cnt = (J >= jaccard - 1e-12).sum(axis=1)
        need = default_min_others(len(rows)) if min_others is None else int(min_others)
        mins[layer] = need
        partners[rows] = cnt
        collapsed[rows] = cnt >= need if len(rows) > need else False
        by[layer] = float(collapsed[rows].mean())
    by = {ALL: float(collapsed.mean()) if n else float("nan"), **by}
    return Collapse(ids, collapsed, partners, by, float(jaccard), mins)


# ---------------------------------------------------------------------------------------------
# one checkpoint
# ---------------------------------------------------------------------------------------------
@dataclass
class CheckpointMetrics:
    """The diagnostics of one checkpoint: diversity and collapse, overall (``"all"``) and per layer."""

    model: str | None
    tag: str | None
    epoch: float | None
    diversity: dict[str, float]
    collapse: dict[str, float]
    moved: dict[str, float] = field(default_factory=dict)   # distance moved since the previous checkpoint
    metrics: dict = field(default_factory=dict)             # accuracies, train loss etc.
    method: str = "knn"
    step: int | None = None                                 # the training step, where the checkpoint names one

    @property
    def layers(self) -> list[str]:
        return [k for k in self.diversity if k != ALL]

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def checkpoint_metrics(stimuli, embedding, method: str = "knn", k: int = 3, jaccard: float = 0.5,
                       min_others: int | None = None, model: str | None = None, tag: str | None = None,
                       epoch: float | None = None, metrics: dict | None = None) -> CheckpointMetrics:
    """Diversity (from the neurons' unified-space vectors) and collapse (from their stimuli) of one checkpoint."""
    if method not in METHODS:
        raise ConceptEvoError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    div = diversity_by_layer(embedding, method=method, k=k)
    col = collapse(stimuli, jaccard=jaccard, min_others=min_others).by_layer
    return CheckpointMetrics(model, tag, epoch, div, col, {}, dict(metrics or {}), method)


def finite_or_none(x):
    """A finite float, or None (W&B tables and JSON have no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def metric_row(prefix: str, per_layer: dict[str, dict], extra: dict | None = None) -> dict:
    """``{f"{prefix}/{metric}/{layer}": value}`` for finite values of ``{metric: {layer: value}}``, plus ``extra``.

    One row of per-layer metrics as a logger (W&B, the concept monitor) takes it.
    """
    row = {}
    for metric, values in per_layer.items():
        for layer, v in (values or {}).items():
            v = finite_or_none(v)
            if v is not None:
                row[f"{prefix}/{metric}/{layer}"] = v
    for key, v in (extra or {}).items():
        if v is not None:
            row[f"{prefix}/{key}"] = v
    return row


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


__all__ = [
    "ALL", "layer_of", "layer_groups", "diversity", "diversity_by_layer", "Movement", "distance_moved", "row_distances",
    "milestone_speed", "Collapse", "collapse", "jaccard_matrix", "default_min_others", "CheckpointMetrics",
    "checkpoint_metrics", "metric_row",
]
