"""Every forward hook conceptevo puts on a model, and the model-state helpers around them.

:func:`layer_hooks` is the one hook helper. It hooks named layers (dotted
``named_modules()`` paths) for the duration of a ``with`` block and always
removes the hooks on exit. One flag picks the variant:

* ``mode="capture"`` (default): record each layer's output, or ``fn(name,
  output)`` when ``fn`` is given (reduce inside the hook, so full activation
  maps are never kept);
* ``mode="replace"``: ``fn(name, output)``'s return value replaces the layer's
  output, and the rest of the network runs on it;
* ``mode="until"``: capture, and stop the forward pass as soon as every layer
  has produced its output (nothing after the last needed layer runs). The stop
  ends the ``with`` block's body; the block exits normally.

Inside the block PyTorch's fused transformer fast path is off
(:func:`conceptevo.models.fastpath.slow_path`), so an ``nn.TransformerEncoderLayer``
in eval mode calls its submodules and their hooks fire; this one place covers
every pass (stimuli, importance, reversion, patches). The yielded :class:`LayerOutputs` is a dict of what was captured, with
``calls`` (how often each layer ran), :meth:`~LayerOutputs.require_all` (a
layer that never ran is an error that says so, and why when a transformer module
of PyTorch is the reason) and
:meth:`~LayerOutputs.require_once`.

:func:`eval_mode` / :func:`train_mode` switch models' mode inside a ``with``
block and give every submodule back its *own* flag on exit (``model.train(was)``
would set every submodule to the parent's flag, turning a user's frozen
BatchNorm back to training). :func:`check_model_device` is the one check that a
device exists and that a model's weights are on it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import ConceptEvoError, LayerNotFoundError, check_device
from .models.fastpath import explain_unfired, slow_path

MODES = ("capture", "replace", "until")


class _StopForward(Exception):
    """Raised by the last needed hook of ``mode="until"``; caught by :func:`layer_hooks`."""


class LayerOutputs(dict):
    """Outputs captured by :func:`layer_hooks` (layer name -> output or ``fn(name, output)``)."""

    def __init__(self, layers: list[str], model: nn.Module | None = None):
        super().__init__()
        self.layers = layers
        self.model = model
        self.calls = {n: 0 for n in layers}

    def clear(self) -> None:
        """Forget the outputs and the call counts (call before each forward that reuses the hooks)."""
        super().clear()
        for n in self.calls:
            self.calls[n] = 0

    def missing(self) -> list[str]:
        """Layers that have not run since the last :meth:`clear`."""
        return [n for n in self.layers if not self.calls[n]]

    def require_all(self) -> None:
        miss = self.missing()
        if miss:
            why = [explain_unfired(self.model, n) for n in miss] if self.model is not None else []
            why = [w for w in dict.fromkeys(why) if w]
            raise LayerNotFoundError(
                f"layer(s) {', '.join(miss)} never ran in the forward pass; "
                + ("; ".join(why) if why else "choose modules that the model's forward() actually calls")
            )

    def require_once(self) -> None:
        """Every layer ran exactly once since the last :meth:`clear`."""
        self.require_all()
        many = [f"{n} ({c} times)" for n, c in self.calls.items() if c > 1]
        if many:
            raise LayerNotFoundError(
                f"layer(s) {', '.join(many)} ran more than once in one forward pass, so a neuron has no single "
                "activation map; choose modules that run once per forward"
            )


@contextmanager
def layer_hooks(model: nn.Module, layers: Iterable[str], fn: Callable[[str, torch.Tensor], object] | None = None,
                mode: str = "capture"):
    """Hook ``layers`` of ``model`` for the ``with`` block; yield a :class:`LayerOutputs` (module docstring)."""
    if mode not in MODES:
        raise ConceptEvoError(f"mode={mode!r} is not one of {', '.join(map(repr, MODES))}")
    if mode == "replace" and fn is None:
        raise ConceptEvoError("mode='replace' needs fn(name, output) returning the new output")
    modules = dict(model.named_modules())
    outputs = LayerOutputs(list(dict.fromkeys(layers)), model)
    handles = []

    def hook(_mod, _inp, out, _name):
        if not isinstance(out, torch.Tensor):
            raise LayerNotFoundError(
                f"layer {_name!r} returns {type(out).__name__}, not a tensor; choose a module whose output is a tensor"
            )
        outputs.calls[_name] += 1
        if mode == "replace":
            return fn(_name, out)
        outputs[_name] = fn(_name, out) if fn is not None else out
        if mode == "until" and all(outputs.calls.values()):
            raise _StopForward
        return None

    try:
        for name in outputs.layers:
            if name not in modules:
                raise LayerNotFoundError(f"layer {name!r} is not a module of the model")
            handles.append(modules[name].register_forward_hook(lambda m, i, o, _n=name: hook(m, i, o, _n)))
        try:
            with slow_path(model):
                yield outputs
        except _StopForward:
            if mode != "until":  # pragma: no cover - only "until" hooks raise it
                raise
    finally:
        for h in handles:
            h.remove()


def capture(model: nn.Module, layers: Iterable[str], fn: Callable[[str, torch.Tensor], object] | None = None):
    """:func:`layer_hooks` in ``mode="capture"``."""
    return layer_hooks(model, layers, fn, mode="capture")


def replace_outputs(model: nn.Module, fns):
    """:func:`layer_hooks` in ``mode="replace"`` with one function per layer: ``{name: fn(output) -> new output}``."""
    fns = dict(fns)
    return layer_hooks(model, list(fns), lambda name, out: fns[name](out), mode="replace")


def forward_until(model: nn.Module, layers: Iterable[str], *args, **kwargs) -> dict[str, torch.Tensor]:
    """Run ``model(*args, **kwargs)`` only until every layer of ``layers`` has run; return their outputs."""
    with layer_hooks(model, layers, mode="until") as outs:
        model(*args, **kwargs)
    outs.require_all()
    return dict(outs)


# ---------------------------------------------------------------------------------------------- modes
@contextmanager
def train_mode(*models: nn.Module, training: bool = True):
    """Set every module of ``models`` to ``training``; on exit give each module back its own flag."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(training)
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def eval_mode(*models: nn.Module):
    """Eval mode inside the ``with`` block; every module's own train/eval flag restored on exit."""
    return train_mode(*models, training=False)


# ---------------------------------------------------------------------------------------------- devices
def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def check_model_device(model: nn.Module | None, device, role: str = "the model") -> torch.device:
    """``device`` as a ``torch.device``: an error when it does not exist here, or when ``model``'s weights live elsewhere."""
    device = torch.device(check_device(device))
    p = next(iter(model.parameters()), None) if model is not None else None
    if p is not None:
        here = p.device
        same = here.type == device.type and (device.index is None or here.index is None or here.index == device.index)
        if not same:
            raise ConceptEvoError(
                f"{role} is on {here} but device={str(device)!r}; move it first with {role}.to({str(device)!r}) "
                f"or pass device={str(here)!r}"
            )
    return device


__all__ = ["layer_hooks", "LayerOutputs", "capture", "replace_outputs", "forward_until", "eval_mode", "train_mode",
           "model_device", "check_model_device"]
