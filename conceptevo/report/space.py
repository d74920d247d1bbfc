"""The unified space per checkpoint, side by side: models in rows, checkpoints in columns (paper Fig 2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def layer_depth(neuron_ids) -> np.ndarray:
    """Each neuron's relative depth in its model: 0 for the first layer, 1 for the last."""
    layers = [nid.rpartition(":")[0] for nid in neuron_ids]
    order = list(dict.fromkeys(layers))
    pos = {name: i for i, name in enumerate(order)}
    return np.array([pos[l] / max(len(order) - 1, 1) for l in layers], dtype=np.float32)


def plot_space_grid(ws, path, formats=("png",), max_columns: int = 8) -> list[Path]:
    """Scatter of every checkpoint's neurons in the shared 2-D frame; colour = layer depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .. import io

    models = ws.models
    columns = {m: _pick(ws.tags(m), max_columns) for m in models}
    ncol = max(len(v) for v in columns.values())
    xy_all = np.concatenate([np.asarray(ws.layout(m, t)) for m in models for t in columns[m]])
    lo, hi = xy_all.min(0), xy_all.max(0)
    pad = 0.05 * (hi - lo)
    fig, axes = plt.subplots(len(models), ncol, figsize=(2.3 * ncol, 2.5 * len(models)), squeeze=False)
    base = ws.base
    for r, m in enumerate(models):
        cks = {c.tag: c for c in ws.checkpoints(m)}
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(columns[m]):
                ax.axis("off")
                continue
            tag = columns[m][c]
            xy = np.asarray(ws.layout(m, tag))
            ids = io.read_json(ws.stimuli_dir(m, tag) / "neurons.json")["neuron_ids"]
            ax.scatter(xy[:, 0], xy[:, 1], c=layer_depth(ids), cmap="viridis", s=3, linewidths=0, vmin=0, vmax=1)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            acc = cks[tag].metrics.get("train_top1")
            title = f"{tag}" + (f"  acc {acc:.2f}" if acc is not None else "") + ("  (base)" if (m, tag) == base else "")
            ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(m, fontsize=9)
    fig.suptitle("Unified semantic space (colour: layer depth, dark = early)", fontsize=10)
    fig.tight_layout()
    out = io.save_figure(fig, path, formats, dpi=110)
    plt.close(fig)
    return out


def _pick(tags: list[str], n: int) -> list[str]:
    if len(tags) <= n:
        return list(tags)
    idx = np.unique(np.round(np.linspace(0, len(tags) - 1, n)).astype(int))
    return [tags[i] for i in idx]
