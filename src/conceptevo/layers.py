"""Find a model's layers and their units.

Layers are named by their dotted ``named_modules()`` path, so any architecture
works (sequential, residual, branching). A neuron is one output channel of a
layer (one output unit of a ``Linear``); its id is ``"path:channel"``
(:mod:`conceptevo.units` formats and parses it, and holds :class:`LayerInfo`).

Which axis of a layer's output holds its channels (:func:`channel_axis_of`, the one place that decides):

* an explicit ``channel_axis`` wins: ``1``/``-1`` for every layer, or a table ``{"name or glob": 1 or -1}``
  (an exact name before globs, globs in the table's order; ``[stimuli] channel_axis`` in a config);
* a ``[B, C]`` output has one value per channel, whatever the module;
* convolutions, batch/instance/group norms and poolings are channels first (``[B, C, ...]``);
  ``Linear``, ``LayerNorm`` and ``Embedding`` channels last (``[B, ..., C]``: one value per token);
* any other module (activations, dropout, your own blocks) by its output's dimensions: a 3-D output is
  token-shaped, ``[B, T, C]`` (channels last), a 4-D or larger one a map, ``[B, C, H, W]`` (channels first).
  A ``ReLU`` after a ``Conv1d`` (``[B, C, L]``) therefore needs ``channel_axis={"that.relu": 1}``.

Hooks only ever live inside :func:`conceptevo.hooks.layer_hooks` (``capture``
here is its capturing variant), a context manager that removes them on exit,
whatever happens, and can tell which hooks never fired.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Sequence

import torch
from torch import nn

from .errors import LayerNotFoundError, suggest
from .hooks import capture, eval_mode
from .errors import ConceptEvoError
from .units import LayerInfo, check_channel_axis, neuron_id, neuron_ids_of, split_neuron_id

log = logging.getLogger(__name__)
_noted: set = set()

DEFAULT_LAYER_TYPES: tuple[type, ...] = (nn.Conv2d,)


def resolve_layers(model: nn.Module, layers=None) -> list[str]:
    """Module paths of the layers to study, in the model's module order.

    ``layers`` may be None (the model's default units, below), or a sequence
    mixing exact module paths, glob patterns (``"features.*"``) and module
    types (``nn.Linear``). Unknown names raise an error that lists what exists.

    With ``layers=None`` a model that states its units (a ``default_units``
    attribute, as the built-in ViT does: ``blocks.*.mlp.act``) or belongs to a
    known transformer family (torchvision's and timm's ViT, Hugging Face ViT
    and GPT-NeoX: their MLP hidden units) gets those
    (:func:`conceptevo.models.zoo.default_units`); any other model every ``Conv2d``.
    """
    named = [(name, mod) for name, mod in model.named_modules() if name]
    if layers is None:
        from .models.zoo import default_units

        units = default_units(model)
        if units:
            return resolve_layers(model, list(units))
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


CHANNELS_FIRST_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
CHANNELS_LAST_TYPES: tuple[type, ...] = (nn.Linear, nn.LayerNorm, nn.Embedding)


def channel_axes(layers: Sequence[str], channel_axis=None) -> dict[str, int | None]:
    """Each layer's explicit channel axis from ``channel_axis`` (None where not given; module docstring).

    A table key that matches none of ``layers`` is logged, not an error: one study's table serves every
    model, and a transformer's ``"blocks.*"`` matches nothing in a CNN studied beside it.
    """
    check_channel_axis(channel_axis)
    if channel_axis is None or isinstance(channel_axis, int):
        return {n: channel_axis for n in layers}
    unmatched = [key for key in channel_axis if not any(key == n or fnmatch.fnmatchcase(n, key) for n in layers)]
    note = (tuple(unmatched), tuple(layers))
    if unmatched and note not in _noted:  # once, not once per batch of an importance pass
        _noted.add(note)
        log.info("channel_axis %s matches none of the layers %s; ignored for this model",
                 ", ".join(map(repr, unmatched)), _preview(list(layers)))
    out = {}
    for n in layers:
        if n in channel_axis:
            out[n] = channel_axis[n]
        else:
            out[n] = next((v for key, v in channel_axis.items() if fnmatch.fnmatchcase(n, key)), None)
    return out


def channel_axis_of(module: nn.Module | None, ndim: int, explicit: int | None = None) -> int:
    """Where the channels of ``module``'s ``ndim``-D batch output sit: 1 or -1 (the rule of the module docstring)."""
    if ndim <= 2:
        return 1
    if explicit is not None:
        return explicit
    if isinstance(module, CHANNELS_FIRST_TYPES):
        return 1
    if isinstance(module, CHANNELS_LAST_TYPES):
        return -1
    return -1 if ndim == 3 else 1


def layer_info(module: nn.Module | None, name: str, out: torch.Tensor, explicit: int | None = None,
               reduce: str = "max") -> LayerInfo:
    """The :class:`LayerInfo` of layer ``name`` from one batch's output ``out`` of its ``module``."""
    axis = channel_axis_of(module, out.dim(), explicit)
    if out.dim() < 2:
        raise ConceptEvoError(f"layer {name!r} gives a {out.dim()}-D output {list(out.shape)}; a layer's output needs a "
                              "batch axis and a channel axis ([B, C], [B, T, C] or [B, C, H, W]); choose another module")
    return LayerInfo.from_output(name, tuple(out.shape[1:]), axis, reduce)


def layer_infos(model: nn.Module, layers: Sequence[str], example: torch.Tensor, channel_axis=None) -> list[LayerInfo]:
    """Channels, channel axis and position shape of each layer, from one forward of ``example`` (a batch)."""
    axes = channel_axes(layers, channel_axis)
    modules = dict(model.named_modules())
    with eval_mode(model), torch.no_grad(), capture(model, layers, lambda n, out: layer_info(modules[n], n, out, axes[n])) as got:
        model(example)
        got.require_all()
    return [got[n] for n in layers]


__all__ = ["DEFAULT_LAYER_TYPES", "resolve_layers", "layer_infos", "layer_info", "channel_axes", "channel_axis_of", "capture", "LayerInfo", "neuron_id",
           "split_neuron_id", "neuron_ids_of"]
