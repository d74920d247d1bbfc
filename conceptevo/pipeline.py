"""The whole ConceptEvo pipeline over a workspace, stage by stage, skipping finished stages.

stimuli (every checkpoint) -> base neuron embedding -> image responses -> image
embedding -> projection (every checkpoint) -> 2-D layout -> figure.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed as ddp
from .config import DataConfig, StudyConfig
from .data import open_dataset, sample_pool
from .errors import ConceptEvoError, check_device, suggest
from .io import hash_json, load_npy, save_npy
from .models import build_model, list_checkpoints, load_checkpoint
from .models.checkpoints import checkpoint_hash
from .stimuli import Stimuli, find_stimuli, top_responses
from .workspace import Workspace, WorkspaceLock

log = logging.getLogger(__name__)


def open_study_dataset(data: DataConfig | dict, split: str = "train"):
    """The dataset a study config names (``split`` 'train' or 'test')."""
    if isinstance(data, dict):
        data = data.get("data", data)
        data = DataConfig(**data)
    return open_dataset(data.kind, data.path, split=split, **data.options)


def study_pool(data: DataConfig):
    """The stimulus image pool: a seeded, class-balanced subset of the training split."""
    return sample_pool(open_study_dataset(data, "train"), data.pool, seed=data.seed)


def load_model(arch: str, options: dict, checkpoint_path, dataset, trust: bool = False) -> torch.nn.Module:
    """Build ``arch`` for ``dataset``'s image channels and classes, and load a checkpoint into it."""
    opts = dict(options)
    opts.setdefault("in_channels", int(dataset[0][0].shape[0]))
    opts.setdefault("num_classes", max(len(getattr(dataset, "classes", []) or []), int(np.max(dataset.targets)) + 1))
    model = build_model(arch, **opts)
    load_checkpoint(checkpoint_path, model, trust=trust)
    return model.eval()


class _Timer:
    """Log how long each stage took."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            log.info("%s: %.1f s", self.what, time.perf_counter() - self.t)


def run_study(config: StudyConfig, progress: bool = True, trust: bool = False) -> Workspace | None:
    """Run every stage of the study that is not already finished; return the workspace.

    Under ``torchrun`` (several processes), every rank shares the stimuli
    passes and rank 0 alone writes and runs the later stages; other ranks
    return None.
    """
    check_device(config.stimuli.device)
    ddp.init_from_env(config.stimuli.device)
    if not ddp.is_main():
        plan = ddp.broadcast_object(None)
        if plan is None:  # rank 0 stopped before the passes; its error says why
            raise ConceptEvoError(f"rank {ddp.rank()}: rank 0 stopped before the stimuli passes; see its error")
        _stimuli_stage(None, config, plan, progress, trust)
        ddp.barrier()
        return None
    state = {"plan_sent": False}
    try:
        with WorkspaceLock(Path(config.out)):
            # opened under the lock: a process that held it until now may have just rewritten the manifest
            ws = Workspace(config.out, create=True)
            ws._on_plan_sent = lambda: state.update(plan_sent=True)
            return _run(ws, config, progress, trust)
    except BaseException:
        if ddp.active() and not state["plan_sent"]:
            ddp.broadcast_object(None)  # release the other ranks waiting for the plan
        raise


def _plan(ws: Workspace, config: StudyConfig):
    """Record the study's checkpoints and base in the manifest; list the stimuli passes to run."""
    ws.set_config(config.to_dict())
    pool = study_pool(config.data)
    data_key = pool.fingerprint()
    num_images = len(pool.base) if hasattr(pool, "base") else len(pool)
    log.info("stimulus pool: %d images of %s", len(pool), getattr(pool, "name", "dataset"))
    models: dict[str, dict] = {}
    for m in config.models:
        rows = []
        for c in list_checkpoints(m.checkpoints):
            d = c.to_dict()
            d["sha256"] = checkpoint_hash(c.path)
            rows.append(d)
        models[m.name] = {"arch": m.arch, "options": m.options, "checkpoints": rows}
    base_model = config.base_model
    base_tags = [r["tag"] for r in models[base_model]["checkpoints"]]
    base_tag = base_tags[-1] if config.base.checkpoint == "last" else config.base.checkpoint
    if base_tag not in base_tags:
        raise ConceptEvoError(
            f"base checkpoint {base_tag!r} is not a checkpoint of {base_model}.{suggest(base_tag, base_tags)} "
            f"Checkpoints: {', '.join(base_tags)}"
        )
    ws.manifest["models"] = models
    ws.manifest["base"] = {"model": base_model, "tag": base_tag}
    ws.manifest["data"] = {"fingerprint": data_key, "pool": len(pool), "num_images": num_images}
    ws._flush()
    sp = config.stimuli
    params = {"k": sp.k, "layers": sp.layers}
    passes = []
    for m in config.models:
        for row in models[m.name]["checkpoints"]:
            key = hash_json([data_key, row["sha256"], m.arch, m.options, params])
            todo = not ws.is_done(f"stimuli/{m.name}/{row['tag']}", key)
            passes.append({"model": m.name, "arch": m.arch, "options": m.options, "tag": row["tag"],
                           "path": row["path"], "key": key, "todo": todo})
    return pool, num_images, models, (base_model, base_tag), passes


def _stimuli_stage(ws: Workspace | None, config: StudyConfig, passes: list[dict], progress: bool, trust: bool, pool=None) -> None:
    """Stimuli of every checkpoint still to do (all ranks take part; rank 0 writes)."""
    sp = config.stimuli
    if pool is None:
        pool = study_pool(config.data)
    num_images = len(pool.base) if hasattr(pool, "base") else len(pool)
    for p in passes:
        if not p["todo"]:
            continue
        with _Timer(f"stimuli {p['model']} {p['tag']}"):
            model = load_model(p["arch"], p["options"], p["path"], pool, trust=trust).to(sp.device)
            stim = find_stimuli(model, pool, k=sp.k, layers=sp.layers, batch_size=sp.batch_size, device=sp.device,
                                progress=progress, num_images=num_images, desc=f"stimuli {p['model']} {p['tag']}")
        if ws is not None:
            stim.save(ws.stimuli_dir(p["model"], p["tag"]))
            ws.finish(f"stimuli/{p['model']}/{p['tag']}", p["key"], {"k": sp.k, "layers": sp.layers}, neurons=len(stim))


def _run(ws: Workspace, config: StudyConfig, progress: bool, trust: bool) -> Workspace:
    pool, num_images, models, (base_model, base_tag), passes = _plan(ws, config)
    sp = config.stimuli
    # 1. stimuli of every checkpoint
    ddp.broadcast_object(passes)
    ws._on_plan_sent()
    _stimuli_stage(ws, config, passes, progress, trust, pool=pool)
    ddp.barrier()
    stim_keys = {(p["model"], p["tag"]): p["key"] for p in passes}

    # 2. base neuron embedding
    from .embedding import embed_images, embed_neurons, fit_summary

    ep = config.embedding
    base_stim = ws.stimuli(base_model, base_tag, mmap=False)
    emb_key = hash_json([stim_keys[(base_model, base_tag)], dataclasses.asdict(ep)])
    if not ws.is_done("embedding/neurons", emb_key):
        with _Timer("base neuron embedding"):
            emb = embed_neurons(base_stim, **dataclasses.asdict(ep), progress=progress)  # every [embedding] key
        emb.save(ws.path / "embedding" / "neurons")
        ws.finish("embedding/neurons", emb_key, dataclasses.asdict(ep), epochs_run=emb.epochs_run,
                  stop_reason=emb.config["stop_reason"])
    neuron_emb = ws.neuron_embedding()

    # 3. each pool image's most responsive base neurons (gives images outside the base stimuli a vector)
    ip = config.images
    resp_key = hash_json([stim_keys[(base_model, base_tag)], ip.top_responses])
    resp_path = ws.path / "embedding" / "responses.npy"
    if not ws.is_done("embedding/responses", resp_key):
        row = next(r for r in models[base_model]["checkpoints"] if r["tag"] == base_tag)
        mc = next(m for m in config.models if m.name == base_model)
        model = load_model(mc.arch, mc.options, row["path"], pool, trust=trust).to(sp.device)
        resp = top_responses(model, pool, base_stim, top=ip.top_responses, batch_size=sp.batch_size,
                             device=sp.device, progress=progress, num_images=num_images)
        save_npy(resp_path, resp)
        ws.finish("embedding/responses", resp_key, {"top_responses": ip.top_responses})
    responses = load_npy(resp_path)

    # 4. image embedding
    img_key = hash_json([emb_key, resp_key])
    if not ws.is_done("embedding/images", img_key):
        with _Timer("image embedding"):
            img = embed_images(base_stim, neuron_emb, num_images=num_images, responses=responses, seed=ep.seed)
        img.save(ws.path / "embedding" / "images")
        fit = {key: img.info[key] for key in ("relative_error", "num_neurons", "num_covered", "determined")}
        if len(base_stim.neuron_ids) >= 10:  # faithfulness to base neurons the fit did not see (the error cannot say)
            from .projection import holdout_fidelity

            quiet = logging.getLogger("conceptevo.embedding.images")   # the held-out fit's own lines would read
            level = quiet.level                                           # as a second image embedding
            quiet.setLevel(logging.WARNING)
            try:
                hold = holdout_fidelity(base_stim, neuron_emb, fraction=0.2, seed=ep.seed, responses=responses)
            finally:
                quiet.setLevel(level)
            fit.update(holdout_relative=hold["relative_mean"], holdout_self_match=hold["self_match"])
        ws.finish("embedding/images", img_key, {}, rmse=float(img.rmse), **fit)
        log.info("image embedding: %s", fit_summary(ws.stage("embedding/images")))
    image_emb = ws.image_embedding()

    # 5. projection of every checkpoint
    from .projection import project

    proj_keys = []
    for m in config.models:
        for row in models[m.name]["checkpoints"]:
            name = f"projection/{m.name}/{row['tag']}"
            key = hash_json([stim_keys[(m.name, row["tag"])], img_key])
            proj_keys.append(key)
            if ws.is_done(name, key):
                continue
            vecs = project(ws.stimuli(m.name, row["tag"], mmap=False), image_emb).vectors
            save_npy(ws.projection_path(m.name, row["tag"]), vecs)
            ws.finish(name, key)

    # 6. 2-D layout: UMAP fitted on the base embedding, transform for every checkpoint
    lp = config.layout
    lay_key = hash_json([emb_key, proj_keys, dataclasses.asdict(lp)])
    if not ws.is_done("layout", lay_key):
        from .projection import fit_layout

        with _Timer(f"{lp.method.upper()} fit on the base embedding"):
            layout = fit_layout(neuron_emb.vectors, seed=lp.seed, n_neighbors=lp.n_neighbors, min_dist=lp.min_dist, method=lp.method)
        save_npy(ws.path / "layout" / "base_learned.npy", layout.base_xy)
        for m in config.models:
            for row in models[m.name]["checkpoints"]:
                save_npy(ws.layout_path(m.name, row["tag"]), layout.transform(ws.projection(m.name, row["tag"]).vectors))
        ws.finish("layout", lay_key, dataclasses.asdict(lp))

    # 7. example patches of every neuron at every checkpoint (from the recorded argmax positions; no data pass)
    from .patches import compute_patches

    with _Timer("example patches"):
        compute_patches(ws, progress=progress, trust=trust)

    # 8. the pictures: the space per checkpoint side by side (Fig 2), neuron groups (Fig 1), an evolution (Fig 3)
    from .report import make_figures

    fig_key = hash_json([lay_key, [ws.stage(n)["key"] for n in sorted(ws.manifest["stages"]) if n.startswith("patches/")]])
    if not ws.is_done("figures", fig_key):
        with _Timer("figures"):
            paths = make_figures(ws)
        ws.finish("figures", fig_key, files=[str(Path(p).relative_to(ws.path)) for p in paths])
    return ws
