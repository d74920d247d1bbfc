"""One shared 2-D frame for every checkpoint: UMAP fitted on the base embedding.

As the authors do, UMAP is fitted once on the base neurons' learned vectors and
every other checkpoint's projected vectors are placed with ``transform``, so all
checkpoints share one picture. ``umap`` is imported only when a layout is
fitted or loaded (the import takes seconds).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..embedding._util import check_int, check_nonnegative
from ..errors import ConceptEvoError
from ..io import atomic_path

log = logging.getLogger(__name__)


def _as_vectors(vectors, name: str) -> np.ndarray:
    arr = np.asarray(getattr(vectors, "vectors", vectors), dtype=np.float32)
    if arr.ndim != 2:
        raise ConceptEvoError(f"{name} must be a NeuronEmbedding or a [neurons, dim] array, got shape {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ConceptEvoError(f"{name} has {int(bad.sum())} rows with NaN/inf (e.g. row {int(np.flatnonzero(bad)[0])}); "
                              "drop neurons without stimuli before laying them out")
    return arr


class Layout2D:
    """A UMAP model fitted on the base embedding, and the base neurons' 2-D positions.

    Attributes
    ----------
    base_xy : float32 [N, 2]
        The base neurons' positions.
    neuron_ids : list[str] or None
        The base neurons' ids, when fitted from a NeuronEmbedding.
    params : dict
        ``seed``, ``n_neighbors``, ``min_dist`` used.
    """

    def __init__(self, model, base_xy, neuron_ids=None, params=None):
        self.model = model
        self.base_xy = np.asarray(base_xy, dtype=np.float32)
        self.neuron_ids = None if neuron_ids is None else [str(i) for i in neuron_ids]
        self.params = dict(params or {})

    @property
    def dim(self) -> int:
        """Dimension of the vectors the layout accepts."""
        return int(self.params["dim"])

    def transform(self, vectors) -> np.ndarray:
        """2-D positions (float32 ``[M, 2]``) of other vectors (a NeuronEmbedding or ``[M, dim]`` array)."""
        arr = _as_vectors(vectors, "vectors")
        if arr.shape[1] != self.dim:
            raise ConceptEvoError(f"vectors have dim {arr.shape[1]} but the layout was fitted on dim {self.dim}; "
                                  "project onto the same base space first")
        if len(arr) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        return np.asarray(self.model.transform(arr), dtype=np.float32)

    def save(self, path) -> None:
        """Pickle the layout (UMAP model included) to ``path`` with joblib.

        It is a pickle: load only files this library wrote.
        """
        import joblib

        with atomic_path(path) as tmp:
            joblib.dump({"model": self.model, "base_xy": self.base_xy, "neuron_ids": self.neuron_ids,
                         "params": self.params, "format": 1}, tmp)

    @classmethod
    def load(cls, path) -> "Layout2D":
        """Read what :meth:`save` wrote (a pickle: only files this library wrote)."""
        import joblib

        path = Path(path)
        if not path.exists():
            raise ConceptEvoError(f"no layout file at {path}; fit one with fit_layout(...).save(path)")
        d = joblib.load(path)
        return cls(d["model"], d["base_xy"], d.get("neuron_ids"), d.get("params"))


def fit_layout(base_vectors, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1, method: str = "umap") -> Layout2D:
    """Fit UMAP (euclidean) on the base embedding; ``method="pca"`` fits a 2-D PCA instead.

    PCA keeps the same contract (fitted on the base, ``transform`` for every
    other checkpoint) without UMAP's first-use compile (~35 s): the smoke-test
    demo uses it. UMAP separates concept clusters far better.

    Parameters
    ----------
    base_vectors : NeuronEmbedding or float array [N, dim]
        The base neurons' learned vectors.
    seed : int
        UMAP's ``random_state`` (makes it deterministic, and single-threaded).
    n_neighbors : int
        UMAP neighbourhood size (>= 2); lowered to N - 1 for tiny embeddings.
    min_dist : float
        UMAP ``min_dist``, in [0, 1].
    """
    check_int("n_neighbors", n_neighbors, 2)
    check_int("seed", seed, 0)
    min_dist = check_nonnegative("min_dist", min_dist)
    if min_dist > 1.0:
        raise ConceptEvoError(f"min_dist must be in [0, 1] (UMAP's spread is 1), got {min_dist!r}")
    X = _as_vectors(base_vectors, "base_vectors")
    if len(X) < 4:
        raise ConceptEvoError(f"a 2-D layout needs at least 4 base vectors, got {len(X)}")
    ids = getattr(base_vectors, "neuron_ids", None)
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(X)
        return Layout2D(pca, pca.transform(X).astype(np.float32), ids, {"method": "pca", "seed": seed, "dim": int(X.shape[1])})
    if method != "umap":
        raise ConceptEvoError(f"layout method must be 'umap' or 'pca', got {method!r}")
    if n_neighbors >= len(X):
        log.warning("n_neighbors=%d >= %d base vectors; using %d", n_neighbors, len(X), len(X) - 1)
        n_neighbors = len(X) - 1
    import umap

    model = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, n_components=2, metric="euclidean",
                      random_state=seed, n_jobs=1, init="spectral" if len(X) > 16 else "random")
    xy = model.fit_transform(X)
    return Layout2D(model, xy, ids, {"seed": seed, "n_neighbors": n_neighbors, "min_dist": min_dist,
                                     "dim": int(X.shape[1])})


__all__ = ["Layout2D", "fit_layout"]
