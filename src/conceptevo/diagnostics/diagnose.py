"""``conceptevo diagnose WORKSPACE``: diversity, evolution speed and collapse of every checkpoint, with plots.

For every model and checkpoint of a finished workspace: concept diversity
(overall and per layer) of the checkpoint's neurons in the unified space,
concept collapse (per layer) from its stimuli, and the mean distance its
neurons moved since the model's previous checkpoint; then the distance moved
between the checkpoints nearest training-accuracy milestones (paper: 0.25 ->
0.5 -> 0.75 top-1). Writes ``WORKSPACE/diagnostics/``: ``metrics.json``,
``metrics.csv`` and one PNG per metric, each next to training accuracy.
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

    def to_dict(self) -> dict:
        return _jsonable({"checkpoints": {m: [c.to_dict() for c in cs] for m, cs in self.checkpoints.items()},
                          "milestones": self.milestones, "notes": self.notes})

    def table(self) -> str:
        """A plain-text table of the whole-model values."""
        lines = [f"{'model':<16} {'checkpoint':>10} {'epoch':>7} {'train top-1':>11} {'diversity':>9} "
                 f"{'collapse':>8} {'moved':>7}  layers collapsed (>=50%)"]
        for m, cs in self.checkpoints.items():
            for c in cs:
                acc = c.metrics.get("train_top1")
                bad = [l for l, v in c.collapse.items() if l != ALL and v is not None and v >= 0.5]
                lines.append(
                    f"{m:<16} {c.tag:>10} {_fmt(c.epoch, '.3g'):>7} {_fmt(acc, '.3f'):>11} {_fmt(c.diversity.get(ALL), '+.3f'):>9} "
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
    for m in models:
        rows, prev = [], None
        for c in ws.checkpoints(m):
            emb = ws.projection(m, c.tag)
            cm = checkpoint_metrics(ws.stimuli(m, c.tag), emb, method=method, jaccard=jaccard, min_others=min_others,
                                    model=m, tag=c.tag, epoch=c.epoch, metrics=c.metrics)
            if prev is not None:
                cm.moved = distance_moved(prev, emb).by_layer
            prev = emb
            rows.append(cm)
        if len(rows) < 2:
            notes.append(f"model {m} has one checkpoint: distance moved needs two")
        result[m] = rows
    speeds: list[dict] = []
    explicit = milestones is not None
    for m in models:
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
    diag = Diagnosis(result, speeds, notes)
    if write:
        folder = Path(out) if out is not None else ws.path / "diagnostics"
        ctx = WorkspaceLock(ws.path) if out is None else _NoLock()
        with ctx:
            write_json(folder / "metrics.json", diag.to_dict())
            write_bytes(folder / "metrics.csv", _csv(diag).encode())
            diag.files = [str(folder / "metrics.json"), str(folder / "metrics.csv")]
            diag.files += [str(p) for p in plot_diagnosis(diag, folder)]
    return diag


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _csv(diag: Diagnosis) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "tag", "epoch", "layer", "diversity", "collapse", "moved", "train_top1", "test_top1"])
    for m, cs in diag.checkpoints.items():
        for c in cs:
            for layer in c.diversity:
                w.writerow([m, c.tag, c.epoch, layer, _num(c.diversity.get(layer)), _num(c.collapse.get(layer)),
                            _num(c.moved.get(layer)), _num(c.metrics.get("train_top1")), _num(c.metrics.get("test_top1"))])
    return buf.getvalue()


def _num(x):
    if x is None:
        return ""
    x = float(x)
    return repr(x) if math.isfinite(x) else ""


def plot_diagnosis(diag: Diagnosis, folder) -> list[Path]:
    """diversity.png, speed.png, collapse.png: each metric per checkpoint (solid) with training accuracy (dotted)."""
    from matplotlib.figure import Figure  # a Figure object, not pyplot: the user's backend stays as it is

    folder = Path(folder)
    out = []
    what = {"diversity": ("concept diversity (nats, mean over dims)", lambda c: c.diversity.get(ALL)),
            "speed": ("mean distance moved since previous checkpoint", lambda c: c.moved.get(ALL)),
            "collapse": ("share of collapsed neurons", lambda c: c.collapse.get(ALL))}
    for name, (label, get) in what.items():
        fig = Figure(figsize=(6.4, 3.8))
        ax = fig.add_subplot()
        ax2 = ax.twinx()
        for i, (m, cs) in enumerate(diag.checkpoints.items()):
            x = [c.epoch if c.epoch is not None else j for j, c in enumerate(cs)]
            y = [np.nan if get(c) is None else get(c) for c in cs]
            acc = [c.metrics.get("train_top1", np.nan) for c in cs]
            color = f"C{i}"
            ax.plot(x, y, "-o", ms=3, color=color, label=m)
            ax2.plot(x, acc, ":", color=color, alpha=0.8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax2.set_ylabel("training top-1 accuracy (dotted)")
        ax2.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(f"{name} per checkpoint, beside training accuracy", fontsize=10)
        fig.tight_layout()
        out += save_figure(fig, folder / f"{name}.png", dpi=120)
    return out


__all__ = ["Diagnosis", "diagnose", "plot_diagnosis", "DEFAULT_MILESTONES"]
