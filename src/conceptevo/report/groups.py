"""Paper Fig 1's scaffold: K-means groups of the unified space in every model, then each group's units drawn
by the caller (image patches for image studies, lines of context for text studies)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .. import io
from ..errors import WorkspaceError
from . import analysis

GROUP_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


def plot_groups(ws, draw: Callable, groups: int = 3, per_model: int = 2, k: int = 8, seed: int = 0, vectors=None,
                check: Callable | None = None, title: str = "", row_height: float = 1.0, width: float = 3.0):
    """A figure: the last checkpoint of each model (a column) with ``groups`` K-means groups highlighted, then one
    row per group where ``draw(ax, model, tag, rows, ids, colour)`` shows the ``per_model`` units nearest the
    group's centre (``rows``: their rows in the checkpoint, ``ids``: the checkpoint's unit ids).

    The groups shown are those shared by the most models (then the tightest). ``check(pairs)`` runs on the
    (model, last tag) pairs before anything is drawn (e.g. to require example patches).
    """
    vectors = analysis.unified_vectors(ws) if vectors is None else vectors
    lay = analysis.layouts(ws)
    models = [m for m in ws.models if vectors.get((m, ws.tags(m)[-1])) is not None and lay.get((m, ws.tags(m)[-1])) is not None]
    if not models:
        raise WorkspaceError(f"the workspace {ws.path} has no projection and layout yet; run `conceptevo run` on its config")
    last = {m: ws.tags(m)[-1] for m in models}
    if check is not None:
        check([(m, last[m]) for m in models])
    labels, centres = analysis.kmeans_groups(vectors, k=k, seed=seed)
    # groups present in the most models, then the tightest
    score = []
    for g in range(len(centres)):
        present = sum(int((labels[(m, last[m])] == g).sum() >= per_model) for m in models)
        spread = np.mean([np.linalg.norm(vectors[(m, last[m])][labels[(m, last[m])] == g] - centres[g], axis=1).mean()
                          for m in models if (labels[(m, last[m])] == g).any()] or [np.inf])
        score.append((-present, spread, g))
    chosen = [g for _, _, g in sorted(score)[:groups]]
    nrow = len(chosen)
    fig = io.new_figure(figsize=(width * len(models) + 0.2, 2.8 + row_height * nrow))
    gs = fig.add_gridspec(1 + nrow, len(models), height_ratios=[2.6] + [row_height] * nrow, hspace=0.35, wspace=0.08)
    for c, m in enumerate(models):
        ax = fig.add_subplot(gs[0, c])
        xy = lay[(m, last[m])]
        ax.scatter(xy[:, 0], xy[:, 1], s=3, c="#cccccc", linewidths=0)
        for i, g in enumerate(chosen):
            sel = labels[(m, last[m])] == g
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9, c=GROUP_COLOURS[i % len(GROUP_COLOURS)], linewidths=0, label=f"group {i + 1}")
        metrics = ws.checkpoints(m)[-1].metrics
        acc = metrics.get("train_top1")
        ax.set_title(f"{m} {last[m]}" + (f" (acc {acc:.2f})" if acc is not None else ""), fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        if c == 0:
            ax.legend(fontsize=6, loc="best", markerscale=1.5, frameon=False)
        ids = analysis.neuron_ids(ws, m, last[m])
        v = vectors[(m, last[m])]
        for i, g in enumerate(chosen):
            ax2 = fig.add_subplot(gs[1 + i, c])
            ax2.axis("off")
            rows = np.flatnonzero(labels[(m, last[m])] == g)
            if len(rows) == 0:
                ax2.text(0.5, 0.5, "no neuron in this group", ha="center", va="center", fontsize=7, color="#777")
                continue
            rows = rows[np.argsort(np.linalg.norm(v[rows] - centres[g], axis=1))][:per_model]
            draw(ax2, m, last[m], rows, ids, GROUP_COLOURS[i % len(GROUP_COLOURS)])
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


__all__ = ["plot_groups", "GROUP_COLOURS"]
