"""Numbers the figures and the explorer share: groups, movement, diversity, curves, importance results.

Everything here reads a workspace and tolerates missing stages: a checkpoint
without a projection simply has no vectors (``None``), so callers can say what
is missing instead of failing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConceptEvoError
from ..io import load_npy, read_json
from ..units import layers_of

log = logging.getLogger(__name__)


def time_axis(ws) -> str:
    """``"epoch"`` when every checkpoint of every model has a known epoch, else ``"checkpoint"`` (positions)."""
    known = all(c.epoch is not None for m in ws.models for c in ws.checkpoints(m))
    return "epoch" if known else "checkpoint"


def checkpoint_times(ws, model: str) -> list[float]:
    """Each checkpoint's place on the time axis: its epoch, or its position when any epoch of the study is unknown.

    One axis for all models, so a model with epochs and one without are never
    drawn on two different scales as if they were one.
    """
    cks = ws.checkpoints(model)
    if time_axis(ws) == "epoch":
        return [float(c.epoch) for c in cks]
    return [float(i) for i in range(len(cks))]


def neuron_ids(ws, model: str, tag: str) -> list[str] | None:
    path = ws.stimuli_dir(model, tag) / "neurons.json"
    return read_json(path)["neuron_ids"] if path.exists() else None


def layer_index(ids) -> tuple[list[str], np.ndarray]:
    """The layers in order of first appearance and each neuron's layer position."""
    layers = layers_of(ids)
    order = list(dict.fromkeys(layers))
    pos = {name: i for i, name in enumerate(order)}
    return order, np.array([pos[l] for l in layers], dtype=np.int32)


def unified_vectors(ws) -> dict[tuple[str, str], np.ndarray | None]:
    """Every checkpoint's neurons in the unified space (``None`` where the projection is missing)."""
    out = {}
    for m in ws.models:
        for t in ws.tags(m):
            if ws.stage(f"projection/{m}/{t}") is not None and ws.projection_path(m, t).exists():
                # read the array directly (ws.projection would import the embedding code, numba and all)
                out[(m, t)] = np.asarray(load_npy(ws.projection_path(m, t)), dtype=np.float32)
            else:
                out[(m, t)] = None
    return out


def layouts(ws) -> dict[tuple[str, str], np.ndarray | None]:
    """Every checkpoint's 2-D coordinates (``None`` where the layout is missing)."""
    done = ws.stage("layout") is not None
    out = {}
    for m in ws.models:
        for t in ws.tags(m):
            # through the workspace's reader: a damaged file is a one-line DamagedFileError naming it
            out[(m, t)] = np.asarray(ws.layout(m, t), dtype=np.float32) if done and ws.layout_path(m, t).exists() else None
    return out


def kmeans_groups(vectors: dict, k: int = 8, seed: int = 0, max_fit: int = 20000) -> tuple[dict, np.ndarray | None]:
    """K-means on the unified space, fitted on every checkpoint's neurons together (paper Sec 4.2).

    Returns ``({(model, tag): int32 labels (-1 where the vector is not finite)}, centres)``.
    At most ``max_fit`` rows (a seeded sample) are used to fit; every row is labelled.
    """
    from ..alignment.space import fit_kmeans, nearest_centre  # scikit-learn and the alignment package: on call

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConceptEvoError(f"k (the number of K-means groups) must be a positive integer, got {k!r}")
    rows = [v[np.isfinite(v).all(1)] for v in vectors.values() if v is not None]
    allv = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
    if len(allv) == 0:
        return {key: None for key in vectors}, None
    centres = fit_kmeans(allv, min(k, len(allv)), seed=seed, max_fit=max_fit).cluster_centers_.astype(np.float32)
    return {key: None if v is None else nearest_centre(v, centres) for key, v in vectors.items()}, centres


def distance_moved(ws, vectors: dict) -> dict[tuple[str, str], np.ndarray | None]:
    """Per neuron, the Euclidean distance its vector moved since the model's previous checkpoint (NaN for the first)."""
    from ..diagnostics.metrics import row_distances  # the diagnostics package loads torch: on call

    out = {}
    for m in ws.models:
        prev = None
        for t in ws.tags(m):
            v = vectors.get((m, t))
            if v is None:
                out[(m, t)] = None
            elif prev is None or prev.shape != v.shape:
                out[(m, t)] = np.full(len(v), np.nan, dtype=np.float32)
            else:
                out[(m, t)] = row_distances(prev, v).astype(np.float32)
            prev = v
    return out


def diversity(vectors: np.ndarray) -> float:
    """Concept diversity (METHOD §9), the same definition as ``conceptevo diagnose``.

    See :func:`conceptevo.diagnostics.metrics.diversity` (Kozachenko-Leonenko kNN estimator per dimension).
    """
    from ..diagnostics.metrics import diversity as _diversity

    return _diversity(vectors)


def curves(ws, vectors: dict, moved: dict) -> dict[str, dict]:
    """Per model: time axis, training/test accuracy, diversity and drift (mean distance moved) per checkpoint."""
    out = {}
    for m in ws.models:
        cks = ws.checkpoints(m)
        rec = {"time": checkpoint_times(ws, m), "tags": [c.tag for c in cks]}
        for key in ("train_top1", "test_top1"):
            vals = [c.metrics.get(key) for c in cks]
            rec[key] = [None if v is None else float(v) for v in vals]
        rec["diversity"] = [None if vectors.get((m, c.tag)) is None else _finite(diversity(vectors[(m, c.tag)])) for c in cks]
        rec["drift"] = [None if moved.get((m, c.tag)) is None else _finite(np.nanmean(moved[(m, c.tag)]))
                        if np.isfinite(moved[(m, c.tag)]).any() else None for c in cks]
        out[m] = rec
    return out


def _finite(x):
    x = float(x)
    return x if np.isfinite(x) else None


@dataclass
class ImportanceResult:
    """One saved importance computation: model, stage from -> to, class, file."""

    model: str
    tag_from: str
    tag_to: str
    class_index: int
    path: Path

    def load(self):
        from ..importance import EvolutionImportance

        return EvolutionImportance.load(self.path)


def find_importance(ws) -> list[ImportanceResult]:
    """Importance results saved in the workspace, as ``importance/MODEL/FROM__TO/*.npz``.

    A manifest stage ``importance/...`` with params ``model``, ``from``, ``to``
    and ``class`` and info ``file`` is used when present; otherwise the path
    names model and stage, and the file its class.
    """
    found: dict[Path, ImportanceResult] = {}
    models = set(ws.models)
    for name, rec in ws.manifest.get("stages", {}).items():
        if not name.startswith("importance/") or not isinstance(rec, dict) or not rec.get("file"):
            continue
        p = (ws.path / rec["file"]).resolve()
        params = rec.get("params", {})
        if p.is_file() and p.is_relative_to(ws.path.resolve()) and params.get("model") in models:
            try:
                found[p] = ImportanceResult(params["model"], str(params["from"]), str(params["to"]), int(params["class"]), p)
            except (KeyError, TypeError, ValueError):
                continue
    root = ws.path / "importance"
    if root.is_dir():
        for p in sorted(root.glob("*/*/*.npz")):
            rp = p.resolve()
            if rp in found:
                continue
            model, stage = p.parent.parent.name, p.parent.name
            if model not in models or "__" not in stage:
                continue
            t0, _, t1 = stage.partition("__")
            tags = set(ws.tags(model))
            if t0 not in tags or t1 not in tags:
                continue
            try:
                with np.load(p, allow_pickle=False) as z:
                    cls = int(z["class_index"])
            except Exception as e:  # a corrupt file is reported, not fatal
                log.warning("skipping unreadable importance file %s (%s)", p, e)
                continue
            found[rp] = ImportanceResult(model, t0, t1, cls, rp)
    return sorted(found.values(), key=lambda r: (r.model, r.tag_from, r.tag_to, r.class_index))


def most_moving_neuron(ws, model: str, vectors: dict) -> str | None:
    """The neuron of ``model`` whose vector travelled the longest path over its checkpoints."""
    tags = [t for t in ws.tags(model) if vectors.get((model, t)) is not None]
    if len(tags) < 2:
        return None
    stack = np.stack([vectors[(model, t)] for t in tags])
    steps = np.linalg.norm(np.diff(stack, axis=0), axis=2)
    total = np.nansum(steps, axis=0)
    total[~np.isfinite(stack).all(axis=(0, 2))] = -1
    ids = neuron_ids(ws, model, tags[-1])
    return ids[int(np.argmax(total))] if ids else None
