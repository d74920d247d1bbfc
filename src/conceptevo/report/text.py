"""Figures of text studies: the space per checkpoint, the K-means groups with a line of context per unit, and one
unit's top contexts per checkpoint."""
from __future__ import annotations

from pathlib import Path

from .. import io
from ..contexts import (context_strings, draw_context_line, load_contexts, neuron_contexts_html, plot_neuron_contexts,
                        workspace_tokenizer)
from . import analysis
from .groups import plot_groups
from .space import plot_space_grid


def plot_text_groups(ws, path=None, formats=("png",), groups: int = 3, per_model: int = 3, k: int = 8,
                     contexts_shown: int = 2, chars: int = 12, seed: int = 0, vectors=None):
    """Paper Fig 1 for text: K-means groups of the unified space in every model, each group's ``per_model`` units
    nearest its centre with their ``contexts_shown`` strongest contexts (argmax token highlighted, ``chars``
    characters each side, newlines as marks, no mathtext). Returns the ``Figure``; with ``path``, also writes it."""
    tk = workspace_tokenizer(ws)
    cache: dict = {}

    def draw(ax, m, tag, rows, ids, colour):
        if (m, tag) not in cache:
            cache[(m, tag)] = load_contexts(ws, m, tag)
        lines = len(rows) * (1 + contexts_shown)
        y = lambda j: 1 - (j + 0.5) / lines  # noqa: E731
        j = 0
        for r in rows:
            ax.text(0.0, y(j), ids[int(r)], transform=ax.transAxes, fontsize=6, color=colour, va="center",
                    parse_math=False)
            j += 1
            for c in cache[(m, tag)][int(r)][:contexts_shown]:
                draw_context_line(ax, y(j), *context_strings(tk, c), fontsize=6, chars=chars)
                j += 1

    fig = plot_groups(ws, draw, groups=groups, per_model=per_model, k=k, seed=seed, vectors=vectors,
                      row_height=0.16 * per_model * (1 + contexts_shown), width=3.4,
                      title="Unit groups of the unified space (K-means), across models, with each unit's top contexts")
    if path is not None:
        io.save_figure(fig, path, formats, dpi=150, bbox_inches="tight")
    return fig


def make_text_figures(ws, out=None, neuron: str | None = None, model: str | None = None, formats=("png",)) -> list[Path]:
    """Text studies' figures: the space per checkpoint (``space.*``), the groups with their contexts (``groups.*``)
    and one unit's contexts per checkpoint (``contexts.*`` and ``contexts.html``); the unit defaults to the base
    model's one that moved furthest."""
    out = Path(out) if out is not None else ws.figures_dir
    model = model or ws.base[0]
    out.mkdir(parents=True, exist_ok=True)
    plot_space_grid(ws, out / "space.png", formats=formats)
    paths = io.figure_paths(out / "space.png", formats)
    vectors = analysis.unified_vectors(ws)
    plot_text_groups(ws, out / "groups.png", formats=formats, vectors=vectors)
    paths += io.figure_paths(out / "groups.png", formats)
    if neuron is None:
        neuron = analysis.most_moving_neuron(ws, model, vectors) or \
            ws.stimuli(model, ws.tags(model)[-1]).neuron_ids[0]
    paths += plot_neuron_contexts(ws, out / "contexts.png", neuron, model, formats=formats)
    page = out / "contexts.html"
    page.write_text(neuron_contexts_html(ws, neuron, model), encoding="utf-8")
    return [Path(p) for p in paths] + [page]
