"""Layer-level comparison of checkpoints and models: linear CKA, beside the neuron-level unified space.

**Linear CKA** (centered kernel alignment, Kornblith et al. 2019) between two
layers, from their responses ``X [n, p]`` and ``Y [n, q]`` to the same n images::

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)        (Xc, Yc: columns centred)

A layer's response to an image is each neuron's strength (the maximum of its
activation map, as for stimuli), so a layer of C neurons gives ``[n, C]``.
CKA is 1 for layers equal up to rotation and isotropic scaling.

**The unified space's layer similarity** uses only the neurons' vectors: the
symmetric mean nearest-neighbour (Chamfer) distance between the two layers'
neuron vectors, divided by the mean distance between vectors of all neurons of
both checkpoints; ``similarity = 1 - that ratio`` (near 1 when every neuron of
one layer has a near twin in the other).

:func:`compare_checkpoints` gives both ``[layers_a, layers_b]`` matrices, their
Spearman rank correlation (do the two views order layer pairs alike?), and,
layer by layer, whether both views pick the same best-matching layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..data.loader import iter_batches
from ..errors import ConceptEvoError
from ..hooks import capture, eval_mode
from ..layers import resolve_layers
from ..units import rows_by_layer, strength


def linear_cka(X, Y) -> float:
    """Linear CKA of two response matrices over the same images (rows)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ConceptEvoError(f"CKA needs [images, features] matrices over the same images, got {X.shape} and {Y.shape}")
    if X.shape[0] < 2:
        raise ConceptEvoError("CKA needs at least 2 images")
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    num = np.linalg.norm(Y.T @ X) ** 2
    den = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    return float(num / den) if den > 0 else float("nan")


@torch.no_grad()
def layer_responses(model, dataset, layers=None, positions=None, batch_size: int = 256, device="cpu") -> dict[str, np.ndarray]:
    """Per layer, every neuron's strength (max over its activation map) on the images: ``[n, C]`` float64."""
    names = resolve_layers(model, layers)
    out: dict[str, list] = {n: [] for n in names}
    reduce = lambda name, o: strength(o).double().cpu()  # noqa: E731
    with eval_mode(model), capture(model, names, reduce) as got:
        for images, _, _ in iter_batches(dataset, batch_size, positions=positions):
            got.clear()
            model(images.to(device))
            got.require_all()
            for n in names:
                out[n].append(got[n].numpy())
    return {n: np.concatenate(v) for n, v in out.items()}


def cka_matrix(resp_a: dict[str, np.ndarray], resp_b: dict[str, np.ndarray]) -> np.ndarray:
    """``[len(resp_a), len(resp_b)]`` linear CKA of every pair of layers."""
    return np.array([[linear_cka(xa, xb) for xb in resp_b.values()] for xa in resp_a.values()])


def _by_layer(ids, vectors) -> dict[str, np.ndarray]:
    out = rows_by_layer(ids)
    v = np.asarray(vectors, dtype=np.float64)
    return {layer: v[rows][np.isfinite(v[rows]).all(axis=1)] for layer, rows in out.items()}


def _pairwise(a, b):
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def space_similarity_matrix(emb_a, emb_b) -> tuple[np.ndarray, list[str], list[str]]:
    """Unified-space layer similarity (module docstring) of two checkpoints' NeuronEmbeddings."""
    la, lb = _by_layer(emb_a.neuron_ids, emb_a.vectors), _by_layer(emb_b.neuron_ids, emb_b.vectors)
    allv = np.concatenate([*la.values(), *lb.values()])
    if len(allv) < 2:
        raise ConceptEvoError("the two checkpoints have fewer than 2 neurons with finite vectors")
    rng = np.random.default_rng(0)
    s = allv[rng.choice(len(allv), size=min(len(allv), 2000), replace=False)]
    d = _pairwise(s, s)
    typical = float(d[np.triu_indices(len(s), 1)].mean())
    M = np.full((len(la), len(lb)), np.nan)
    for i, va in enumerate(la.values()):
        for j, vb in enumerate(lb.values()):
            if len(va) and len(vb):
                D = _pairwise(va, vb)
                chamfer = 0.5 * (D.min(axis=1).mean() + D.min(axis=0).mean())
                M[i, j] = 1.0 - chamfer / typical
    return M, list(la), list(lb)


@dataclass
class LayerComparison:
    """Both layer-level views of one pair of checkpoints."""

    a: tuple[str, str]
    b: tuple[str, str]
    layers_a: list[str]
    layers_b: list[str]
    cka: list                       # [la][lb]
    space: list                     # [la][lb]
    spearman: float                 # rank correlation of the two matrices' entries
    same_best: float                # share of layers of a whose best match in b is the same in both views
    diagonal_cka: float | None = None      # mean over same-named layers (same architecture)
    diagonal_space: float | None = None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compare_checkpoints(a: tuple[str, str], b: tuple[str, str], resp_a, resp_b, emb_a, emb_b) -> LayerComparison:
    """CKA and unified-space layer similarity of two checkpoints, and how far they agree."""
    from scipy.stats import spearmanr

    C = cka_matrix(resp_a, resp_b)
    S, la, lb = space_similarity_matrix(emb_a, emb_b)
    if list(resp_a) != la or list(resp_b) != lb:
        # align the space matrix to the response layers' order
        ia = [la.index(n) for n in resp_a]
        ib = [lb.index(n) for n in resp_b]
        S = S[np.ix_(ia, ib)]
        la, lb = list(resp_a), list(resp_b)
    ok = np.isfinite(C) & np.isfinite(S)
    rho = float(spearmanr(C[ok], S[ok]).statistic) if ok.sum() > 2 else float("nan")
    same = float(np.mean(np.nanargmax(C, axis=1) == np.nanargmax(S, axis=1)))
    diag_c = diag_s = None
    if la == lb:
        diag_c, diag_s = float(np.nanmean(np.diag(C))), float(np.nanmean(np.diag(S)))
    return LayerComparison(a, b, la, lb, C.tolist(), S.tolist(), rho, same, diag_c, diag_s)


__all__ = ["linear_cka", "layer_responses", "cka_matrix", "space_similarity_matrix", "LayerComparison",
           "compare_checkpoints"]
