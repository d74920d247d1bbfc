"""``conceptevo diagnose WORKSPACE``: diversity, evolution speed and collapse of every checkpoint, with plots.

For every model and checkpoint of a finished workspace: concept diversity
(overall and per layer) of the checkpoint's neurons in the unified space,
concept collapse (per layer) from its stimuli, and the mean distance its
neurons moved since the model's previous checkpoint; then the distance moved
between the checkpoints nearest training-accuracy milestones (paper: 0.25 ->
0.5 -> 0.75 top-1). Writes ``WORKSPACE/diagnostics/``: ``metrics.json``,
``metrics.csv``, one PNG per metric (all layers together) and ``layers.png``
(diversity and distance moved of each layer), each next to training accuracy.

Language-model runs (``conceptevo train --text``) record no accuracy: their
checkpoints get the train loss from the run's ``train_log.json``
(:func:`~conceptevo.models.train_lm.loss_at_step`), and the figures draw the
whole per-step loss curve beside the metrics, against the training step.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConceptEvoError
from ..io import save_figure, write_bytes, write_json
from ..workspace import Workspace, WorkspaceLock
from ..models.train_lm import loss_at_step, run_losses, run_of_checkpoint
from .metrics import ALL, CheckpointMetrics, _jsonable, checkpoint_metrics, distance_moved, milestone_speed

log = logging.getLogger(__name__)

DEFAULT_MILESTONES = (0.25, 0.5, 0.75)


@dataclass
class Diagnosis:
    """Per model, the metrics of each checkpoint in training order, and the milestone speeds."""

    checkpoints: dict[str, list[CheckpointMetrics]]
    milestones: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)   # per model: the run's per-step train loss

    def to_dict(self) -> dict:
        return _jsonable({"checkpoints": {m: [c.to_dict() for c in cs] for m, cs in self.checkpoints.items()},
                          "milestones": self.milestones, "notes": self.notes})

    @property
    def quality(self) -> tuple[str, str]:
        """(metrics key, label) of what training progress is measured by: top-1 accuracy, else train loss."""
        cs = [c for cs in self.checkpoints.values() for c in cs]
        if not any("train_top1" in c.metrics for c in cs) and any("train_loss" in c.metrics for c in cs):
            return "train_loss", "train loss"
        return "train_top1", "train top-1"

    def table(self) -> str:
        """A plain-text table of the whole-model values."""
        key, label = self.quality
        when = "step" if _by_step(self) else "epoch"
        lines = [f"{'model':<16} {'checkpoint':>10} {when:>7} {label:>11} {'diversity':>9} "
                 f"{'collapse':>8} {'moved':>7}  layers collapsed (>=50%)"]
        for m, cs in self.checkpoints.items():
            for c in cs:
                acc = c.metrics.get(key)
                bad = [l for l, v in c.collapse.items() if l != ALL and v is not None and v >= 0.5]
                x = c.step if when == "step" else c.epoch
                lines.append(
                    f"{m:<16} {c.tag:>10} {_fmt(x, '.3g' if when == 'epoch' else 'd'):>7} {_fmt(acc, '.3f'):>11} {_fmt(c.diversity.get(ALL), '+.3f'):>9} "
                    f"{_fmt(c.collapse.get(ALL), '.2f'):>8} {_fmt(c.moved.get(ALL), '.3f'):>7}  {', '.join(bad) or '-'}")
        if self.milestones:
            lines.append("")
            lines.append("distance moved between accuracy milestones (mean Euclidean distance per neuron):")
            for s in self.milestones:
                lines.append(f"  {s['model']}: {s['milestones'][0]:g} -> {s['milestones'][1]:g} ({s['from']} -> {s['to']}, "
                             f"{s['key']} {_fmt(s['accuracy'][0], '.3f')} -> {_fmt(s['accuracy'][1], '.3f')}): {s['mean']:.3f}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def _by_step(diag: Diagnosis) -> bool:
    """Whether checkpoints are placed by training step (no epochs, every step known) rather than by epoch."""
    cs = [c for cs in diag.checkpoints.values() for c in cs]
    return bool(cs) and all(c.epoch is None for c in cs) and all(c.step is not None for c in cs)


def _with_train_loss(checkpoint, losses_of: dict) -> dict:
    """The checkpoint's metrics, with ``train_loss`` from its run's ``train_log.json`` when it has none."""
    metrics = dict(checkpoint.metrics)
    if "train_loss" in metrics or "train_top1" in metrics or checkpoint.step is None:
        return metrics
    run = run_of_checkpoint(checkpoint.path)
    if run is None:
        return metrics
    if run not in losses_of:
        try:
            losses = [float(x) for x in run_losses(run)]
        except (OSError, ValueError, KeyError, TypeError) as e:  # someone else's train_log.json: no loss from it
            log.info("%s/train_log.json has no per-step 'loss' list conceptevo can read (%s): no train loss", run, e)
            losses = []
        losses_of[run] = losses
    loss = loss_at_step(losses_of[run], checkpoint.step)
    if loss is not None:
        metrics["train_loss"] = loss
    return metrics


def _fmt(x, spec):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def diagnose(workspace, method: str = "knn", jaccard: float = 0.5, min_others: int | None = None,
             milestones: Sequence[float] | None = None, key: str = "train_top1", tolerance: float = 0.15,
             models: Sequence[str] | None = None, write: bool = True, out=None) -> Diagnosis:
    """Compute (and by default write) the diagnostics of a workspace.

    ``milestones``: accuracies whose nearest checkpoints the distance moved is
    measured between. ``None`` tries the paper's (0.25, 0.5, 0.75) and notes the
    models that do not reach them; an explicit value that a model does not
    reach (within ``tolerance``) is an error.
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    models = list(models) if models is not None else ws.models
    if not models:
        raise ConceptEvoError(f"the workspace {ws.path} lists no model; run the study first")
    result: dict[str, list[CheckpointMetrics]] = {}
    notes: list[str] = []
    losses_of: dict = {}
    curves: dict[str, list[float]] = {}
    for m in models:
        rows, prev = [], None
        for c in ws.checkpoints(m):
            emb = ws.projection(m, c.tag)
            cm = checkpoint_metrics(ws.stimuli(m, c.tag), emb, method=method, jaccard=jaccard, min_others=min_others,
                                    model=m, tag=c.tag, epoch=c.epoch, metrics=_with_train_loss(c, losses_of))
            cm.step = c.step
            run = run_of_checkpoint(c.path) if "train_loss" in cm.metrics else None
            if run is not None and losses_of.get(run):
                curves[m] = losses_of[run]
            if prev is not None:
                cm.moved = distance_moved(prev, emb).by_layer
            prev = emb
            rows.append(cm)
        if len(rows) < 2:
            notes.append(f"model {m} has one checkpoint: distance moved needs two")
        result[m] = rows
    speeds: list[dict] = []
    explicit = milestones is not None
    if not explicit and not any(key in c.metrics for cs in result.values() for c in cs):
        notes.append(f"no checkpoint records {key!r}: no distance moved between accuracy milestones"
                     + (" (these runs record the train loss instead)" if curves else ""))
        models_for_speed = []
    else:
        models_for_speed = models
    for m in models_for_speed:
        if len(result[m]) < 2:
            if explicit:
                milestone_speed(ws, m, milestones, key=key, tolerance=tolerance)  # raises the clear error
            continue
        try:
            speeds += milestone_speed(ws, m, milestones if explicit else DEFAULT_MILESTONES, key=key, tolerance=tolerance)
        except ConceptEvoError as e:
            if explicit:
                raise
            notes.append(f"model {m}: no milestone speeds ({e})")
    diag = Diagnosis(result, speeds, notes, losses=curves)
    if write:
        folder = Path(out) if out is not None else ws.path / "diagnostics"
        ctx = WorkspaceLock(ws.path) if out is None else _NoLock()
        with ctx:
            write_json(folder / "metrics.json", diag.to_dict())
            write_bytes(folder / "metrics.csv", _csv(diag).encode())
            diag.files = [str(folder / "metrics.json"), str(folder / "metrics.csv")]
            diag.files += [str(folder / f"{name}.png") for name in plot_diagnosis(diag, folder)]
    return diag


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _csv(diag: Diagnosis) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "tag", "epoch", "layer", "diversity", "collapse", "moved", "train_top1", "test_top1", "step",
                "train_loss"])
    for m, cs in diag.checkpoints.items():
        for c in cs:
            for layer in c.diversity:
                w.writerow([m, c.tag, c.epoch, layer, _num(c.diversity.get(layer)), _num(c.collapse.get(layer)),
                            _num(c.moved.get(layer)), _num(c.metrics.get("train_top1")), _num(c.metrics.get("test_top1")),
                            "" if c.step is None else int(c.step), _num(c.metrics.get("train_loss"))])
    return buf.getvalue()


def _num(x):
    if x is None:
        return ""
    x = float(x)
    return repr(x) if math.isfinite(x) else ""


def _x(diag: Diagnosis, cs) -> tuple[list, str]:
    if _by_step(diag):
        return [c.step for c in cs], "training step"
    return [c.epoch if c.epoch is not None else j for j, c in enumerate(cs)], "epoch"


def _progress(diag: Diagnosis, ax2, model: str, cs, color) -> None:
    """Training progress on the twin axis ``ax2`` (dotted): accuracy per checkpoint, or the run's whole loss curve."""
    key, _ = diag.quality
    if key == "train_loss" and model in diag.losses and _by_step(diag):
        curve = diag.losses[model]
        ax2.plot(np.arange(len(curve)), curve, ":", color=color, alpha=0.7, lw=0.9)
    else:
        x, _ = _x(diag, cs)
        ax2.plot(x, [c.metrics.get(key, np.nan) for c in cs], ":", color=color, alpha=0.8)


def _decorate(diag: Diagnosis, ax, ax2, xlabel: str) -> None:
    key, label = diag.quality
    ax.set_xlabel(xlabel)
    if key == "train_top1":
        ax2.set_ylabel("training top-1 accuracy (dotted)")
        ax2.set_ylim(0, 1.02)
    else:
        ax2.set_ylabel("train loss, nats per token (dotted)")
    if xlabel == "training step":   # log-spaced early checkpoints: a linear axis hides the first steps
        ax.set_xscale("symlog", linthresh=1)


def plot_diagnosis(diag: Diagnosis, folder=None) -> dict:
    """Figures ``diversity``, ``speed``, ``collapse`` (each metric per checkpoint, solid, with training accuracy or
    the train loss curve, dotted) and ``layers`` (diversity and distance moved of each layer, one panel per model).

    Returns ``{name: matplotlib Figure}`` (drawn without pyplot); with ``folder``,
    also writes ``folder/NAME.png`` for each.
    """
    from ..io import new_figure

    out = {}
    _, plabel = diag.quality
    what = {"diversity": ("concept diversity (nats, mean over dims)", lambda c: c.diversity.get(ALL)),
            "speed": ("mean distance moved since previous checkpoint", lambda c: c.moved.get(ALL)),
            "collapse": ("share of collapsed neurons", lambda c: c.collapse.get(ALL))}
    for name, (label, get) in what.items():
        fig = new_figure(figsize=(6.4, 3.8))
        ax = fig.subplots()
        ax2 = ax.twinx()
        xlabel = "epoch"
        for i, (m, cs) in enumerate(diag.checkpoints.items()):
            x, xlabel = _x(diag, cs)
            y = [np.nan if get(c) is None else get(c) for c in cs]
            color = f"C{i}"
            ax.plot(x, y, "-o", ms=3, color=color, label=m)
            _progress(diag, ax2, m, cs, color)
        _decorate(diag, ax, ax2, xlabel)
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"{name} per checkpoint, beside {'training accuracy' if plabel == 'train top-1' else 'the train loss'}",
                     fontsize=10)
        fig.tight_layout()
        if folder is not None:
            save_figure(fig, Path(folder) / f"{name}.png", dpi=120)
        out[name] = fig
    out["layers"] = plot_layers(diag)
    if folder is not None:
        save_figure(out["layers"], Path(folder) / "layers.png", dpi=120)
    return out


def plot_layers(diag: Diagnosis):
    """Diversity (top row) and distance moved (bottom row) of every layer per checkpoint, one column per model
    (one scale per row), with training progress dotted (accuracy, or the run's per-step train loss)."""
    from ..io import new_figure

    models = list(diag.checkpoints)
    fig = new_figure(figsize=(4.6 * len(models) + 0.6, 6.0))
    axes = fig.subplots(2, len(models), squeeze=False, sharey="row")   # models compared on one scale per row
    for j, m in enumerate(models):
        cs = diag.checkpoints[m]
        layers = list(dict.fromkeys(l for c in cs for l in c.layers))
        x, xlabel = _x(diag, cs)
        for i, (name, get) in enumerate((("diversity (nats)", lambda c, l: c.diversity.get(l)),
                                         ("distance moved since previous", lambda c, l: c.moved.get(l)))):
            ax = axes[i][j]
            ax2 = ax.twinx()
            for k, layer in enumerate(layers):
                y = [np.nan if get(c, layer) is None else get(c, layer) for c in cs]
                ax.plot(x, y, "-o", ms=2.5, color=f"C{k}", label=layer)
            _progress(diag, ax2, m, cs, "gray")
            _decorate(diag, ax, ax2, xlabel)
            ax.set_ylabel(name, fontsize=8)
            ax.set_title(f"{m}: {name.split(' (')[0]} per layer", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


__all__ = ["Diagnosis", "diagnose", "plot_diagnosis", "plot_layers", "DEFAULT_MILESTONES"]
