"""Image embedding on the base semantic space (METHOD §5; the paper's Eqs 2-4).

A neuron is approximated by the mean of its stimuli's image vectors,
``v~_n = mean_{x in X_n} v_x`` (Eq 2), and the image vectors minimise::

    J2 = 1 / (2 |N|) * sum_n || v_n - v~_n ||^2                         (Eq 3)

over the base neurons N. Writing ``A`` for the sparse ``[N, C]`` matrix with
``A[n, x] = 1 / |X_n|`` for every stimulus image x of n (C = the images in some
base stimulus set, the *covered* images), ``B`` for the ``[N, dim]`` learned
neuron vectors and ``W`` for the ``[C, dim]`` image vectors, J2 is
``||A W - B||_F^2 / (2 |N|)``: a linear least-squares problem.

Solvers (``method``):

``"lstsq"`` (default)
    CGLS (conjugate gradients for least squares, LSQR's mathematical twin) on
    the sparse ``A``, all columns of B at once. Started from 0 it converges to
    the *minimum-norm* least-squares solution ``W = A^+ B``: J2 at its global
    minimum, and no component that no neuron constrains. It copes with
    rank-deficient ``A`` (for instance several dead neurons whose stimuli are
    the same images). About a second at VGG16 scale.
``"gd"``
    Full-batch gradient descent with the gradient of Eq 4,
    ``dJ2/dW = A^T (A W - B) / |N|``, step ``1/L`` from the bound
    ``L <= ||A||_1 ||A||_inf / |N|``. Slow; kept as the paper's reference.
    Started from zeros (``gd_init="zeros"``, default) it tends to the same
    minimum-norm solution; ``gd_init="random"`` starts, as the paper does, from
    uniform [-0.5, 0.5) vectors, whose unconstrained part then stays random.

The error, in the paper's unit (``rmse`` on the result): the root of the mean
over base neurons of the squared distance between a neuron's learned vector
and its stimuli's mean image vector,
``sqrt( sum_n ||v_n - v~_n||^2 / |N| )`` = ``sqrt(2 * J2)`` (neurons without
any stimulus are left out of N). It is a distance in the space, comparable
with the neurons' own norms. Beside it ``info`` holds ``relative_error``
(``||B - A W||_F / ||B||_F``: 0 = every base neuron reproduced exactly, 1 = no
better than zero vectors) and the shape of the problem: ``num_neurons``
equations against ``num_covered`` unknown image vectors per dimension. When
there are at least as many covered images as neurons (the usual case: k = 10
stimuli per neuron, few shared), the problem is *underdetermined*: the
minimum-norm solution reproduces every base neuron exactly, the error is ~0
and says nothing about how faithful the space is. What does say it is how the
space places base neurons it was *not* fitted on
(:func:`conceptevo.projection.holdout_fidelity`), which the pipeline records
beside the error. :func:`fit_summary` turns these numbers into words.

Images outside every base stimulus set (METHOD §5, the authors' "indirect"
step): with ``responses`` (``int [num_images, top]``, for each image of the pool
its ``top`` most responsive base neurons, -1 = none, as
``conceptevo.stimuli.top_responses`` returns), an uncovered image x gets::

    v_x = mean over its responsive base neurons n of v_n

the centre of the concepts that fire most on it, in the paper's own reading
that an image is a linear combination of the concepts it contains and that a
neuron's vector is the mean of its images' vectors. Covered images keep their
least-squares vectors. Without ``responses`` (or with ``indirect=False``)
uncovered images get NaN vectors, and ``covered`` / ``has_vector`` say which.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from ..errors import ConceptEvoError, check_memory, check_positive
from ..containers import ImageEmbedding
from ._util import check_int, check_nonnegative, make_rng, stimuli_arrays
from .pairs import check_indices, stimulus_memberships

log = logging.getLogger(__name__)

METHODS = ("lstsq", "gd")


def stimulus_matrix(indices):
    """The sparse averaging matrix of Eq 2 over the covered images.

    Returns ``(A, images, rows)``: ``A`` CSR ``[R, C]`` with ``A[i, j] = 1/|X_n|``
    where ``rows[i] = n`` (neurons with at least one stimulus) and ``images[j]``
    the covered image index of column j.
    """
    neurons, imgs = stimulus_memberships(indices)
    images, cols = np.unique(imgs, return_inverse=True)
    rows, row_of = np.unique(neurons, return_inverse=True)
    sizes = np.bincount(row_of, minlength=rows.size)
    A = sp.csr_matrix((1.0 / sizes[row_of], (row_of, cols)), shape=(rows.size, images.size))
    return A, images, rows


def _solve_lstsq(A, B, tol, max_iter, progress=False):
    """Minimum-norm least-squares ``W = A^+ B`` by CGLS, all columns of B at once.

    CGLS (conjugate gradients on the normal equations, in the numerically
    careful form that never forms ``A^T A``) started from 0 keeps its iterates in
    the row space of A, so it converges to the minimum-norm minimiser whatever
    the rank of A. Each column runs its own scalar recurrences; the matrix
    products are shared. A column has converged when, as in LSQR,
    ``||r|| <= tol ||b||`` (consistent system) or
    ``||A^T r|| <= tol ||A||_F ||r||`` (least-squares optimum).
    """
    AT = A.T.tocsr()
    dim = B.shape[1]
    W = np.zeros((A.shape[1], dim))
    R = B.copy()
    S = AT @ R
    P = S.copy()
    gamma = np.einsum("ij,ij->j", S, S)
    norm_a = float(np.sqrt(np.sum(A.data ** 2)))
    norm_b = np.linalg.norm(B, axis=0)
    active = np.ones(dim, dtype=bool)
    done = np.sqrt(gamma) <= tol * norm_a * norm_b   # B orthogonal to A's range (or zero)
    active &= ~done
    it = 0
    bar = tqdm(total=max_iter, desc="image embedding (lstsq)", disable=not progress, leave=False)
    while active.any() and it < max_iter:
        idx = np.flatnonzero(active)
        cols = slice(None) if idx.size == dim else idx   # a slice avoids copies while all run
        Q = A @ P[:, cols]
        qq = np.einsum("ij,ij->j", Q, Q)
        alpha = np.divide(gamma[cols], qq, out=np.zeros_like(qq), where=qq > 0)
        W[:, cols] += P[:, cols] * alpha
        R[:, cols] -= Q * alpha
        S_new = AT @ R[:, cols]
        g_new = np.einsum("ij,ij->j", S_new, S_new)
        r_norm = np.linalg.norm(R[:, cols], axis=0)
        conv = (r_norm <= tol * norm_b[cols]) | (np.sqrt(g_new) <= tol * norm_a * r_norm) | (qq <= 0)
        beta = np.divide(g_new, gamma[cols], out=np.zeros_like(g_new), where=gamma[cols] > 0)
        P[:, cols] = S_new + P[:, cols] * beta
        gamma[cols] = g_new
        active[idx[conv]] = False
        it += 1
        bar.update(1)
    bar.close()
    if active.any():
        log.warning("image embedding: CGLS stopped at max_iter=%d before reaching tol=%g on %d of %d dimensions; "
                    "raise max_iter", max_iter, tol, int(active.sum()), dim)
    return W, {"iterations": it, "converged": bool(not active.any())}


def _solve_gd(A, B, tol, max_iter, lr, init, rng, progress):
    n = A.shape[0]
    # ||A||_2^2 <= ||A||_1 * ||A||_inf (max column sum times max row sum)
    bound = float(abs(A).sum(axis=0).max()) * float(abs(A).sum(axis=1).max())
    step = lr if lr is not None else n / bound
    if init == "zeros":
        W = np.zeros((A.shape[1], B.shape[1]))
    else:
        W = rng.uniform(-0.5, 0.5, size=(A.shape[1], B.shape[1]))
    AT = A.T.tocsr()
    R = A @ W - B
    j2 = float(np.sum(R * R)) / (2 * n)
    it = 0
    bar = tqdm(total=max_iter, desc="image embedding (gd)", disable=not progress, leave=False)
    while it < max_iter:
        W -= step * (AT @ R) / n                          # Eq 4
        R = A @ W - B
        new = float(np.sum(R * R)) / (2 * n)
        it += 1
        bar.update(1)
        if not np.isfinite(new):
            raise ConceptEvoError(f"gradient descent on J2 diverged; lower lr (now {step})")
        done = abs(j2 - new) <= tol * max(j2, 1e-300)
        j2 = new
        if done:
            break
    bar.close()
    if it >= max_iter:
        log.warning("image embedding: gradient descent stopped at max_iter=%d before reaching tol=%g", max_iter, tol)
    return W, {"iterations": it, "lr": step}


def _align(neuron_embedding, ids):
    try:
        emb_ids = list(neuron_embedding.neuron_ids)
        vectors = np.asarray(neuron_embedding.vectors, dtype=np.float64)
    except AttributeError:
        raise ConceptEvoError("neuron_embedding must be a NeuronEmbedding (from embed_neurons), got "
                              f"{type(neuron_embedding).__name__}") from None
    if emb_ids == ids:
        return vectors
    pos = {nid: i for i, nid in enumerate(emb_ids)}
    missing = [nid for nid in ids if nid not in pos]
    if missing:
        raise ConceptEvoError(f"neuron_embedding has no vector for {len(missing)} of the stimuli's neurons "
                              f"(e.g. {missing[0]!r}); embed_images needs the base checkpoint's stimuli and the "
                              "embedding learned from them")
    return vectors[[pos[nid] for nid in ids]]


def _resolve_num_images(num_images, stim_num, responses, max_index):
    if num_images is not None:
        num_images = check_int("num_images", num_images, 1)
    elif stim_num is not None:
        num_images = stim_num
    elif responses is not None:
        num_images = int(responses.shape[0])
    else:
        num_images = max_index + 1
    if max_index >= num_images:
        raise ConceptEvoError(f"stimuli refer to image {max_index} but num_images is {num_images}; "
                              "pass num_images = the size of the image pool")
    if responses is not None and responses.shape[0] != num_images:
        raise ConceptEvoError(f"responses has {responses.shape[0]} rows but the image pool has {num_images} images; "
                              "compute responses (top_responses) over the whole pool")
    return num_images


def embed_images(stimuli, neuron_embedding, num_images: int | None = None, method: str = "lstsq",
                 indirect: bool = True, responses=None, seed=0, tol: float = 1e-10, max_iter: int | None = None,
                 lr: float | None = None, gd_init: str = "zeros", progress: bool = False) -> ImageEmbedding:
    """Learn image vectors from the base stimuli and base neuron embedding (Eqs 2-4).

    Parameters
    ----------
    stimuli : Stimuli
        The base checkpoint's stimuli (``.neuron_ids``, ``.indices``, ``.num_images``).
    neuron_embedding : NeuronEmbedding
        The base neuron embedding learned from those stimuli (matched by neuron id).
    num_images : int, optional
        Size of the image pool (image indices are ``0 .. num_images - 1``).
        Default: ``stimuli.num_images``, else ``len(responses)``, else the
        largest stimulus index + 1.
    method : {"lstsq", "gd"}
        Solver of the least-squares problem (see the module docstring).
    indirect : bool
        Give images outside every base stimulus set a vector from ``responses``.
    responses : int array [num_images, top], optional
        Each image's most responsive base neurons (rows of ``stimuli``; -1 =
        none), e.g. ``conceptevo.stimuli.top_responses``. Without it, images
        outside every base stimulus set get NaN vectors.
    seed : int
        Seeds ``gd_init="random"`` only; everything else is deterministic.
    tol : float
        Solver tolerance. ``"lstsq"``: stop a dimension when
        ``||r|| <= tol ||b||`` or ``||A^T r|| <= tol ||A||_F ||r||`` (LSQR's
        rules); ``"gd"``: when J2's relative decrease in one step is below tol.
    max_iter : int, optional
        Iteration cap (``"lstsq"``: 20 * min(neurons, covered images) + 100;
        ``"gd"``: 20,000).
    lr : float, optional
        Step size of ``"gd"`` (default ``1/L``, a safe bound).
    gd_init : {"zeros", "random"}
        Start of ``"gd"``.
    progress : bool
        Progress bar over solver iterations.
    """
    if method not in METHODS:
        raise ConceptEvoError(f"method must be one of {METHODS}, got {method!r}")
    if gd_init not in ("zeros", "random"):
        raise ConceptEvoError(f"gd_init must be 'zeros' or 'random', got {gd_init!r}")
    check_nonnegative("tol", tol)
    if max_iter is not None:
        check_int("max_iter", max_iter, 1)
    if lr is not None:
        check_positive("lr", lr)
    rng = make_rng(seed)
    ids, indices, stim_num = stimuli_arrays(stimuli)
    B = _align(neuron_embedding, ids)
    if not np.isfinite(B).all():
        raise ConceptEvoError("neuron_embedding has NaN/inf vectors; embed_images needs the learned base embedding "
                              "(embed_neurons), not a projected one")
    if responses is not None:
        responses = check_indices(responses, "responses")
        if responses.size and responses.max() >= len(ids):
            raise ConceptEvoError(f"responses names neuron row {int(responses.max())} but the base stimuli have "
                                  f"{len(ids)} neurons; compute responses with the base checkpoint's stimuli")
    max_index = int(indices.max()) if indices.size else -1
    num_images = _resolve_num_images(num_images, stim_num, responses, max_index)

    t0 = time.perf_counter()
    A, images, rows = stimulus_matrix(indices)
    if rows.size == 0:
        raise ConceptEvoError("the stimuli list no images; find stimuli before embedding images")
    if rows.size < len(ids):
        log.info("%d neurons have no stimulus image and are left out of J2", len(ids) - rows.size)
    dim = B.shape[1]
    # the solver's float64 arrays (about 3 per covered image, 2 per neuron) and the float32 result
    check_memory(dim * (8.0 * (3 * images.size + 2 * rows.size) + 4.0 * num_images),
                 f"an image embedding of {num_images} images in dim={dim}", "lower the embedding's dim (the paper uses 30)")
    Bn = B[rows]
    if method == "lstsq":
        cap = 20 * min(A.shape) + 100 if max_iter is None else max_iter
        W, sinfo = _solve_lstsq(A, Bn, tol, cap, progress)
    else:
        W, sinfo = _solve_gd(A, Bn, tol, 20000 if max_iter is None else max_iter, lr, gd_init, rng, progress)
    R = A @ W - Bn
    sq = float(np.sum(R * R))
    rmse = float(np.sqrt(sq / rows.size))              # per neuron (the paper's unit)
    norm_b = float(np.sqrt(np.sum(Bn * Bn)))
    relative = float(np.sqrt(sq) / norm_b) if norm_b > 0 else 0.0
    seconds = time.perf_counter() - t0

    dim = B.shape[1]
    vectors = np.full((num_images, dim), np.nan, dtype=np.float32)
    vectors[images] = W
    covered = np.zeros(num_images, dtype=bool)
    covered[images] = True
    filled = np.zeros(num_images, dtype=bool)
    if indirect and responses is not None:
        todo = np.flatnonzero(~covered)
        r = responses[todo]
        valid = r >= 0
        count = valid.sum(axis=1)
        row = np.repeat(np.arange(todo.size), r.shape[1])[valid.ravel()]
        weight = (1.0 / np.maximum(count, 1))[row]
        M = sp.csr_matrix((weight, (row, r.ravel()[valid.ravel()])), shape=(todo.size, len(ids)))
        ok = count > 0
        vectors[todo[ok]] = (M @ B)[ok]
        filled[todo[ok]] = True
    missing = int(num_images - covered.sum() - filled.sum())
    if missing:
        hint = ("pass responses=top_responses(...) for the whole pool" if responses is None or not indirect
                else "their responses rows are empty (-1)")
        log.info("%d of %d images have no vector (NaN): %s", missing, num_images, hint)
    info = dict(method=method, j2=sq / (2 * rows.size), seconds=seconds, num_neurons=int(rows.size),
                num_covered=int(images.size), num_indirect=int(filled.sum()), tol=float(tol),
                relative_error=relative, rmse_per_coordinate=float(np.sqrt(sq / R.size)),
                determined="under" if images.size >= rows.size else "over", **sinfo)
    log.info("image embedding (%s): %d images by the indirect step, %.2fs; %s", method, filled.sum(), seconds,
             fit_summary(dict(info, rmse=rmse)))
    if method == "gd":
        info["gd_init"] = gd_init
    return ImageEmbedding(vectors, covered, rmse, filled, info)


#: Relative error below which the least-squares fit counts as exact.
EXACT = 1e-6


def fit_summary(record: dict) -> str:
    """One line on how well the image embedding fits, from its numbers (an ``info`` dict plus ``rmse``, or the
    pipeline's manifest record of the stage, which adds ``holdout_relative``/``holdout_self_match``)."""
    rmse = record.get("rmse")
    if not isinstance(rmse, (int, float)):
        return "error not recorded"
    if "relative_error" not in record:  # a workspace written before the error was per neuron
        return f"RMSE {rmse:.4f} per coordinate (an older workspace; rerun the study for the per-neuron error)"
    rel, n, c = record["relative_error"], record.get("num_neurons"), record.get("num_covered")
    shape = f"{c} covered images for {n} base neurons"
    if rel < EXACT:
        text = (f"exact fit ({shape}: underdetermined, so every base neuron is reproduced exactly and the error, "
                f"{rmse:.2g} per neuron, says nothing about faithfulness)"
                if record.get("determined") == "under" else f"exact fit ({shape}; error {rmse:.2g} per neuron)")
    else:
        text = (f"error per neuron {rmse:.4f}, {rel:.1%} of the neurons' norm ({shape}, "
                f"{'underdetermined' if record.get('determined') == 'under' else 'overdetermined'})")
    hold = record.get("holdout_relative")
    if isinstance(hold, (int, float)):
        text += (f"; base neurons held out of the fit land {hold:.2f} of a typical inter-neuron distance from their "
                 f"learned vectors (0 = exactly, ~1 = no better than a random neuron)")
        match = record.get("holdout_self_match")
        if isinstance(match, (int, float)):
            text += f", {match:.0%} of them nearer their own learned vector than any other neuron's"
    return text


__all__ = ["ImageEmbedding", "embed_images", "stimulus_matrix", "fit_summary"]
