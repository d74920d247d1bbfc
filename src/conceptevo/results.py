"""A workspace from results held in memory: the figures and the explorer without a config.

:func:`workspace_from_results` (also :meth:`conceptevo.Workspace.from_results`)
writes what the API computed -- stimuli of every checkpoint, the base neuron
embedding, the image embedding -- into a workspace folder in the same format
``conceptevo run`` writes, then computes what the pictures need: every
checkpoint's projection onto the unified space, the shared 2-D layout (fitted
on the base embedding) and the example patches. The result opens with
:func:`conceptevo.make_figures`, :func:`conceptevo.explore`,
``conceptevo figures`` and ``conceptevo explore`` like any study.

Each stage is recorded with a key hashing its inputs' contents, so calling it
again with the same results rewrites nothing, and with changed results
recomputes only what changed. A workspace made by ``conceptevo run`` is never
overwritten.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import nn

from .data.base import Subset
from .embedding import ImageEmbedding, NeuronEmbedding
from .errors import ConceptEvoError, WorkspaceError
from .io import hash_json, save_npy
from .models.checkpoints import Checkpoint
from .patches import compute_patches
from .projection import UnifiedSpace, fit_layout
from .stimuli import Stimuli
from .workspace import Workspace, WorkspaceLock

log = logging.getLogger(__name__)

SOURCE = "python"


def _digest(*parts) -> str:
    """A short hash of arrays (by content) and JSON-able values."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(np.asarray(p))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _stimuli_key(stim) -> str:
    layers = [[i.name, int(i.channels), list(i.spatial)] for i in stim.layers]
    return _digest(list(stim.neuron_ids), layers, stim.num_images, stim.indices, stim.values, stim.positions)


def _checkpoint_rows(model: str, tags: list[str], given) -> list[dict]:
    """The manifest's checkpoint records of one model, in ``tags`` order, with what ``given`` says about each."""
    known = {}
    for c in given or []:
        if not isinstance(c, Checkpoint):
            if not isinstance(c, Mapping) or "tag" not in c:
                raise ConceptEvoError(f"checkpoints of {model!r} must be Checkpoint objects or dicts with a 'tag' "
                                      f"(and epoch, step, metrics, path), got {c!r}")
            c = Checkpoint.from_dict({"path": "", **dict(c)})
        known[c.tag] = c
    extra = sorted(set(known) - set(tags))
    if extra:
        raise ConceptEvoError(f"checkpoints of {model!r} name tag(s) {', '.join(map(repr, extra))} that have no stimuli; "
                              f"its stimuli have tags {', '.join(map(repr, tags))}")
    rows = []
    for t in tags:
        c = known.get(t, Checkpoint(tag=t, path=""))
        rows.append({"tag": t, "path": str(c.path or ""), "epoch": c.epoch, "step": c.step, "metrics": dict(c.metrics)})
    return rows


def _image_source(dataset):
    """The dataset whose item ``i`` is the image stimuli call ``i``: a conceptevo pool reads from its full dataset."""
    return dataset.base if isinstance(dataset, Subset) else dataset


def _saver(result, folder, **info):
    """A stage's ``write`` for a result that is computed already: save it into ``folder``; record ``info``."""
    def write():
        result.save(folder)
        return info
    return write


def _arch_name(net) -> str:
    cls = type(net)
    return f"{cls.__module__}:{cls.__qualname__}"


def workspace_from_results(path, stimuli, neuron_embedding, image_embedding, *, base, dataset, models,
                           checkpoints=None, layout: str = "umap", seed: int = 0, patches: bool = True,
                           progress: bool = False):
    """Write results computed in memory into the workspace folder ``path``; return the :class:`Workspace`.

    Parameters
    ----------
    stimuli : {model: {tag: Stimuli}}
        Every checkpoint's stimuli (:func:`conceptevo.find_stimuli`), per
        model, in training order (the order of each inner dict), all over one
        image pool. Model names and tags become folder names.
    neuron_embedding : NeuronEmbedding
        The base checkpoint's learned vectors (:func:`conceptevo.embed_neurons`).
    image_embedding : ImageEmbedding
        Image vectors (:func:`conceptevo.embed_images`, with ``responses`` so
        that every image has one).
    base : (model, tag)
        The checkpoint the embeddings were learned on.
    dataset : torch Dataset
        The images the stimuli were found in (for the example patches).
    models : {model: nn.Module}
        Each model's network at any checkpoint: its receptive fields place the
        example patches (they depend on the architecture, not on the weights).
    checkpoints : {model: [Checkpoint or dict]}, optional
        What is known about each checkpoint: ``tag`` and any of ``epoch``,
        ``step``, ``metrics`` (``train_top1`` is shown as accuracy), ``path``.
        :func:`conceptevo.list_checkpoints` gives such a list for a folder.
    layout : "umap" or "pca"
        The 2-D layout, fitted on the base embedding (:func:`conceptevo.fit_layout`).
    patches : bool
        Compute the example patches (needed by the figures of neuron groups
        and evolution, and by the explorer's pictures).
    """
    if not isinstance(stimuli, Mapping) or not stimuli:
        raise ConceptEvoError("stimuli must be a dict {model: {tag: Stimuli}} with at least one model")
    for m, per in stimuli.items():
        if not isinstance(per, Mapping) or not per:
            raise ConceptEvoError(f"stimuli[{m!r}] must be a dict {{tag: Stimuli}} with at least one checkpoint")
        for t, s in per.items():
            if not isinstance(s, Stimuli):
                raise ConceptEvoError(f"stimuli[{m!r}][{t!r}] is a {type(s).__name__}, not Stimuli (from find_stimuli)")
    if not isinstance(neuron_embedding, NeuronEmbedding):
        raise ConceptEvoError(f"neuron_embedding must be a NeuronEmbedding (from embed_neurons), got {type(neuron_embedding).__name__}")
    if not isinstance(image_embedding, ImageEmbedding):
        raise ConceptEvoError(f"image_embedding must be an ImageEmbedding (from embed_images), got {type(image_embedding).__name__}")
    space = UnifiedSpace.from_fitted(neuron_embedding, image_embedding)  # also checks that the two fit together
    try:
        base_model, base_tag = base
    except (TypeError, ValueError):
        raise ConceptEvoError(f"base must be a (model, tag) pair, got {base!r}") from None
    if base_model not in stimuli or base_tag not in stimuli[base_model]:
        raise ConceptEvoError(f"base {base!r} has no stimuli; give the (model, tag) of the checkpoint the embeddings were learned on")
    if set(neuron_embedding.neuron_ids) != set(stimuli[base_model][base_tag].neuron_ids):
        raise ConceptEvoError(f"neuron_embedding's neurons are not those of the base stimuli {base!r}; pass the embedding "
                              "learned from that checkpoint's stimuli")
    if patches:
        if not isinstance(models, Mapping) or set(models) != set(stimuli) \
                or not all(isinstance(net, nn.Module) for net in models.values()):
            raise ConceptEvoError(f"models must give one network per model ({', '.join(map(repr, stimuli))}) for the "
                                  "example patches' receptive fields; or pass patches=False")
        bare = [f"{m} {t}" for m, per in stimuli.items() for t, s in per.items() if not s.layers]
        if bare:
            raise ConceptEvoError(f"the stimuli of {bare[0]} carry no layer shapes (made with Stimuli.from_arrays?); "
                                  "example patches need stimuli from find_stimuli, or pass patches=False")
    manifest_models = {
        m: {"arch": _arch_name(models[m]) if isinstance(models, Mapping) and m in models else "",
            "options": {}, "checkpoints": _checkpoint_rows(m, list(per), (checkpoints or {}).get(m))}
        for m, per in stimuli.items()
    }
    path = Path(path)
    if (path / "manifest.json").exists():
        old = Workspace(path)
        if old.data_info.get("source") != SOURCE:
            raise WorkspaceError(f"{path} holds a study made by `conceptevo run`; write the results into a new folder")
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise WorkspaceError(f"{path} exists and is not an empty folder; give a new folder for the workspace")

    with WorkspaceLock(path):
        ws = Workspace(path, create=True)
        ws.set_config({})
        stim_keys = {(m, t): _stimuli_key(s) for m, per in stimuli.items() for t, s in per.items()}
        ws.record_study(manifest_models, (base_model, base_tag),
                        {"source": SOURCE, "fingerprint": _digest(image_embedding.covered),
                         "pool": int(len(dataset)), "num_images": image_embedding.num_images})
        for (m, t), key in stim_keys.items():
            ws.run_stage(f"stimuli/{m}/{t}", key, _saver(stimuli[m][t], ws.stimuli_dir(m, t), neurons=len(stimuli[m][t])),
                         {"k": stimuli[m][t].k})

        emb_key = _digest(neuron_embedding.neuron_ids, neuron_embedding.vectors)
        ws.run_stage("embedding/neurons", emb_key,
                     _saver(neuron_embedding, ws.path / "embedding" / "neurons", epochs_run=neuron_embedding.epochs_run),
                     dict(neuron_embedding.config))
        img_key = _digest(emb_key, image_embedding.vectors, image_embedding.covered)
        ws.run_stage("embedding/images", img_key,
                     _saver(image_embedding, ws.path / "embedding" / "images", rmse=float(image_embedding.rmse)), {})

        proj_keys = []
        for (m, t), skey in stim_keys.items():
            key = hash_json([skey, img_key])
            proj_keys.append(key)
            ws.run_stage(f"projection/{m}/{t}", key,
                         lambda m=m, t=t: save_npy(ws.projection_path(m, t), space.transform(stimuli[m][t]).vectors))

        def write_layout():
            fitted = fit_layout(neuron_embedding, seed=seed, method=layout)
            save_npy(ws.path / "layout" / "base_learned.npy", fitted.base_xy)
            for m, t in stim_keys:
                save_npy(ws.layout_path(m, t), fitted.transform(ws.projection(m, t).vectors))

        ws.run_stage("layout", hash_json([emb_key, proj_keys, layout, seed]), write_layout, {"method": layout, "seed": seed})

        if patches:
            compute_patches(ws, progress=progress, dataset=_image_source(dataset), networks=dict(models))
    return ws


__all__ = ["workspace_from_results"]
