"""Figures of text studies: the space per checkpoint and one unit's top contexts per checkpoint."""
from __future__ import annotations

from pathlib import Path

from .. import io
from ..contexts import neuron_contexts_html, plot_neuron_contexts
from . import analysis
from .space import plot_space_grid


def make_text_figures(ws, out=None, neuron: str | None = None, model: str | None = None, formats=("png",)) -> list[Path]:
    """Text studies' figures: the space per checkpoint (``space.*``) and one unit's contexts per checkpoint
    (``contexts.*`` and ``contexts.html``); the unit defaults to the base model's one that moved furthest."""
    out = Path(out) if out is not None else ws.figures_dir
    model = model or ws.base[0]
    out.mkdir(parents=True, exist_ok=True)
    plot_space_grid(ws, out / "space.png", formats=formats)
    paths = io.figure_paths(out / "space.png", formats)
    if neuron is None:
        neuron = analysis.most_moving_neuron(ws, model, analysis.unified_vectors(ws)) or \
            ws.stimuli(model, ws.tags(model)[-1]).neuron_ids[0]
    paths += plot_neuron_contexts(ws, out / "contexts.png", neuron, model, formats=formats)
    page = out / "contexts.html"
    page.write_text(neuron_contexts_html(ws, neuron, model), encoding="utf-8")
    return [Path(p) for p in paths] + [page]
