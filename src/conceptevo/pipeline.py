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
from .errors import ConceptEvoError, check_device, check_memory, suggest
from .io import hash_json, load_npy, save_npy
from .models import build_model, list_checkpoints, load_checkpoint, validate_checkpoints
from .models.checkpoints import checkpoint_hash
from .stimuli import Stimuli, find_stimuli, top_responses
from .workspace import Workspace, WorkspaceLock

log = logging.getLogger(__name__)


def _data_config(data: DataConfig | dict) -> DataConfig:
    if isinstance(data, dict):
        data = data.get("data", data)
        data = DataConfig(**data)
    return data


def open_study_images(data: DataConfig | dict):
    """The training images a study config names, all of them: stimulus indices are positions in this dataset.

    With ``holdout`` it includes the held-out images too; use
    :func:`open_study_dataset` for the training or test split.
    """
    data = _data_config(data)
    return open_dataset(data.kind, data.path, split="train", **data.dataset_options())


def holdout_split(targets, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) positions: a seeded ``fraction`` of every class held out (at least one image of a class of two or more)."""
    targets = np.asarray(targets)
    rng = np.random.default_rng([seed, 1])  # its own stream: the pool's sample (seed) must not follow the split
    held = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        take = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
        held.append(rng.choice(idx, size=take, replace=False))
    held = np.sort(np.concatenate(held)).astype(np.int64)
    kept = np.setdiff1d(np.arange(len(targets)), held).astype(np.int64)
    return kept, held


def open_study_dataset(data: DataConfig | dict, split: str = "train"):
    """The dataset a study config names (``split`` 'train' or 'test').

    With ``holdout`` both splits are subsets of the training images (a seeded,
    class-stratified split); their items keep the image's index in
    :func:`open_study_images`. The test split is numbered with the training
    split's classes, so a class missing from one split cannot shift the others.
    """
    from .data import Subset

    data = _data_config(data)
    if data.holdout is not None:
        if split not in ("train", "test"):
            raise ConceptEvoError(f"unknown split {split!r}; use 'train' or 'test'")
        full = open_study_images(data)
        kept, held = holdout_split(full.targets, data.holdout, data.seed)
        sub = Subset(full, kept if split == "train" else held)
        sub.name = f"{full.name} {split} ({'held-out ' if split == 'test' else ''}{len(sub)} of {len(full)})"
        return sub
    if split == "train":
        return open_study_images(data)
    options = data.dataset_options()
    if data.kind == "folder" and "classes" not in options and "class_to_idx" not in options:
        options["classes"] = open_study_images(data).classes
    return open_dataset(data.kind, data.path, split=split, **options)


def study_pool(data: DataConfig):
    """The stimulus image pool: a seeded, class-balanced subset of the training split (never of held-out images)."""
    return sample_pool(open_study_dataset(data, "train"), data.pool, seed=data.seed)


def model_defaults(dataset) -> dict:
    """``in_channels`` and ``num_classes`` for a model of ``dataset``'s inputs and classes (model options override them)."""
    return {"in_channels": int(dataset[0][0].shape[0]),
            "num_classes": max(len(getattr(dataset, "classes", []) or []), int(np.max(dataset.targets)) + 1)}


def load_model(arch: str, options: dict, checkpoint_path, dataset, trust: bool = False, prefix: str | None = None,
               key: str | None = None, import_path=None) -> torch.nn.Module:
    """Build ``arch`` for ``dataset``'s image channels and classes, and load a checkpoint into it.

    ``prefix``, ``key``, ``import_path``: a model's ``loading`` settings (see
    :class:`~conceptevo.config.ModelConfig`; the workspace records them as ``models[NAME]["load"]``).
    """
    model = build_for_dataset(arch, options, dataset, import_path=import_path)
    load_checkpoint(checkpoint_path, model, trust=trust, prefix=prefix, key=key)
    return model.eval()


def build_for_dataset(arch: str, options: dict, dataset, import_path=None) -> torch.nn.Module:
    """``arch`` built for ``dataset``'s image channels and classes (unless ``options`` set them), untrained."""
    return build_model(arch, import_path=import_path, **{**model_defaults(dataset), **options})


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


def run_study(config: StudyConfig, progress: bool = True, trust: bool = False, allow_chance: bool = False) -> Workspace | None:
    """Run every stage of the study that is not already finished; return the workspace.

    Before the heavy passes, each model's last checkpoint must score above
    chance on a sample of the pool (see :mod:`conceptevo.preflight`);
    ``allow_chance`` (or a model's ``allow_chance``) lets an at-chance model through.

    Under ``torchrun`` (several processes), every rank shares the stimuli
    passes and rank 0 alone writes and runs the later stages; other ranks
    return None.
    """
    from .preflight import resolve_channels

    check_device(config.stimuli.device)
    config = resolve_channels(config, trust)  # on every rank: each opens the data the same way
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
            return _run(ws, config, progress, trust, allow_chance)
    except BaseException:
        if ddp.active() and not state["plan_sent"]:
            ddp.broadcast_object(None)  # release the other ranks waiting for the plan
        raise


def _plan(ws: Workspace, config: StudyConfig, trust: bool = False):
    """Record the study's checkpoints and base in the manifest; list the stimuli passes to run.

    Every checkpoint is read and checked against its architecture here, before any heavy pass.
    """
    ws.set_config(config.to_dict())
    pool = study_pool(config.data)
    data_key = pool.fingerprint()
    num_images = len(pool.base) if hasattr(pool, "base") else len(pool)
    log.info("stimulus pool: %d of the %d images of %s%s", len(pool), num_images,
             getattr(getattr(pool, "base", pool), "name", "the dataset"),
             " (a seeded, class-balanced sample)" if len(pool) < num_images else "")
    # before any pass: the image embedding alone holds a float32 vector per image
    check_memory(4.0 * num_images * config.embedding.dim, f"embedding.dim = {config.embedding.dim} (for {num_images} images)",
                 "lower embedding.dim (the paper uses 30)")
    models: dict[str, dict] = {}
    for m in config.models:
        rows = []
        cks = list_checkpoints(m.checkpoints)
        validate_checkpoints([c.path for c in cks], lambda m=m: build_for_dataset(m.arch, m.options, pool, m.import_path),
                             trust=trust, prefix=m.prefix, key=m.key, name=f"model {m.name!r}")
        for c in cks:
            d = c.to_dict()
            d["sha256"] = checkpoint_hash(c.path)
            rows.append(d)
        models[m.name] = {"arch": m.arch, "options": m.options, "checkpoints": rows, "load": m.loading()}
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
    params = {"k": sp.k, "layers": sp.layers} | ({"channel_axis": sp.channel_axis} if sp.channel_axis is not None else {})
    passes = []
    for m in config.models:
        which = {k: v for k, v in m.loading().items() if k != "import_path"}  # which weights of the file (prefix, key)
        for row in models[m.name]["checkpoints"]:
            key = hash_json([data_key, row["sha256"], m.arch, m.options, params] + ([which] if which else []))
            todo = not ws.is_done(f"stimuli/{m.name}/{row['tag']}", key)
            passes.append({"model": m.name, "arch": m.arch, "options": m.options, "tag": row["tag"],
                           "path": row["path"], "key": key, "todo": todo, "load": m.loading()})
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
            model = load_model(p["arch"], p["options"], p["path"], pool, trust=trust, **p.get("load", {})).to(sp.device)
            stim = find_stimuli(model, pool, k=sp.k, layers=sp.layers, batch_size=sp.batch_size, device=sp.device,
                                progress=progress, num_images=num_images, desc=f"stimuli {p['model']} {p['tag']}",
                                channel_axis=sp.channel_axis)
        if ws is not None:
            stim.save(ws.stimuli_dir(p["model"], p["tag"]))
            ws.finish(f"stimuli/{p['model']}/{p['tag']}", p["key"], {"k": sp.k, "layers": sp.layers}, neurons=len(stim))


def _record_data(ws: Workspace, config: StudyConfig, pool) -> None:
    """Log the class mapping and the test split; record the preprocessing, classes and split in the manifest."""
    from .preflight import check_test_split, describe_classes

    data = config.data
    log.info(describe_classes(pool, explicit=data.classes is not None))
    base = pool.base if hasattr(pool, "base") else pool
    pp = getattr(base, "preprocess", None)
    info = {"classes": list(getattr(pool, "classes", []) or []), "preprocess": pp.describe() if pp is not None else {},
            "input_shape": [int(s) for s in pool[0][0].shape], "test": check_test_split(config)}
    if data.holdout is not None:
        held = np.asarray(open_study_dataset(data, "test").indices, dtype=np.int64)
        save_npy(ws.path / "data" / "heldout.npy", held)
        info["holdout"] = {"fraction": data.holdout, "seed": data.seed, "images": int(len(held)),
                           "file": "data/heldout.npy", "key": hash_json(held.tolist())}
        log.info("test split: %d held-out images of %d (holdout %g, seed %d); the pool comes from the others",
                 len(held), len(base), data.holdout, data.seed)
    ws.manifest["data"].update(info)
    ws._flush()


def _run(ws: Workspace, config: StudyConfig, progress: bool, trust: bool, allow_chance: bool = False) -> Workspace:
    from .preflight import sanity_check

    pool, num_images, models, (base_model, base_tag), passes = _plan(ws, config, trust)
    _record_data(ws, config, pool)
    sanity_check(ws, config, pool, models, trust=trust, allow_chance=allow_chance)
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
        model = load_model(mc.arch, mc.options, row["path"], pool, trust=trust, **mc.loading()).to(sp.device)
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
