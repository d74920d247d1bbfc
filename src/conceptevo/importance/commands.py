"""`conceptevo importance` and `conceptevo evaluate-importance`: the workspace side of the importance package.

Results go into the workspace (recorded in its manifest, so the explorer can show them)::

    importance/MODEL/T__T2/class-C/  scores.csv, importance.npz, evolutions.png
    evaluation/MODEL/                table.md, table.csv, bars.png, STAGE.npz

For a text study (``[data] kind = "text"``) a class is a target next token
or a set of them (:mod:`conceptevo.importance.targets`), results go to
``importance/MODEL/T__T2/target-NAME/`` and the evaluation adds log-loss.

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
from ..contexts import context_strings, is_text_workspace, load_contexts, workspace_tokenizer
from ..workspace import Workspace
from .milestones import parse_stages, stages_from_milestones
from .reversion import (
    combine_reversion, evaluate_reversion, plot_reversion_bars, write_reversion_csv, write_reversion_markdown,
)
from .scores import evolution_importance
from .targets import TargetOccurrences, next_token_outputs, parse_target, parse_targets, split_unescaped

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
    if tag_from == tag_to:
        raise ConceptEvoError(f"--from and --to are both {tag_from!r}; give two different checkpoints")
    if is_text_workspace(ws):
        return _text_importance(ws, model, tag_from, tag_to, class_name, top, images, seed, device, progress, examples)
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


def _text_importance(ws: Workspace, model: str, tag_from: str, tag_to: str, target: str, top: int, images: int,
                     seed: int, device: str, progress: bool, examples: int) -> dict:
    """:func:`importance_command` for a text study: ``target`` is a next token or a set (see
    :mod:`conceptevo.importance.targets`), studied at its occurrences in the training windows."""
    train = ws.dataset("train")
    tgt = parse_target(target, workspace_tokenizer(ws))
    occ = TargetOccurrences(train, tgt)
    m_from = _model(ws, model, tag_from, train, device)
    m_to = _model(ws, model, tag_to, train, device)
    log.info("target %s: %d occurrences in %d training windows", tgt.name, len(occ), len(train))
    with next_token_outputs(m_from, m_to):
        imp = evolution_importance(m_from, m_to, occ, 0, layers=_layers(ws), num_images=images, seed=seed, device=device,
                                   progress=progress, channel_axis=ws.config.get("stimuli", {}).get("channel_axis"))
    name = f"target-{tgt.slug}"
    out = ws.path / "importance" / model / f"{tag_from}__{tag_to}" / name
    png = out / "evolutions.png"

    def write():
        imp.to_csv(out / "scores.csv", class_name=tgt.name)
        imp.save(out / "importance.npz")
        plot_text_evolutions(ws, model, tag_from, tag_to, imp, top=top, examples=examples, path=png, class_name=tgt.name)
        ws.finish(f"importance/{model}/{tag_from}__{tag_to}/{name}", hash_json([tag_from, tag_to, list(tgt.ids), images, seed]),
                  {"model": model, "from": tag_from, "to": tag_to, "target": target, "target_ids": list(tgt.ids),
                   "class_name": tgt.name, "images": images, "seed": seed, "occurrences": len(occ)},
                  file=str((out / "importance.npz").relative_to(ws.path)),
                  files=[str(p.relative_to(ws.path)) for p in (out / "scores.csv", out / "importance.npz", png)])

    _written_by_rank0(write)
    return {"importance": imp, "png": png, "csv": out / "scores.csv", "class_index": 0, "class_name": tgt.name,
            "occurrences": occ}


def plot_text_evolutions(ws: Workspace, model: str, tag_from: str, tag_to: str, imp, top: int, examples: int, path,
                         class_name: str):
    """Fig 3 for text: for each top evolution, the unit's top contexts at t (left) and at t' (right), the argmax
    token in brackets. Returns the matplotlib ``Figure``; writes it to ``path`` unless that is None."""
    tk = workspace_tokenizer(ws)
    sides = []
    for tag in (tag_from, tag_to):
        st = ws.stimuli(model, tag)
        sides.append(({nid: i for i, nid in enumerate(st.neuron_ids)}, load_contexts(ws, model, tag)))
    ranked = imp.top(top)
    mean = dict(zip(imp.neuron_ids, imp.mean_sensitivity))
    fs = 6
    fig = new_figure(figsize=(11, 0.14 * (examples + 1.5) * len(ranked) + 0.7))
    axes = fig.subplots(len(ranked), 2, squeeze=False)
    for r, (nid, score) in enumerate(ranked):
        for side, ((row_of, ctx), tag) in enumerate(zip(sides, (tag_from, tag_to))):
            ax = axes[r, side]
            ax.set_axis_off()
            rows = ctx[row_of[nid]][:examples]
            parts = [context_strings(tk, c) for c in rows]
            pad = max((len(b) for b, _, _ in parts), default=0)  # argmax tokens in one column
            lines = [f"{b.rjust(pad)}[{t}]{a}" for b, t, a in parts]
            ax.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=fs, va="top", ha="left",
                    transform=ax.transAxes, parse_math=False)
            ax.set_title(f"{nid} at {tag}" + (f"   score {score:.2f}, mean S {float(mean[nid]):+.3g}" if side == 0 else ""),
                         fontsize=7, loc="left")
    title = (f"{model}: evolutions {tag_from} → {tag_to} most important for next token {class_name} "
             "(score = share of its occurrences whose log-probability the evolution raised); top contexts, argmax token in []")
    return _titled(fig, title, imp, top, "the log-probability", 7, path)


def _titled(fig, title: str, imp, top: int, what: str, fontsize: int, path):
    """The evolutions figure's title (with a note on how score ties were ranked), laid out and saved unless ``path`` is None."""
    if imp.tie_note(top):
        title += f"\nequal scores ranked by mean sensitivity S (mean first-order change of {what})"
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi=120)
    return fig


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
    return _titled(fig, title, imp, top, "the class logit", 8, path)


def evaluate_command(workspace, model: str, stages: str = "auto", classes="all", repeats: int = 5, images: int = 128,
                     seed: int = 0, device: str = "cpu", progress: bool = True, milestones=(0.25, 0.5, 0.75),
                     log_loss: bool = False) -> dict:
    """Reversion evaluation (Table 1, Fig 6) of ``model``'s stages; writes the table and chart into the workspace.

    Each class is measured on a seeded sample of ``images`` of its training and of its test images.
    ``log_loss`` adds the change of the true class's log-loss (cross-entropy) to the table; a text
    study always measures it.
    """
    check_device(device)
    ddp.init_from_env(device)
    ws = Workspace(workspace)
    if is_text_workspace(ws):
        return _text_evaluate(ws, model, stages, classes, repeats, images, seed, device, progress, milestones)
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
                                                channel_axis=ws.config.get("stimuli", {}).get("channel_axis"),
                                                log_loss=log_loss))
        res = combine_reversion(per_class)
        if ddp.is_main():
            res.save(ws.path / "evaluation" / model / f"{t}__{t2}.npz")
        results.append(res)
    r = _write_evaluation(ws, model, results, list(getattr(train, "classes", []) or []),
                          hash_json([pairs, class_list, repeats, images, seed]),
                          {"stages": pairs, "classes": class_list, "repeats": repeats, "images": images}, log_loss)
    return {**r, "stages": pairs}


def _claims(results, metric: str = "top1") -> dict:
    """The verdicts as the manifest records them: ``{"T->T2": {split: {claim: {answer, reason}}}}``."""
    return {f"{r.stage[0]}->{r.stage[1]}": {s: {k: v.to_dict() for k, v in r.check_claim(split=s, metric=metric).items()}
                                            for s in ("train", "test")} for r in results}


def _write_evaluation(ws: Workspace, model: str, results, class_names, key: str, params: dict, log_loss: bool) -> dict:
    """Write ``evaluation/MODEL/`` (table.md, table.csv, bars.png) on rank 0 and record it with its verdicts."""
    out = ws.path / "evaluation" / model
    md, csv, png = out / "table.md", out / "table.csv", out / "bars.png"
    claims = {"claims": _claims(results)}
    if log_loss:
        claims["claims_logloss"] = _claims(results, "logloss")

    def write():
        write_reversion_markdown(md, results, class_names=class_names)
        write_reversion_csv(csv, results, class_names=class_names)
        plot_reversion_bars(png, results)
        ws.finish(f"evaluation/{model}", key, params, **claims,
                  files=[str(Path(p).relative_to(ws.path)) for p in (md, csv, png)])

    _written_by_rank0(write)
    return {"results": results, "markdown": Path(md), "csv": Path(csv), "png": Path(png), **claims}


def _text_test_split(ws: Workspace):
    """The held-out windows of a text study, or None (with a note) when ``[data] holdout`` is not set."""
    if (ws.config.get("data") or {}).get("holdout") is None:
        log.warning("this text study has no held-out windows ([data] holdout is not set): the evaluation measures the "
                    "training windows only, and the test rows stay empty")
        return None
    return ws.dataset("test")


def loss_drop_shares(ws: Workspace, model: str, windows, sample: int = 64, seed: int = 0, device: str = "cpu") -> dict:
    """``{tag: share of the loss drop}``: each checkpoint's mean next-token log-loss on a seeded sample of
    ``sample`` windows, as the share of the drop from the first checkpoint's loss to the lowest one (0 at the
    first checkpoint, 1 at the best). What ``--stages auto`` picks text stages by, as accuracy milestones do for images."""
    import torch

    from ..data.loader import iter_batches
    from ..models.lm import lm_loss

    pos = np.sort(np.random.default_rng(seed).choice(len(windows), size=min(sample, len(windows)), replace=False))
    ids, nxt, _ = next(iter_batches(windows, len(pos), positions=pos))
    losses = {}
    for tag in ws.tags(model):
        m = _model(ws, model, tag, windows, device)
        with torch.no_grad():
            losses[tag] = float(lm_loss(m, ids.to(device), nxt.to(device)))
    first, best = next(iter(losses.values())), min(losses.values())
    if not first - best > 0:
        raise ConceptEvoError(f"{model}'s checkpoints never lower the loss of its first ({first:.3f}); choosing stages by "
                              "loss milestones needs training progress: give the stages explicitly, e.g. --stages A:B")
    shares = {tag: (first - v) / (first - best) for tag, v in losses.items()}
    log.info("%s: next-token loss per checkpoint %s", model, ", ".join(f"{t} {v:.3f}" for t, v in losses.items()))
    return shares


def _text_evaluate(ws: Workspace, model: str, stages, classes, repeats: int, images: int, seed: int, device: str,
                   progress: bool, milestones) -> dict:
    """:func:`evaluate_command` for a text study: ``classes`` are target next tokens separated by commas; the
    table adds the log-loss of the true next token; ``--stages auto`` uses milestones of the loss drop."""
    train = ws.dataset("train")
    if str(classes) == "all" or str(classes).strip().isdigit():
        raise ConceptEvoError("a text study's classes are target next tokens: give them with --classes, e.g. "
                              "--classes 'newline,upper,comma' (see `conceptevo evaluate-importance --help`)")
    targets = parse_targets(classes, workspace_tokenizer(ws))
    test = _text_test_split(ws)
    if stages == "auto":
        shares = loss_drop_shares(ws, model, train, seed=seed, device=device)
        try:
            pairs = stages_from_milestones(shares, milestones=milestones, key="share of the loss drop")
        except ConceptEvoError as e:
            tags = list(shares)
            raise ConceptEvoError(f"{e}; or give the stages explicitly, e.g. --stages {tags[0]}:{tags[len(tags) // 2]},"
                                  f"{tags[len(tags) // 2]}:{tags[-1]} (shares of the loss drop: "
                                  + ", ".join(f"{t} {v:.2f}" for t, v in shares.items()) + ")") from None
    else:
        pairs = parse_stages(stages)
    occ = [(TargetOccurrences(train, t), TargetOccurrences(test, t) if test is not None else None) for t in targets]
    axis = ws.config.get("stimuli", {}).get("channel_axis")
    results = []
    for t, t2 in pairs:
        m_from, m_to = _model(ws, model, t, train, device), _model(ws, model, t2, train, device)
        per_target = []
        for k, (tgt, (tr, te)) in enumerate(zip(targets, occ)):
            log.info("reversion %s %s -> %s, target %s (%d training occurrences)", model, t, t2, tgt.name, len(tr))
            with next_token_outputs(m_from, m_to):
                r = evaluate_reversion(m_from, m_to, tr, te, 0, layers=_layers(ws), num_images=images, num_test_images=images,
                                       repeats=repeats, seed=seed, device=device, stage=(t, t2), progress=progress,
                                       channel_axis=axis, log_loss=True)
            r.class_indices = [k]  # the k-th target: names in the tables come from the targets
            per_target.append(r)
        res = combine_reversion(per_target)
        res.config["targets"] = [{"spec": s, "ids": list(tg.ids), "name": tg.name}
                                 for s, tg in zip(split_unescaped(str(classes), ","), targets)]
        if ddp.is_main():
            res.save(ws.path / "evaluation" / model / f"{t}__{t2}.npz")
        results.append(res)
    names = [t.name for t in targets]
    r = _write_evaluation(ws, model, results, names, hash_json([pairs, [list(t.ids) for t in targets], repeats, images, seed]),
                          {"stages": pairs, "targets": names, "repeats": repeats, "images": images}, log_loss=True)
    return {**r, "stages": pairs, "targets": targets}

