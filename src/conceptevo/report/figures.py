"""The paper's pictures: Fig 1 (neuron groups), Fig 2 (the space), Fig 3 (one neuron).

Each ``plot_*`` function returns a matplotlib ``Figure`` (shown inline when it
is a notebook cell's value) and writes it too when given a path. The figures
are drawn by their own Agg canvas, never through pyplot: the global backend
and pyplot's figure list are left as they were.
:func:`make_figures` writes all three into the workspace's ``figures/`` (PNG and PDF).
Example patches must be computed first (:func:`conceptevo.patches.compute_patches`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import io
from ..errors import ConceptEvoError, WorkspaceError
from ..contexts import is_text_workspace
from ..units import split_neuron_id
from . import analysis
from ._util import _check_formats, _workspace
from .groups import plot_groups
from .space import plot_space_grid
from .text import make_text_figures

log = logging.getLogger(__name__)

DPI = 130          # resolution of the PNG files
MARKER_PT = 6      # diameter of a checkpoint's marker on a neuron's path, in points


def _save(fig, path, formats) -> list[Path]:
    return io.save_figure(fig, path, formats, dpi=DPI, bbox_inches="tight")


def _row_image(patches: np.ndarray, gap: int = 2) -> np.ndarray:
    """``[k, P, P, C]`` uint8 -> one RGB row with white gaps."""
    k, P, _, C = patches.shape
    rgb = np.repeat(patches, 3, axis=-1) if C == 1 else patches
    out = np.full((P, k * P + (k - 1) * gap, 3), 255, dtype=np.uint8)
    for j in range(k):
        out[:, j * (P + gap):j * (P + gap) + P] = rgb[j]
    return out


def _require_patches(store, pairs):
    missing = [f"{m} {t}" for m, t in pairs if not store.has(m, t)]
    if missing:
        raise WorkspaceError(
            f"no example patches for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; "
            f"compute them with `conceptevo patches {store.ws.path}` (or `conceptevo figures`, which does it first)"
        )


def plot_neuron_groups(ws, path=None, formats=("png", "pdf"), groups: int = 3, per_model: int = 2, k: int = 8,
                       patches_shown: int = 5, seed: int = 0, vectors=None):
    """Paper Fig 1: K-means groups of the unified space, highlighted in every model, with their neurons' patches.

    Returns the ``Figure``; with ``path``, also writes it in each of ``formats``
    (``path``'s suffix replaced).

    The groups shown are those shared by the most models (then the tightest);
    for each, the ``per_model`` neurons nearest the group centre in each model's
    last checkpoint, with their first ``patches_shown`` example patches
    (:func:`conceptevo.report.groups.plot_groups`).
    """
    from ..patches import PatchStore

    formats = _check_formats(formats)
    ws = _workspace(ws)
    store = PatchStore(ws)

    def draw(ax, m, tag, rows, ids, colour):
        strips = [_row_image(store.patches(m, tag, int(r))[:patches_shown]) for r in rows]
        width = max(s.shape[1] for s in strips)
        stack = np.full((sum(s.shape[0] for s in strips) + 3 * (len(strips) - 1), width, 3), 255, np.uint8)
        y = 0
        for s in strips:
            stack[y:y + s.shape[0], :s.shape[1]] = s
            y += s.shape[0] + 3
        ax.imshow(stack, interpolation="nearest")
        ax.set_title(", ".join(ids[int(r)] for r in rows), fontsize=6, color=colour)

    fig = plot_groups(ws, draw, groups=groups, per_model=per_model, k=k, seed=seed, vectors=vectors,
                      check=lambda pairs: _require_patches(store, pairs),
                      title="Neuron groups of the unified space (K-means), across models, with example patches")
    if path is not None:
        _save(fig, path, formats)
    return fig


def plot_neuron_evolution(ws, path=None, neuron: str | None = None, model: str | None = None, formats=("png", "pdf"),
                          patches_shown: int | None = None, vectors=None):
    """Paper Fig 3: one neuron's path through the unified space over training, with its patches at each checkpoint.

    Default: the base model's neuron whose vector travelled furthest. Returns
    the ``Figure``; with ``path``, also writes it in each of ``formats``.
    """
    from ..patches import PatchStore

    import matplotlib

    formats = _check_formats(formats)
    ws = _workspace(ws)
    model = model or ws.base[0]
    if model not in ws.models:
        raise WorkspaceError(f"model {model!r} is not in this study; models: {', '.join(ws.models)}")
    vectors = analysis.unified_vectors(ws) if vectors is None else vectors
    lay = analysis.layouts(ws)
    tags = [t for t in ws.tags(model) if lay.get((model, t)) is not None]
    if not tags:
        raise WorkspaceError(f"no 2-D layout for {model} yet; run `conceptevo run` on the study's config")
    if neuron is None:
        neuron = analysis.most_moving_neuron(ws, model, vectors) or analysis.neuron_ids(ws, model, tags[-1])[0]
    split_neuron_id(neuron)  # validates the form
    ids = analysis.neuron_ids(ws, model, tags[-1])
    if neuron not in ids:
        from ..errors import suggest

        raise ConceptEvoError(f"neuron {neuron!r} is not in {model}.{suggest(neuron, ids)} Ids look like {ids[0]!r}")
    row = ids.index(neuron)
    store = PatchStore(ws)
    _require_patches(store, [(model, t) for t in tags])
    cks = {c.tag: c for c in ws.checkpoints(model)}
    k_all = store.geometry(model, tags[0]).per_entry
    k = k_all if patches_shown is None else max(1, min(int(patches_shown), k_all))
    rows_img = [_row_image(store.patches(model, t, row)[:k]) for t in tags]
    gap = max(2, rows_img[0].shape[0] // 6)
    P = rows_img[0].shape[0]
    grid = np.full((len(tags) * (P + gap) - gap, rows_img[0].shape[1], 3), 255, np.uint8)
    for i, r in enumerate(rows_img):
        grid[i * (P + gap):i * (P + gap) + P] = r
    aspect = grid.shape[0] / grid.shape[1]
    width_r = 0.6 * k
    # constrained layout keeps the row labels off the path panel; the figure is made at the saved resolution,
    # so the label placement below measures what the PNG shows
    fig = io.new_figure(figsize=(4.0 + width_r + 1.2, max(3.4, width_r * aspect + 1.0)), dpi=DPI, layout="constrained")
    gs = fig.add_gridspec(1, 2, width_ratios=[4.0, width_r])
    ax = fig.add_subplot(gs[0, 0])
    bg = lay[(model, tags[-1])]
    ax.scatter(bg[:, 0], bg[:, 1], s=3, c="#d8d8d8", linewidths=0)
    path_xy = np.array([lay[(model, t)][row] for t in tags])
    cmap = matplotlib.colormaps["plasma"]
    ax.plot(path_xy[:, 0], path_xy[:, 1], "-", color="#555", lw=1, zorder=2)
    for i, t in enumerate(tags):
        col = cmap(i / max(1, len(tags) - 1) * 0.85)
        ax.scatter(*path_xy[i], s=MARKER_PT ** 2, color=col, zorder=3, edgecolors="k", linewidths=0.4)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("path through the unified space", fontsize=8)
    a = fig.add_subplot(gs[0, 1])
    a.imshow(grid, interpolation="nearest")
    a.set_xticks([])
    a.set_yticks([i * (P + gap) + P / 2 for i in range(len(tags))])
    labels = []
    for t in tags:
        acc = cks[t].metrics.get("train_top1")
        labels.append(f"{t}" + (f"\nacc {acc:.2f}" if acc is not None else ""))
    a.set_yticklabels(labels, fontsize=7)
    a.tick_params(length=0)
    for side in a.spines.values():
        side.set_visible(False)
    a.set_title("example patches", fontsize=8)
    fig.suptitle(f"Evolution of neuron {neuron} ({model}); right: its example patches at each checkpoint", fontsize=9)
    unplaced = label_points(ax, path_xy, tags)
    if unplaced:
        log.info("evolution figure: no room to label %d of %d checkpoints on the path (%s); their colour orders them",
                 len(unplaced), len(tags), ", ".join(unplaced[:4]))
    if path is not None:
        _save(fig, path, formats)
    return fig


def label_points(ax, xy, labels, fontsize: float = 7, marker_pt: float = None) -> list[str]:
    """Label points of ``ax`` so that no label overlaps another, a point, or leaves the panel; return those left out.

    Measured with the renderer once the figure's layout is final: each label,
    the last point's first, takes the first free spot on rings of growing
    radius around its point (a thin leader line joins it to a spot further
    than a few points away).
    """
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    marker_pt = MARKER_PT if marker_pt is None else marker_pt
    fig = ax.figure
    fig.canvas.draw()                          # runs the layout engine: positions are final
    r = fig.canvas.get_renderer()
    box = ax.get_window_extent(r)
    disp = ax.transData.transform(np.asarray(xy, dtype=float))
    half = (marker_pt / 2 + 1) * fig.dpi / 72
    taken = [Bbox.from_extents(x - half, y - half, x + half, y + half) for x, y in disp]
    directions = [(1, 1), (-1, 1), (1, -1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    left_out = []
    for i in reversed(range(len(labels))):
        spot = None
        for radius in (4, 9, 15, 22, 30, 40, 52, 66, 82, 100, 125, 150):
            for dx, dy in directions:
                norm = float(np.hypot(dx, dy))
                ann = ax.annotate(str(labels[i]), xy[i], xytext=(radius * dx / norm, radius * dy / norm),
                                  textcoords="offset points", fontsize=fontsize,
                                  ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                  va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                                  arrowprops=dict(arrowstyle="-", color="#888", lw=0.5, shrinkA=0, shrinkB=0)
                                  if radius > 9 else None)
                ann.set_in_layout(False)
                ann.update_positions(r)            # an annotation places its text only when drawn
                bb = Text.get_window_extent(ann, r)
                inside = box.x0 + 1 <= bb.x0 and bb.x1 <= box.x1 - 1 and box.y0 + 1 <= bb.y0 and bb.y1 <= box.y1 - 1
                if inside and not any(bb.overlaps(o) for o in taken):
                    spot = bb
                    break
                ann.remove()
            if spot is not None:
                break
        if spot is None:
            left_out.append(str(labels[i]))
        else:
            taken.append(spot)
    return left_out[::-1]



def make_figures(ws, out: str | Path | None = None, formats=("png", "pdf"), neuron: str | None = None,
                 model: str | None = None, groups: int = 3, k: int = 8, seed: int = 0) -> list[Path]:
    """Write Fig 2 (space.*), Fig 1 (groups.*) and Fig 3 (evolution.*) into ``out`` (default: the workspace's figures/).

    ``ws`` is a :class:`~conceptevo.Workspace` or its folder.
    """

    ws = _workspace(ws)
    formats = _check_formats(formats)
    if is_text_workspace(ws):  # token windows: contexts instead of image patches
        return make_text_figures(ws, out, neuron=neuron, model=model, formats=formats)
    out = Path(out) if out is not None else ws.figures_dir
    vectors = analysis.unified_vectors(ws)
    plot_space_grid(ws, out / "space.png", formats=formats)
    plot_neuron_groups(ws, out / "groups.png", formats=formats, groups=groups, k=k, seed=seed, vectors=vectors)
    plot_neuron_evolution(ws, out / "evolution.png", neuron=neuron, model=model, formats=formats, vectors=vectors)
    return [p for name in ("space", "groups", "evolution") for p in io.figure_paths(out / f"{name}.png", formats)]
