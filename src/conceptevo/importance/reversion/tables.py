"""A reversion result (:class:`ReversionResult`), and how it is shown: CSV and Markdown tables, bar figures
(paper Table 1, Fig 6)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import ConceptEvoError
from ...io import atomic_path, new_figure, save_figure
from .. import verdicts
from ..verdicts import Verdict

SPLITS = ("train", "test")
METRICS = ("top1", "top5")
#: The optional third metric: mean negative log-probability of the true class (lower is better).
LOG_LOSS = "logloss"
RANDOM = "random"
_SHOWN = {"top1": "top-1", "top5": "top-5", LOG_LOSS: "log-loss"}


def metric_label(metric: str) -> str:
    """How tables name a metric: ``top-1``, ``top-5``, ``log-loss``."""
    return _SHOWN.get(metric, metric)


def bin_labels(bins: int) -> list[str]:
    """``["0-25", "25-50", "50-75", "75-100"]`` for 4 bins (percentiles of the importance ranking)."""
    edges = [round(100 * i / bins) for i in range(bins + 1)]
    return [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]


# ---------------------------------------------------------------- results
@dataclass
class ReversionResult:
    """Accuracy changes from reverting evolutions, for one or more classes of one stage.

    ``changes[k, r, s, m, l, v]``: class k, repeat r, split s (``SPLITS``:
    train, test), metric m (``metrics``: top1, top5, and where measured
    ``"logloss"``), layer l, variant v (``bins``: the percentile bins, then
    ``"random"``); reverted minus clean. ``clean[k, r, s, m]`` is the metric
    without reversion and ``num_images[k, r, s]`` the number of images it was
    measured on. Log-loss (the mean negative log-probability of the true class)
    is lower for a better model: reverting an important bin should raise it.
    """

    class_indices: list[int]
    layers: list[str]
    bins: list[str]
    changes: np.ndarray
    clean: np.ndarray
    num_images: np.ndarray
    stage: tuple[str, str] | None = None
    config: dict = field(default_factory=dict)
    metrics: tuple = METRICS

    splits = SPLITS

    def __post_init__(self):
        self.metrics = tuple(self.metrics)
        if self.changes.shape[3] != len(self.metrics):
            raise ConceptEvoError(f"changes hold {self.changes.shape[3]} metrics but metrics names {len(self.metrics)}: "
                                  f"{list(self.metrics)}")

    @property
    def repeats(self) -> int:
        return int(self.changes.shape[1])

    def layer_mean(self) -> np.ndarray:
        """``[classes, repeats, splits, metrics, variants]``: changes averaged over layers."""
        return self.changes.mean(axis=4)

    def summary(self) -> dict[str, np.ndarray]:
        """Mean over layers, then over classes; then mean and std over repeats (``[splits, metrics, variants]``).

        Also ``clean`` (mean accuracy without reversion, ``[splits, metrics]``).
        The std is the sample std across repeats (0 with one repeat).
        """
        per_repeat = self.layer_mean().mean(axis=0)  # [R, S, M, V]
        std = per_repeat.std(axis=0, ddof=1) if self.repeats > 1 else np.zeros(per_repeat.shape[1:])
        return {"mean": per_repeat.mean(axis=0), "std": std, "clean": self.clean.mean(axis=(0, 1))}

    def stage_label(self) -> str:
        return f"{self.stage[0]} -> {self.stage[1]}" if self.stage else ""

    def to_table(self) -> list[dict]:
        """Rows shaped like the paper's Table 1: one per (split, metric), bins as columns.

        Keys: ``stage``, ``split``, ``metric``, ``classes``, ``repeats``,
        ``clean``, then each bin's mean change and ``"<bin> std"``.
        """
        return reversion_table([self])

    def to_markdown(self) -> str:
        return reversion_markdown([self])

    def write_csv(self, path) -> Path:
        return write_reversion_csv(path, [self])

    def write_markdown(self, path) -> Path:
        return write_reversion_markdown(path, [self])

    def plot_bars(self, path, split: str | None = None, metric: str | None = None) -> Path:
        plot_reversion_bars(path, [self], split=split, metric=metric)
        return Path(path)

    def chance(self, metric: str = "top1") -> float | None:
        """The metric's chance level (k / classes for top-k), or None when the number of classes was not recorded."""
        c = self.config.get("num_classes")
        if metric == LOG_LOSS:
            return None
        return min(1.0, (1 if metric == "top1" else 5) / c) if c else None

    def _metric(self, metric: str) -> int:
        if metric not in self.metrics:
            raise ConceptEvoError(f"metric {metric!r} was not measured in this result; it has {', '.join(self.metrics)}"
                                  + (" (measure log-loss with log_loss=True)" if metric == LOG_LOSS else ""))
        return self.metrics.index(metric)

    def check_claim(self, split: str = "train", metric: str = "top1", confidence: float = 0.95) -> dict[str, Verdict]:
        """Do "the more important the bin, the larger the drop" and "random between the middle bins" hold?

        Each answer is a :class:`~conceptevo.importance.verdicts.Verdict`:
        "yes", "no" or "cannot tell", computed from the per-run changes and
        their spread over repeats and classes (see
        :mod:`conceptevo.importance.verdicts`), with a reason holding the
        numbers. ``monotonic``: reverting a more important bin lowers
        accuracy more (and the most important bin lowers it).
        ``random_between``: the random bin's change lies between the two
        middle bins' (25-50 and 50-75 of 4). ``holds``: both. For ``"logloss"``
        (lower is better) the claims read the other way round: the more important
        the bin, the larger the rise; there is no chance level to check.
        """
        s, m = SPLITS.index(split), self._metric(metric)
        runs = self.changes[:, :, s, m].mean(axis=2)  # [classes, repeats, variants]: mean over layers
        lower = metric == LOG_LOSS
        pre = verdicts.precheck(runs, self.clean[:, :, s, m], self.num_images[:, :, s], self.chance(metric),
                                accuracy=not lower)
        if pre is not None:
            return {"monotonic": pre, "random_between": pre, "holds": pre}
        labels = list(self.bins[:-1])
        mono = verdicts.monotonic(runs, labels, confidence, lower_is_better=lower)
        between = verdicts.random_between(runs, labels, confidence, lower_is_better=lower)
        return {"monotonic": mono, "random_between": between, "holds": verdicts.both(mono, between)}

    def verdict_lines(self, metric: str = "top1") -> list[str]:
        """One line per split and claim, as the CLI prints them and the Markdown table ends."""
        a, b = verdicts.middle_bins(len(self.bins) - 1)
        lines = []
        for split in SPLITS:
            v = self.check_claim(split=split, metric=metric)
            where = f"{self.stage_label() + ' ' if self.stage else ''}{split} {metric_label(metric)}"
            lines.append(f"{where}: more important bin -> larger {'rise' if metric == LOG_LOSS else 'drop'}: {v['monotonic']}")
            lines.append(f"{where}: random between {self.bins[a]} and {self.bins[b]}: {v['random_between']}")
        return lines

    # -- persistence
    def save(self, path) -> Path:
        """Save to one ``.npz`` file (read back with :meth:`load`)."""
        path = Path(path)
        meta = dict(class_indices=[int(c) for c in self.class_indices], layers=list(self.layers), bins=list(self.bins),
                    stage=list(self.stage) if self.stage else None, config=self.config)
        if self.metrics != METRICS:  # results of the two accuracies alone stay as they were saved before log-loss
            meta["metrics"] = list(self.metrics)
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, changes=self.changes, clean=self.clean, num_images=self.num_images,
                         meta=np.array(json.dumps(meta, default=str)))
        return path

    @classmethod
    def load(cls, path) -> "ReversionResult":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(meta["class_indices"], meta["layers"], meta["bins"], z["changes"], z["clean"], z["num_images"],
                       stage=tuple(meta["stage"]) if meta.get("stage") else None, config=meta.get("config", {}),
                       metrics=tuple(meta.get("metrics", METRICS)))


def combine_reversion(results: Sequence[ReversionResult]) -> ReversionResult:
    """Stack per-class results of one stage into one result (its summary averages over classes)."""
    results = list(results)
    if not results:
        raise ConceptEvoError("no reversion results to combine")
    first = results[0]
    for r in results[1:]:
        for attr in ("layers", "bins", "stage", "metrics"):
            if getattr(r, attr) != getattr(first, attr):
                raise ConceptEvoError(f"cannot combine reversion results with different {attr}: {getattr(first, attr)} vs {getattr(r, attr)}")
        if r.repeats != first.repeats:
            raise ConceptEvoError(f"cannot combine results with {first.repeats} and {r.repeats} repeats; use the same --repeats")
    return ReversionResult(
        [c for r in results for c in r.class_indices], list(first.layers), list(first.bins),
        np.concatenate([r.changes for r in results]), np.concatenate([r.clean for r in results]),
        np.concatenate([r.num_images for r in results]), stage=first.stage, config=dict(first.config),
        metrics=first.metrics,
    )


# ---------------------------------------------------------------- tables and figures
def _results(results) -> list[ReversionResult]:
    return [results] if isinstance(results, ReversionResult) else list(results)


def _named(class_indices, class_names) -> str:
    """'Trouser; Dress' for the classes of a result (their indices when no names are known)."""
    names = list(class_names or [])
    return "; ".join(names[c] if 0 <= c < len(names) else str(c) for c in class_indices)


def reversion_table(results, class_names=None) -> list[dict]:
    """Table 1 rows for one or several results (e.g. one per stage); ``class_names`` adds a column naming the classes."""
    rows = []
    for res in _results(results):
        summ = res.summary()
        for s, split in enumerate(SPLITS):
            for m, metric in enumerate(res.metrics):
                if np.isnan(summ["mean"][s, m]).all():
                    continue
                row = {"stage": res.stage_label(), "split": split, "metric": metric,
                       "classes": len(res.class_indices), "repeats": res.repeats,
                       "clean": float(summ["clean"][s, m])}
                if class_names is not None:
                    row["class names"] = _named(res.class_indices, class_names)
                for v, label in enumerate(res.bins):
                    row[label] = float(summ["mean"][s, m, v])
                for v, label in enumerate(res.bins):
                    row[f"{label} std"] = float(summ["std"][s, m, v])
                rows.append(row)
    return rows


def write_reversion_csv(path, results, class_names=None) -> Path:
    rows = reversion_table(results, class_names)
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["stage"])
            w.writeheader()
            for row in rows:
                w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return path


def reversion_markdown(results, class_names=None) -> str:
    """A Markdown table like the paper's Table 1: mean change ± std over repeats per bin."""
    results = _results(results)
    if not results:
        return ""
    bins = results[0].bins
    head = ["Stage", "Accuracy", "Clean"] + [("Random 25%" if b == RANDOM else b) for b in bins]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in reversion_table(results):
        lower = " (lower is better)" if row["metric"] == LOG_LOSS else ""
        cells = [row["stage"], f"{row['split']} {metric_label(row['metric'])}{lower}", f"{row['clean']:.3f}"]
        cells += [f"{row[b]:+.3f} ± {row[b + ' std']:.3f}" for b in bins]
        lines.append("| " + " | ".join(cells) + " |")
    res = results[0]
    lines.append("")
    named = f" ({_named(res.class_indices, class_names)})" if class_names is not None else ""
    lines.append(f"Accuracy change (reverted minus clean), mean over layers and {len(res.class_indices)} class(es){named}, "
                 f"± std over {res.repeats} repeats. Bins are percentiles of the importance ranking (0-25 = most important).")
    loss = all(LOG_LOSS in r.metrics for r in results)
    if loss:
        lines.append("Log-loss rows: change of the mean negative log-probability of the true class (nats; lower is better, "
                     "so reverting an important bin should raise it); their Clean column is the log-loss itself.")
    untested = [r.stage_label() or "the stage" for r in results if np.isnan(r.summary()["mean"][1]).all()]
    if untested:
        lines.append(f"No test rows for {', '.join(untested)}: not measured (no held-out split).")
    lines.append("")
    lines.append(f"Verdicts (top-1{' and log-loss' if loss else ''}; from the per-run changes and their spread over repeats "
                 "and classes, 95% confidence):")
    lines.append("")
    lines += [f"- {line}" for r in results for line in r.verdict_lines()]
    if loss:
        lines += [f"- {line}" for r in results for line in r.verdict_lines(LOG_LOSS)]
    return "\n".join(lines) + "\n"


def write_reversion_markdown(path, results, class_names=None) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".md") as tmp:
        tmp.write_text(reversion_markdown(results, class_names))
    return path


def plot_reversion_bars(path, results, split: str | None = None, metric: str | None = None):
    """Fig-6-style bars: mean accuracy change per bin with std error bars, random as a dashed line.

    Returns the matplotlib ``Figure`` (no pyplot); writes it to ``path`` unless that is None.

    One row of panels per result (stage); one panel per (split, metric), or
    only the ones named.
    """
    results = _results(results)
    if not results:
        raise ConceptEvoError("no reversion results to plot")
    metrics = [m for m in METRICS + (LOG_LOSS,) if any(m in r.metrics for r in results)]
    measured = [s for s in SPLITS if any(not np.isnan(r.changes[:, :, SPLITS.index(s)]).all() for r in results)]
    panels = [(s, m) for s in SPLITS for m in metrics if (split in (None, s)) and (metric in (None, m))
              and (s in measured or split == s)]
    if not panels:
        raise ConceptEvoError(f"nothing to plot for split={split!r}, metric={metric!r}; use {SPLITS} and {tuple(metrics)}")
    fig = new_figure(figsize=(3.2 * len(panels), 2.8 * len(results)), dpi=120)
    axes = fig.subplots(len(results), len(panels), squeeze=False)
    for i, res in enumerate(results):
        summ = res.summary()
        nb = len(res.bins) - 1
        for j, (s, m) in enumerate(panels):
            ax = axes[i][j]
            if m not in res.metrics:
                ax.set_axis_off()
                continue
            si, mi = SPLITS.index(s), res.metrics.index(m)
            mean, std = summ["mean"][si, mi], summ["std"][si, mi]
            ax.bar(range(nb), mean[:nb], yerr=std[:nb], capsize=3, color="#4c72b0", zorder=2)
            ax.axhline(mean[nb], color="#c44e52", linestyle="--", linewidth=1.2, label="random 25%")
            if std[nb] > 0:
                ax.axhspan(mean[nb] - std[nb], mean[nb] + std[nb], color="#c44e52", alpha=0.12, linewidth=0, zorder=0)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(range(nb))
            ax.set_xticklabels(res.bins[:nb], fontsize=8)
            ax.set_xlabel("importance percentile", fontsize=8)
            ax.set_title(f"{res.stage_label() + '  ' if res.stage else ''}{s} {metric_label(m)}", fontsize=9)
            ax.tick_params(labelsize=8)
            if m == LOG_LOSS:
                ax.set_ylabel("log-loss change (lower is better)", fontsize=8)
            if j == 0:
                ax.set_ylabel("accuracy change", fontsize=8)
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
