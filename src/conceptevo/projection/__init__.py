"""Projection of any checkpoint's neurons onto the unified space (METHOD §6, Eq 2).

Every neuron, of the base checkpoint or any other, is placed at the mean of its
stimulus images' vectors: ``v_n = mean_{x in X_n} v_x``. Projecting the base
checkpoint itself and comparing with its learned vectors (:func:`fidelity`)
measures how faithful the space is. :class:`UnifiedSpace` is the whole space as
one estimator (``fit`` on the base stimuli, ``transform`` any checkpoint's,
``save``/``load``). :func:`fit_layout` gives all checkpoints one
shared 2-D frame (UMAP fitted on the base embedding, ``transform`` for the rest).
"""
from __future__ import annotations

import types

import numpy as np

from ..containers import NeuronEmbedding
from ..embedding._util import stimuli_arrays
from ..embedding.images import embed_images
from ..embedding.pairs import check_indices
from ..errors import ConceptEvoError
from .layout import Layout2D, fit_layout
from .space import UnifiedSpace, project



def _aligned(base: NeuronEmbedding, projected: NeuronEmbedding):
    if list(base.neuron_ids) == list(projected.neuron_ids):
        return np.asarray(base.vectors, np.float64), np.asarray(projected.vectors, np.float64)
    pos = {nid: i for i, nid in enumerate(projected.neuron_ids)}
    common = [i for i, nid in enumerate(base.neuron_ids) if nid in pos]
    if not common:
        raise ConceptEvoError("base and projected embeddings share no neuron id; project the base checkpoint's "
                              "own stimuli to measure fidelity")
    b = np.asarray(base.vectors, np.float64)[common]
    p = np.asarray(projected.vectors, np.float64)[[pos[base.neuron_ids[i]] for i in common]]
    return b, p


def _self_match(reference: np.ndarray, own: np.ndarray, queries: np.ndarray) -> float:
    """Share of queries whose nearest reference row is ``own[i]``."""
    rsq = (reference * reference).sum(1)
    hits = 0
    for start in range(0, len(queries), 1024):
        q = queries[start:start + 1024]
        dist = rsq[None, :] - 2 * q @ reference.T  # + |q|^2, constant per row
        hits += int(np.sum(dist.argmin(axis=1) == own[start:start + 1024]))
    return hits / max(len(queries), 1)


def fidelity(base_embedding: NeuronEmbedding, projected: NeuronEmbedding, sample: int = 2000,
             seed: int = 0) -> dict:
    """How close the base neurons' projected vectors are to their learned ones.

    Neurons are matched by id (those in both, with finite vectors). Returns a dict:

    ``mean_distance``, ``median_distance``
        Euclidean distance between a neuron's learned and projected vector.
    ``typical_distance``
        Mean distance between two different base neurons' learned vectors
        (estimated on up to ``sample`` neurons).
    ``relative_mean``, ``relative_median``
        The two above divided by ``typical_distance`` (0 = perfect, ~1 = no
        better than a random other neuron).
    ``self_match``
        Fraction of neurons whose projected vector is nearer to their own
        learned vector than to any other base neuron's.
    ``num_neurons``
        Neurons compared (those with a finite projected vector).
    """
    b, p = _aligned(base_embedding, projected)
    ok = np.isfinite(p).all(axis=1) & np.isfinite(b).all(axis=1)
    b, p = b[ok], p[ok]
    if len(b) < 2:
        raise ConceptEvoError("fidelity needs at least 2 neurons with finite learned and projected vectors")
    d = np.linalg.norm(b - p, axis=1)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(b), size=min(sample, len(b)), replace=False)
    s = b[pick]
    sq = (s * s).sum(1)
    pair = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * s @ s.T, 0.0))
    typical = float(pair[np.triu_indices(len(s), 1)].mean())
    return {
        "mean_distance": float(d.mean()),
        "median_distance": float(np.median(d)),
        "typical_distance": typical,
        "relative_mean": float(d.mean()) / typical,
        "relative_median": float(np.median(d)) / typical,
        "self_match": _self_match(b, np.arange(len(b)), p),
        "num_neurons": int(len(p)),
    }


def holdout_fidelity(stimuli, base_embedding: NeuronEmbedding, fraction: float = 0.2, seed: int = 0,
                     responses=None) -> dict:
    """Fidelity of the space for base neurons it was not fitted on.

    At the least-squares optimum the base neurons' own projections usually
    match their learned vectors exactly (there are more covered images than
    neurons), so :func:`fidelity` of the base checkpoint says little. Here a
    random ``fraction`` of the base neurons is held out: image vectors are
    fitted on the others (:func:`conceptevo.embedding.embed_images`, with
    ``responses`` if given: rows index ``stimuli``' neurons and are re-indexed
    to the fitted ones, held-out neurons dropped), the held-out neurons are
    projected as the mean of those of their stimulus images that have a vector,
    and compared with their learned vectors. Returns :func:`fidelity`'s keys
    (``self_match`` searched among *all* base neurons) plus ``coverage``: the
    mean share of a held-out neuron's stimulus images that had a vector, and
    ``projected``: the held-out neurons' projected NeuronEmbedding.
    """
    ids, indices, num_images = stimuli_arrays(stimuli)
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ConceptEvoError(f"fraction must be a number in (0, 1), got {fraction!r}") from None
    count = int(round(fraction * len(ids)))
    if not 0 < fraction < 1 or not 1 <= count < len(ids):
        raise ConceptEvoError(f"fraction must hold out between 1 and N-1 of the {len(ids)} neurons, got {fraction!r}")
    pos = {nid: i for i, nid in enumerate(base_embedding.neuron_ids)}
    missing = [nid for nid in ids if nid not in pos]
    if missing:
        raise ConceptEvoError(f"base_embedding has no vector for neuron {missing[0]!r}; pass the embedding "
                              "learned from these stimuli")
    learned = np.asarray(base_embedding.vectors, np.float64)[[pos[nid] for nid in ids]]
    held = np.zeros(len(ids), dtype=bool)
    held[np.random.default_rng(seed).choice(len(ids), size=count, replace=False)] = True
    if num_images is None:
        num_images = len(responses) if responses is not None else int(indices.max()) + 1
    fit = types.SimpleNamespace(neuron_ids=[i for i, h in zip(ids, held) if not h], indices=indices[~held],
                                num_images=num_images)
    if responses is not None:
        responses = check_indices(responses, "responses")
        if responses.size and responses.max() >= len(ids):
            raise ConceptEvoError(f"responses names neuron row {int(responses.max())} but the stimuli have "
                                  f"{len(ids)} neurons; compute responses with these stimuli")
        new_row = np.full(len(ids) + 1, -1, dtype=np.int64)   # last slot maps -1 to -1
        new_row[np.flatnonzero(~held)] = np.arange(int((~held).sum()))
        responses = new_row[np.asarray(responses, dtype=np.int64)]
    img = embed_images(fit, NeuronEmbedding(fit.neuron_ids, learned[~held]), responses=responses)
    V = img.vectors.astype(np.float64)
    projected = np.full((count, V.shape[1]), np.nan)
    coverage = np.zeros(count)
    for row, stim in enumerate(indices[held]):
        stim = np.unique(stim[(stim >= 0) & (stim < len(V))])
        ok = stim[~np.isnan(V[stim]).any(axis=1)]
        coverage[row] = ok.size / max(stim.size, 1)
        if ok.size:
            projected[row] = V[ok].mean(axis=0)
    held_ids = [i for i, h in zip(ids, held) if h]
    result = fidelity(NeuronEmbedding(ids, learned), NeuronEmbedding(held_ids, projected))
    good = np.isfinite(projected).all(axis=1)
    result["self_match"] = _self_match(learned, np.flatnonzero(held)[good], projected[good])
    result["coverage"] = float(coverage.mean())
    result["projected"] = NeuronEmbedding(held_ids, projected.astype(np.float32), config={"projected": True})
    return result


__all__ = ["UnifiedSpace", "project", "fidelity", "holdout_fidelity", "Layout2D", "fit_layout"]
