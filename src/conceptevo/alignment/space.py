"""The unified space as one table of neurons, and K-means groups on it (paper Sec 4.2).

:func:`neuron_table` gathers every chosen checkpoint's neurons, with their
projected vectors (``v_n = mean of v_x over the neuron's stimuli``, the same
formula for the base checkpoint as for every other, so all sit in the space on
equal terms). :func:`kmeans_groups` clusters them, as the paper does to find
groups of neurons with similar concepts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ConceptEvoError
from ..units import layers_of

log = logging.getLogger(__name__)


@dataclass
class NeuronTable:
    """Neurons of several checkpoints in one space: row i is neuron ``neuron_ids[i]`` of ``models[i]`` at ``tags[i]``."""

    models: np.ndarray       # str [N]
    tags: np.ndarray         # str [N]
    neuron_ids: np.ndarray   # str [N]
    rows: np.ndarray         # int [N]: the neuron's row in its checkpoint's stimuli / projection
    vectors: np.ndarray      # float64 [N, dim]

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, mask) -> "NeuronTable":
        m = np.asarray(mask)
        return NeuronTable(self.models[m], self.tags[m], self.neuron_ids[m], self.rows[m], self.vectors[m])

    @property
    def layers(self) -> np.ndarray:
        return np.array(layers_of(self.neuron_ids))

    def checkpoints(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys(zip(self.models.tolist(), self.tags.tolist())))


def neuron_table(ws, checkpoints: list[tuple[str, str]] | None = None) -> NeuronTable:
    """Every neuron of ``checkpoints`` (default: all with a projection) with a finite vector."""
    if checkpoints is None:
        checkpoints = [(m, t) for m in ws.models for t in ws.tags(m) if ws.stage(f"projection/{m}/{t}") is not None]
    if not checkpoints:
        raise ConceptEvoError(f"the workspace {ws.path} has no projected checkpoints; run `conceptevo run` on its config first")
    parts = []
    for m, t in checkpoints:
        emb = ws.projection(m, t)
        v = np.asarray(emb.vectors, dtype=np.float64)
        ok = np.isfinite(v).all(axis=1)
        n = int(ok.sum())
        rows = np.flatnonzero(ok)
        parts.append((np.full(n, m, dtype=object), np.full(n, t, dtype=object),
                      np.asarray(emb.neuron_ids, dtype=object)[ok], rows, v[ok]))
    cat = lambda j: np.concatenate([p[j] for p in parts])  # noqa: E731
    return NeuronTable(cat(0).astype(str), cat(1).astype(str), cat(2).astype(str), cat(3).astype(np.int64), cat(4))


def fit_kmeans(vectors, n_groups: int, seed: int = 0, max_fit: int = 20000, n_init: int = 3):
    """A fitted scikit-learn ``KMeans`` on finite ``vectors`` ``[n, dim]`` (the one K-means of the library).

    Fitted in float64 on at most ``max_fit`` rows (a seeded sample); single-threaded below 200,000 rows,
    where thread pools cost more than they give.
    """
    from sklearn.cluster import KMeans

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of scikit-learn
        from contextlib import nullcontext as threadpool_limits
    v = np.asarray(vectors)
    rng = np.random.default_rng(seed)
    fit = v if len(v) <= max_fit else v[rng.choice(len(v), max_fit, replace=False)]
    with threadpool_limits(1 if len(fit) < 200_000 else None):
        return KMeans(n_clusters=int(n_groups), n_init=n_init, random_state=seed).fit(fit.astype(np.float64))


def nearest_centre(vectors, centres) -> np.ndarray:
    """int32 [n]: the nearest of ``centres`` to each row of ``vectors`` (-1 where the row is not finite)."""
    v = np.asarray(vectors)
    lab = np.full(len(v), -1, dtype=np.int32)
    ok = np.isfinite(v).all(1)
    if ok.any():
        d = ((v[ok, None, :] - centres[None]) ** 2).sum(-1)
        lab[ok] = d.argmin(1)
    return lab


def kmeans_groups(vectors, n_groups: int, seed: int = 0, max_fit: int = 20000) -> np.ndarray:
    """K-means labels (int [N]) of ``vectors`` with ``n_groups`` clusters (fitted on at most ``max_fit`` rows)."""
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 2:
        raise ConceptEvoError(f"n_groups (the number of K-means groups) must be an integer >= 2, got {n_groups!r}")
    v = np.asarray(vectors, dtype=np.float64)
    if len(v) < n_groups:
        raise ConceptEvoError(f"{len(v)} neurons cannot form {n_groups} K-means groups; lower n_groups")
    return fit_kmeans(v, n_groups, seed=seed, max_fit=max_fit, n_init=4).predict(v).astype(np.int64)


__all__ = ["NeuronTable", "neuron_table", "kmeans_groups", "fit_kmeans", "nearest_centre"]
