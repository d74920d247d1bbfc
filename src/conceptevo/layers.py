"""Find a model's layers and read their outputs through forward hooks.

Layers are named by their dotted ``named_modules()`` path, so any architecture
works (sequential, residual, branching). A neuron is one output channel of a
layer (one output unit of a ``Linear``); its id is ``"path:channel"``.

Hooks only ever live inside :class:`capture`, a context manager that removes
them on exit, whatever happens, and can tell which hooks never fired.
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import LayerNotFoundError

DEFAULT_LAYER_TYPES: tuple[type, ...] = (nn.Conv2d,)


@dataclass(frozen=True)
class LayerInfo:
    """One layer's metadata, derived from a forward pass of the model."""

    name: str
    channels: int
    spatial: tuple[int, ...]  # shape of one channel's activation map, () for Linear

    @property
    def positions(self) -> int:
        n = 1
        for s in self.spatial:
            n *= s
        return n


def neuron_id(layer: str, channel: int) -> str:
    return f"{layer}:{channel}"


def split_neuron_id(nid: str) -> tuple[str, int]:
    layer, _, ch = nid.rpartition(":")
    if not layer or not ch.isdigit():
        raise LayerNotFoundError(f"malformed neuron id {nid!r}: expected 'module.path:channel', e.g. 'features.0:3'")
    return layer, int(ch)


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
                from .errors import suggest

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


@contextmanager
def capture(model: nn.Module, layers: Iterable[str], fn: Callable[[str, torch.Tensor], object] | None = None):
    """Register forward hooks on ``layers``; yield a dict filled on each forward.

    With ``fn``, the dict holds ``fn(name, output)`` instead of the raw output
    (reduce inside the hook, so full activation maps are never kept).
    Hooks are removed on exit. ``outputs.missing()`` lists layers whose hook
    has not fired since the last ``outputs.clear()``.
    """
    modules = dict(model.named_modules())
    outputs = _Outputs(list(layers))
    handles = []
    try:
        for name in outputs.layers:
            if name not in modules:
                raise LayerNotFoundError(f"layer {name!r} is not a module of the model")

            def hook(_mod, _inp, out, _name=name):
                if not isinstance(out, torch.Tensor):
                    raise LayerNotFoundError(
                        f"layer {_name!r} returns {type(out).__name__}, not a tensor; choose a module whose output is a tensor"
                    )
                outputs[_name] = fn(_name, out) if fn is not None else out

            handles.append(modules[name].register_forward_hook(hook))
        yield outputs
    finally:
        for h in handles:
            h.remove()


class _Outputs(dict):
    def __init__(self, layers: list[str]):
        super().__init__()
        self.layers = layers

    def missing(self) -> list[str]:
        return [n for n in self.layers if n not in self]

    def require_all(self) -> None:
        miss = self.missing()
        if miss:
            raise LayerNotFoundError(
                f"layer(s) {', '.join(miss)} never ran in the forward pass; "
                "choose modules that the model's forward() actually calls"
            )


def layer_infos(model: nn.Module, layers: Sequence[str], example: torch.Tensor) -> list[LayerInfo]:
    """Channels and activation-map shape of each layer, from one forward of ``example`` (a batch)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture(model, layers, lambda n, out: tuple(out.shape[1:])) as shapes:
            model(example)
            shapes.require_all()
    finally:
        model.train(was_training)
    return [LayerInfo(name=n, channels=int(shapes[n][0]) if shapes[n] else 1, spatial=tuple(int(s) for s in shapes[n][1:])) for n in layers]


def neuron_ids_of(infos: Sequence[LayerInfo]) -> list[str]:
    return [neuron_id(info.name, c) for info in infos for c in range(info.channels)]
