"""The unified space per checkpoint, side by side: each model's checkpoints in rows of panels (paper Fig 2)."""
from __future__ import annotations

import numpy as np

from ..units import layers_of
from ._util import _check_formats, _workspace


def layer_depth(neuron_ids) -> np.ndarray:
    """Each neuron's relative depth in its model: 0 for the first layer, 1 for the last."""
    layers = layers_of(neuron_ids)
    order = list(dict.fromkeys(layers))
    pos = {name: i for i, name in enumerate(order)}
    return np.array([pos[l] / max(len(order) - 1, 1) for l in layers], dtype=np.float32)


def plot_space_grid(ws, path=None, formats=("png",), max_checkpoints: int = 8, per_row: int = 4):
    """Scatter of every checkpoint's neurons in the shared 2-D frame; colour = layer depth, with its colour bar.

    Returns the matplotlib ``Figure`` (no pyplot: the global backend is left
    alone); with ``path``, also writes it in each of ``formats``.

    Each model shows at most ``max_checkpoints`` checkpoints (evenly spread,
    first and last included), wrapped into rows of at most ``per_row``
    panels, balanced (7 checkpoints: 4 + 3); every row is labelled with its
    model's name.
    """
    import math

    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from .. import io

    formats = _check_formats(formats)
    ws = _workspace(ws)
    models = ws.models
    shown = {m: _pick(ws.tags(m), max_checkpoints) for m in models}
    most = max(len(v) for v in shown.values())
    ncol = math.ceil(most / math.ceil(most / max(1, per_row)))
    rows = {m: math.ceil(len(shown[m]) / ncol) for m in models}
    nrow = sum(rows.values())
    xy_all = np.concatenate([np.asarray(ws.layout(m, t)) for m in models for t in shown[m]])
    lo, hi = xy_all.min(0), xy_all.max(0)
    pad = 0.05 * (hi - lo)
    fig = io.new_figure(figsize=(2.5 * ncol + 0.4, 2.5 * nrow + 1.1), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    base = ws.base
    r0 = 0
    for m in models:
        cks = {c.tag: c for c in ws.checkpoints(m)}
        for i in range(rows[m] * ncol):
            ax = axes[r0 + i // ncol, i % ncol]
            ax.set_xticks([]), ax.set_yticks([])
            if i % ncol == 0:
                ax.set_ylabel(m, fontsize=9)
            if i >= len(shown[m]):
                ax.axis("off")
                continue
            tag = shown[m][i]
            xy = np.asarray(ws.layout(m, tag))
            ids = io.read_json(ws.stimuli_dir(m, tag) / "neurons.json")["neuron_ids"]
            ax.scatter(xy[:, 0], xy[:, 1], c=layer_depth(ids), cmap="viridis", s=3, linewidths=0, vmin=0, vmax=1)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            acc = cks[tag].metrics.get("train_top1")
            title = f"{tag}" + (f"  acc {acc:.2f}" if acc is not None else "") + ("  (base)" if (m, tag) == base else "")
            ax.set_title(title, fontsize=8)
        r0 += rows[m]
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "viridis"), ax=axes, orientation="horizontal",
                       shrink=min(0.6, 1.6 / ncol + 0.2), aspect=30, pad=0.02, ticks=[0, 0.5, 1])
    bar.ax.set_xticklabels(["first layer", "middle", "last layer"], fontsize=8)
    bar.set_label("colour: a neuron's layer, by its depth in its model", fontsize=8)
    fig.suptitle("Unified semantic space, per checkpoint", fontsize=10)
    if path is not None:
        io.save_figure(fig, path, formats, dpi=110)
    return fig


def _pick(tags: list[str], n: int) -> list[str]:
    if len(tags) <= n:
        return list(tags)
    idx = np.unique(np.round(np.linspace(0, len(tags) - 1, n)).astype(int))
    return [tags[i] for i in idx]
