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

from . import distributed as ddp
from .config import StudyConfig
from .contexts import compute_contexts
from .embedding import NeuronEmbedding, embed_images, embed_neurons, fit_summary
from .errors import ConceptEvoError, check_device, check_memory, suggest
from .io import hash_json, load_npy, save_npy
from .models import list_checkpoints, validate_checkpoints
from .models.checkpoints import checkpoint_hash
from .patches import compute_patches
from .preflight import check_test_split, describe_classes, resolve_channels, sanity_check
from .projection import UnifiedSpace, fit_layout, holdout_fidelity
from .report import make_figures
from .report.text import make_text_figures
from .stimuli import Stimuli, find_stimuli, top_responses
from .study import (  # noqa: F401  (the study's inputs; importable from here as before)
    build_for_dataset, holdout_split, load_model, model_defaults, open_study_dataset, open_study_images, study_pool,
)
from .workspace import Workspace, WorkspaceLock

log = logging.getLogger(__name__)


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
            return _run(ws, config, progress, trust, allow_chance, on_plan_sent=lambda: state.update(plan_sent=True))
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
    text = config.data.kind == "text"
    log.info("stimulus pool: %d of the %d %s of %s%s", len(pool), num_images, "windows" if text else "images",
             getattr(getattr(pool, "base", pool), "name", "the dataset"),
             ("" if len(pool) == num_images else " (a seeded sample)" if text else " (a seeded, class-balanced sample)"))
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
    ws.record_study(models, (base_model, base_tag), {"fingerprint": data_key, "pool": len(pool), "num_images": num_images})
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
    data = config.data
    if data.kind != "text":  # a language model's "classes" are its vocabulary: nothing to check by eye
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
    ws.update_data(**info)


def _run(ws: Workspace, config: StudyConfig, progress: bool, trust: bool, allow_chance: bool = False,
         on_plan_sent=lambda: None) -> Workspace:
    """Every stage on rank 0; ``on_plan_sent`` is called once the other ranks have the stimuli plan."""
    pool, num_images, models, base, passes = _plan(ws, config, trust)
    _record_data(ws, config, pool)
    sanity_check(ws, config, pool, models, trust=trust, allow_chance=allow_chance)
    # 1. stimuli of every checkpoint (every rank takes part)
    ddp.broadcast_object(passes)
    on_plan_sent()
    _stimuli_stage(ws, config, passes, progress, trust, pool=pool)
    ddp.barrier()
    stim_keys = {(p["model"], p["tag"]): p["key"] for p in passes}
    base_stim = ws.stimuli(*base, mmap=False)
    # 2-4. the base checkpoint's neuron embedding, each pool image's responses, the image embedding
    emb_key, neuron_emb = _neuron_embedding_stage(ws, config, base_stim, stim_keys[base], progress)
    resp_key, responses = _responses_stage(ws, config, models, base, base_stim, pool, num_images, stim_keys[base],
                                           progress, trust)
    img_key = _image_embedding_stage(ws, config, base_stim, neuron_emb, responses, num_images, emb_key, resp_key)
    # 5-6. every checkpoint in the unified space, and in its 2-D layout
    proj_keys = _projection_stage(ws, config, models, stim_keys, img_key, neuron_emb, responses)
    lay_key = _layout_stage(ws, config, models, neuron_emb, emb_key, proj_keys)
    # 7. example patches of every neuron at every checkpoint (from the recorded argmax positions; no data pass);
    # text: token contexts around the argmax tokens instead (conceptevo.contexts)
    text = config.data.kind == "text"
    with _Timer("token contexts" if text else "example patches"):
        if text:
            compute_contexts(ws, pool.base if hasattr(pool, "base") else pool)
        else:
            compute_patches(ws, progress=progress, trust=trust)
    # 8. the pictures: the space per checkpoint side by side (Fig 2), neuron groups (Fig 1), an evolution (Fig 3)
    _figures_stage(ws, lay_key, text=text)
    return ws


def _neuron_embedding_stage(ws: Workspace, config: StudyConfig, base_stim: Stimuli, stim_key: str,
                            progress: bool) -> tuple[str, NeuronEmbedding]:
    """The base checkpoint's neuron vectors, learned from its stimuli: (stage key, the vectors as saved)."""
    params = dataclasses.asdict(config.embedding)
    key = hash_json([stim_key, params])

    def write():
        with _Timer("base neuron embedding"):
            emb = embed_neurons(base_stim, **params, progress=progress)  # every [embedding] key
        emb.save(ws.path / "embedding" / "neurons")
        return {"epochs_run": emb.epochs_run, "stop_reason": emb.config["stop_reason"]}

    ws.run_stage("embedding/neurons", key, write, params)
    return key, ws.neuron_embedding()


def _responses_stage(ws: Workspace, config: StudyConfig, models: dict, base: tuple[str, str], base_stim: Stimuli, pool,
                     num_images: int, stim_key: str, progress: bool, trust: bool) -> tuple[str, np.ndarray]:
    """Each pool image's most responsive base neurons (gives images outside the base stimuli a vector):
    (stage key, ``[images, top]`` neuron rows)."""
    sp, top = config.stimuli, config.images.top_responses
    key = hash_json([stim_key, top])

    def write():
        base_model, base_tag = base
        row = next(r for r in models[base_model]["checkpoints"] if r["tag"] == base_tag)
        mc = next(m for m in config.models if m.name == base_model)
        model = load_model(mc.arch, mc.options, row["path"], pool, trust=trust, **mc.loading()).to(sp.device)
        resp = top_responses(model, pool, base_stim, top=top, batch_size=sp.batch_size,
                             device=sp.device, progress=progress, num_images=num_images)
        save_npy(_responses_path(ws), resp)

    ws.run_stage("embedding/responses", key, write, {"top_responses": top})
    return key, load_npy(_responses_path(ws))


def _responses_path(ws: Workspace) -> Path:
    return ws.path / "embedding" / "responses.npy"


def _image_embedding_stage(ws: Workspace, config: StudyConfig, base_stim: Stimuli, neuron_emb: NeuronEmbedding,
                           responses: np.ndarray, num_images: int, emb_key: str, resp_key: str) -> str:
    """Image vectors fitted to the base neuron vectors, with held-out fidelity when there are neurons to spare."""
    seed = config.embedding.seed
    key = hash_json([emb_key, resp_key])

    def write():
        with _Timer("image embedding"):
            img = embed_images(base_stim, neuron_emb, num_images=num_images, responses=responses, seed=seed)
        img.save(ws.path / "embedding" / "images")
        fit = {k: img.info[k] for k in ("relative_error", "num_neurons", "num_covered", "determined")}
        if len(base_stim.neuron_ids) >= 10:  # faithfulness to base neurons the fit did not see (the error cannot say)
            quiet = logging.getLogger("conceptevo.embedding.images")   # the held-out fit's own lines would read
            level = quiet.level                                           # as a second image embedding
            quiet.setLevel(logging.WARNING)
            try:
                hold = holdout_fidelity(base_stim, neuron_emb, fraction=0.2, seed=seed, responses=responses)
            finally:
                quiet.setLevel(level)
            fit.update(holdout_relative=hold["relative_mean"], holdout_self_match=hold["self_match"])
        return {"rmse": float(img.rmse), **fit}

    if ws.run_stage("embedding/images", key, write, {}):
        log.info("image embedding: %s", fit_summary(ws.stage("embedding/images")))
    return key


def _checkpoints(config: StudyConfig, models: dict):
    """(model, tag) of every checkpoint of the study, in the config's order."""
    return [(m.name, row["tag"]) for m in config.models for row in models[m.name]["checkpoints"]]


def _projection_stage(ws: Workspace, config: StudyConfig, models: dict, stim_keys: dict, img_key: str,
                      neuron_emb: NeuronEmbedding, responses: np.ndarray) -> list[str]:
    """Every checkpoint's neurons projected into the unified space; returns the stages' keys."""
    space = UnifiedSpace.from_fitted(neuron_emb, ws.image_embedding(), responses, embedding=config.embedding,
                                     images=config.images)
    keys = []
    for m, tag in _checkpoints(config, models):
        key = hash_json([stim_keys[(m, tag)], img_key])
        keys.append(key)

        def write(m=m, tag=tag):
            save_npy(ws.projection_path(m, tag), space.transform(ws.stimuli(m, tag, mmap=False)).vectors)

        ws.run_stage(f"projection/{m}/{tag}", key, write)
    return keys


def _layout_stage(ws: Workspace, config: StudyConfig, models: dict, neuron_emb: NeuronEmbedding, emb_key: str,
                  proj_keys: list[str]) -> str:
    """The 2-D layout: UMAP (or PCA) fitted on the base embedding, transform for every checkpoint."""
    lp = config.layout
    key = hash_json([emb_key, proj_keys, dataclasses.asdict(lp)])

    def write():
        with _Timer(f"{lp.method.upper()} fit on the base embedding"):
            layout = fit_layout(neuron_emb.vectors, seed=lp.seed, n_neighbors=lp.n_neighbors,
                                min_dist=lp.min_dist, method=lp.method)
        save_npy(ws.path / "layout" / "base_learned.npy", layout.base_xy)
        for m, tag in _checkpoints(config, models):
            save_npy(ws.layout_path(m, tag), layout.transform(ws.projection(m, tag).vectors))

    ws.run_stage("layout", key, write, dataclasses.asdict(lp))
    return key


def _figures_stage(ws: Workspace, lay_key: str, text: bool = False) -> None:
    patch_keys = [ws.stage(n)["key"] for n in sorted(ws.manifest["stages"])
                  if n.startswith("contexts/" if text else "patches/")]

    def write():
        with _Timer("figures"):
            paths = make_text_figures(ws) if text else make_figures(ws)
        return {"files": [str(Path(p).relative_to(ws.path)) for p in paths]}

    ws.run_stage("figures", hash_json([lay_key, patch_keys]), write)
