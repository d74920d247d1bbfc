"""`conceptevo importance` and `conceptevo evaluate-importance`: the workspace side of the importance package.

Results go into the workspace (recorded in its manifest, so the explorer can show them)::

    importance/MODEL/T__T2/class-C/  scores.csv, importance.npz, evolutions.png
    evaluation/MODEL/                table.md, table.csv, bars.png, STAGE.npz

Under ``torchrun`` every rank shares the computation (the class images are
sharded, see :mod:`conceptevo.distributed`); rank 0 alone writes and records
the result, and the other ranks wait for it so that every rank returns the
same paths and fails together.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .. import distributed as ddp
from ..data.base import display_image
from ..errors import ConceptEvoError, DatasetError, check_device, suggest
from ..io import hash_json, new_figure, save_figure
from ..patches import to_uint8_image
from ..contexts import require_images
from ..workspace import Workspace
from .milestones import parse_stages, stages_from_milestones
from .reversion import (
    combine_reversion, evaluate_reversion, plot_reversion_bars, write_reversion_csv, write_reversion_markdown,
)
from .scores import evolution_importance

log = logging.getLogger(__name__)


def _model(ws: Workspace, name: str, tag: str, dataset, device: str, trust: bool = False):
    return ws.load_model(name, tag, dataset, trust=trust).to(device)


def _layers(ws: Workspace):
    return ws.config.get("stimuli", {}).get("layers")


def _class_index(dataset, text) -> int:
    """A class by name (the model's numbering, as the study's [data] classes give it), or by index."""
    classes = list(getattr(dataset, "classes", []))
    if str(text) in classes:
        return classes.index(str(text))
    if isinstance(text, int) or str(text).lstrip("-").isdigit():
        return int(text)
    raise ConceptEvoError(f"unknown class {text!r}.{suggest(text, classes)} Give a class index or one of: {', '.join(classes)}")


def _written_by_rank0(write) -> None:
    """Rank 0 runs ``write`` (the files and the manifest record); the other ranks wait for its outcome.

    Waiting means every rank returns only once the files exist (a caller may
    read them) and a failure on rank 0 stops every rank with an error.
    """
    if not ddp.active():
        write()
        return
    if not ddp.is_main():
        if not ddp.broadcast_object(None):
            raise ConceptEvoError(f"rank {ddp.rank()}: rank 0 failed to write the results; see its error")
        return
    try:
        write()
    except BaseException:
        try:
            ddp.broadcast_object(False)
        except ConceptEvoError:
            pass  # the other ranks are gone too; rank 0's own error is the one to report
        raise
    ddp.broadcast_object(True)


def importance_command(workspace, model: str, tag_from: str, tag_to: str, class_name, top: int = 10, images: int = 128,
                       seed: int = 0, device: str = "cpu", progress: bool = True, examples: int = 5) -> dict:
    """Rank the evolutions t -> t' of every neuron of ``model`` for one class; write CSV, NPZ and the Fig-3 PNG."""
    check_device(device)
    ddp.init_from_env(device)
    ws = Workspace(workspace)
    require_images(ws, "neuron importance for a class (Eq 5-7) and its reversion evaluation")
    if tag_from == tag_to:
        raise ConceptEvoError(f"--from and --to are both {tag_from!r}; give two different checkpoints")
    ds = ws.dataset("train")
    c = _class_index(ds, class_name)
    m_from = _model(ws, model, tag_from, ds, device)
    m_to = _model(ws, model, tag_to, ds, device)
    imp = evolution_importance(m_from, m_to, ds, c, layers=_layers(ws), num_images=images, seed=seed, device=device, progress=progress,
                               channel_axis=ws.config.get("stimuli", {}).get("channel_axis"))
    out = ws.path / "importance" / model / f"{tag_from}__{tag_to}" / f"class-{c}"
    png = out / "evolutions.png"
    name = _class_name(ds, c)

    def write():
        imp.to_csv(out / "scores.csv", class_name=name)
        imp.save(out / "importance.npz")
        plot_evolutions(ws, model, tag_from, tag_to, imp, top=top, examples=examples, path=png, class_name=name)
        ws.finish(f"importance/{model}/{tag_from}__{tag_to}/class-{c}", hash_json([tag_from, tag_to, c, images, seed]),
                  {"model": model, "from": tag_from, "to": tag_to, "class": c, "class_name": name, "images": images, "seed": seed},
                  file=str((out / "importance.npz").relative_to(ws.path)),
                  files=[str(p.relative_to(ws.path)) for p in (out / "scores.csv", out / "importance.npz", png)])

    _written_by_rank0(write)
    return {"importance": imp, "png": png, "csv": out / "scores.csv", "class_index": c, "class_name": name}


def _class_name(ds, c: int) -> str:
    classes = list(getattr(ds, "classes", []))
    return classes[c] if c < len(classes) else str(c)


def plot_evolutions(ws: Workspace, model: str, tag_from: str, tag_to: str, imp, top: int, examples: int, path, class_name: str):
    """Fig 3's layout: for each top evolution, the neuron's stimuli at t, an arrow, its stimuli at t'.

    Returns the matplotlib ``Figure`` (no pyplot); writes it to ``path`` unless that is None.
    """
    ds = ws.images()  # by image index, as the stimuli record them
    s_from, s_to = ws.stimuli(model, tag_from), ws.stimuli(model, tag_to)
    row_of = {nid: i for i, nid in enumerate(s_from.neuron_ids)}
    ranked = imp.top(top)
    mean = dict(zip(imp.neuron_ids, imp.mean_sensitivity))
    ncol = 2 * examples + 1
    fig = new_figure(figsize=(0.9 * ncol, 1.0 * len(ranked) + 0.6))
    axes = fig.subplots(len(ranked), ncol, squeeze=False)
    for r, (nid, score) in enumerate(ranked):
        for side, stim in ((0, s_from), (1, s_to)):
            idx = np.asarray(stim.indices[row_of[nid]])[:examples]
            for j, i in enumerate(idx):
                ax = axes[r, j + side * (examples + 1)]
                img = to_uint8_image(display_image(ds, int(i)))  # as people see it, not mean/std-normalised
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=255)
                ax.set_xticks([]), ax.set_yticks([])
        mid = axes[r, examples]
        mid.axis("off")
        mid.text(0.5, 0.5, "→", ha="center", va="center", fontsize=16)
        axes[r, 0].set_ylabel(f"{nid}\nscore {score:.2f}\nmean S {float(mean[nid]):+.3g}", fontsize=6, rotation=0,
                              ha="right", va="center")
    title = f"{model}: evolutions {tag_from} → {tag_to} most important for '{class_name}' (score = share of images helped)"
    if imp.tie_note(top):
        title += "\nequal scores ranked by mean sensitivity S (mean first-order change of the class logit)"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi=120)
    return fig


def evaluate_command(workspace, model: str, stages: str = "auto", classes="all", repeats: int = 5, images: int = 128,
                     seed: int = 0, device: str = "cpu", progress: bool = True, milestones=(0.25, 0.5, 0.75)) -> dict:
    """Reversion evaluation (Table 1, Fig 6) of ``model``'s stages; writes the table and chart into the workspace.

    Each class is measured on a seeded sample of ``images`` of its training and of its test images.
    """
    check_device(device)
    ddp.init_from_env(device)
    ws = Workspace(workspace)
    require_images(ws, "neuron importance for a class (Eq 5-7) and its reversion evaluation")
    train = ws.dataset("train")
    try:
        test = ws.dataset("test")
    except DatasetError as e:
        raise DatasetError(f"evaluate-importance measures accuracy on held-out images, but {e}; or set [data] holdout = 0.2 "
                           "in the study's config to hold out a seeded fifth of the training images, and rerun "
                           "`conceptevo run` (the pool then changes, so every stage is recomputed)") from None
    cks = ws.checkpoints(model)
    if stages == "auto":
        pairs = stages_from_milestones([c.to_dict() for c in cks], milestones=milestones)
    else:
        pairs = parse_stages(stages)
    present = np.unique(np.asarray(train.targets)).tolist()  # classes with images (an explicit class order may name more)
    ncls = len(present)
    if classes == "all":
        class_list = present
    elif "," in str(classes) or not str(classes).strip().isdigit():
        class_list = [_class_index(train, c.strip()) for c in str(classes).split(",")]
    else:
        n = int(classes)
        if not 0 < n <= ncls:
            raise ConceptEvoError(f"--classes {n}: give 'all', a number between 1 and {ncls}, or a comma-separated list")
        class_list = sorted(np.random.default_rng(seed).choice(present, size=n, replace=False).tolist())
    results = []
    for t, t2 in pairs:
        m_from, m_to = _model(ws, model, t, train, device), _model(ws, model, t2, train, device)
        per_class = []
        for c in class_list:
            log.info("reversion %s %s -> %s, class %s", model, t, t2, _class_name(train, c))
            per_class.append(evaluate_reversion(m_from, m_to, train, test, c, layers=_layers(ws), num_images=images,
                                                num_test_images=images, repeats=repeats, seed=seed, device=device,
                                                stage=(t, t2), progress=progress,
                                                channel_axis=ws.config.get("stimuli", {}).get("channel_axis")))
        res = combine_reversion(per_class)
        if ddp.is_main():
            res.save(ws.path / "evaluation" / model / f"{t}__{t2}.npz")
        results.append(res)
    out = ws.path / "evaluation" / model
    md, csv, png = out / "table.md", out / "table.csv", out / "bars.png"
    claims = {f"{r.stage[0]}->{r.stage[1]}": {s: {k: v.to_dict() for k, v in r.check_claim(split=s).items()}
                                              for s in ("train", "test")} for r in results}

    def write():
        names = list(getattr(train, "classes", []) or [])
        write_reversion_markdown(md, results, class_names=names)
        write_reversion_csv(csv, results, class_names=names)
        plot_reversion_bars(png, results)
        ws.finish(f"evaluation/{model}", hash_json([pairs, class_list, repeats, images, seed]),
                  {"stages": pairs, "classes": class_list, "repeats": repeats, "images": images}, claims=claims,
                  files=[str(Path(p).relative_to(ws.path)) for p in (md, csv, png)])

    _written_by_rank0(write)
    return {"results": results, "markdown": Path(md), "csv": Path(csv), "png": Path(png), "claims": claims, "stages": pairs}
