"""Find a model's layers and their units.

Layers are named by their dotted ``named_modules()`` path, so any architecture
works (sequential, residual, branching). A neuron is one output channel of a
layer (one output unit of a ``Linear``); its id is ``"path:channel"``
(:mod:`conceptevo.units` formats and parses it, and holds :class:`LayerInfo`).

Hooks only ever live inside :func:`conceptevo.hooks.layer_hooks` (``capture``
here is its capturing variant), a context manager that removes them on exit,
whatever happens, and can tell which hooks never fired.
"""
from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import nn

from .errors import LayerNotFoundError, suggest
from .hooks import capture, eval_mode
from .units import LayerInfo, neuron_id, neuron_ids_of, split_neuron_id

DEFAULT_LAYER_TYPES: tuple[type, ...] = (nn.Conv2d,)


def resolve_layers(model: nn.Module, layers=None) -> list[str]:
    """Module paths of the layers to study, in the model's module order.

    ``layers`` may be None (every ``Conv2d``), or a sequence mixing exact
    module paths, glob patterns (``"features.*"``) and module types
    (``nn.Linear``). Unknown names raise an error that lists what exists.
    """
    named = [(name, mod) for name, mod in model.named_modules() if name]
    if layers is None:
        chosen = [name for name, mod in named if isinstance(mod, DEFAULT_LAYER_TYPES)]
        if not chosen:
            raise LayerNotFoundError(
                "the model has no Conv2d layer; name the layers to study with layers=[...] "
                f"(available: {_preview([n for n, _ in named])})"
            )
        return chosen
    if isinstance(layers, (str, type)):
        layers = [layers]
    names = [n for n, _ in named]
    wanted: set[str] = set()
    for item in layers:
        if isinstance(item, type):
            hit = [n for n, m in named if isinstance(m, item)]
            if not hit:
                raise LayerNotFoundError(f"the model has no module of type {item.__name__}")
        elif any(ch in item for ch in "*?["):
            hit = fnmatch.filter(names, item)
            if not hit:
                raise LayerNotFoundError(
                    f"layer pattern {item!r} matches no module of the model; available: {_preview(names)}"
                )
        else:
            if item not in names:
                raise LayerNotFoundError(
                    f"layer {item!r} is not a module of the model.{suggest(item, names)} "
                    f"Available: {_preview(names)}"
                )
            hit = [item]
        wanted.update(hit)
    return [n for n in names if n in wanted]


def _preview(names: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def layer_infos(model: nn.Module, layers: Sequence[str], example: torch.Tensor) -> list[LayerInfo]:
    """Channels and activation-map shape of each layer, from one forward of ``example`` (a batch)."""
    with eval_mode(model), torch.no_grad(), capture(model, layers, lambda n, out: tuple(out.shape[1:])) as shapes:
        model(example)
        shapes.require_all()
    return [LayerInfo.from_output(n, shapes[n]) for n in layers]


__all__ = ["DEFAULT_LAYER_TYPES", "resolve_layers", "layer_infos", "capture", "LayerInfo", "neuron_id",
           "split_neuron_id", "neuron_ids_of"]
