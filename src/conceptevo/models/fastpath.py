"""PyTorch's fused transformer fast path, which can skip the modules a study hooks.

In eval mode ``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder`` and
``nn.MultiheadAttention`` may run as one fused kernel
(``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_attention``)
instead of calling their submodules. A forward hook on ``linear1`` (the MLP's
hidden layer) then does not fire, or (``TransformerEncoder`` with a padding
mask) it sees nested tensors instead of ``[B, T, C]`` activations. Recent
PyTorch (2.13 here) takes an encoder layer off its fast path when one of its
own submodules carries a hook, but not for global hooks
(``register_module_forward_hook``) and not in older versions. And whatever the
mode, ``nn.MultiheadAttention`` never calls its ``out_proj`` module: it uses
the weights directly, so a hook on ``self_attn.out_proj`` never fires.

* :func:`slow_path` (a context manager) runs passes with the fast path off:
  ``torch.backends.mha.set_fastpath_enabled(False)`` and, for versions without
  that switch, each encoder layer's own fast-path condition turned off. The
  results are the same numbers (up to floating-point rounding) from the
  modules one by one.
* :func:`explain_unfired` says why a hooked layer did not run when the
  transformer modules are the reason, with the fix.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

FUSED_TYPES = (nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.MultiheadAttention)


def has_fast_path(model: nn.Module) -> bool:
    """True when ``model`` holds a module that can take PyTorch's fused transformer fast path."""
    return any(isinstance(m, FUSED_TYPES) for m in model.modules())


@contextmanager
def slow_path(model: nn.Module | None = None):
    """Within the block, transformer modules run their submodules one by one, so every forward hook fires.

    Turns off ``torch.backends.mha`` 's fast path (process-wide, restored on
    exit) and, where ``model`` is given, marks its ``nn.TransformerEncoderLayer``
    modules as not fast-path eligible (their ``activation_relu_or_gelu`` flag,
    which only that path reads; restored on exit). Costs nothing for a model
    without such modules.
    """
    mha = getattr(torch.backends, "mha", None)
    switch = mha is not None and hasattr(mha, "set_fastpath_enabled") and hasattr(mha, "get_fastpath_enabled")
    before = mha.get_fastpath_enabled() if switch else None
    layers = []
    if model is not None:
        layers = [(m, m.activation_relu_or_gelu) for m in model.modules()
                  if isinstance(m, nn.TransformerEncoderLayer) and hasattr(m, "activation_relu_or_gelu")]
    try:
        if switch:
            mha.set_fastpath_enabled(False)
        for m, _ in layers:
            m.activation_relu_or_gelu = False
        yield
    finally:
        if switch:
            mha.set_fastpath_enabled(before)
        for m, flag in layers:
            m.activation_relu_or_gelu = flag


def explain_unfired(model: nn.Module, layer: str) -> str | None:
    """Why the hook on ``layer`` did not fire, when a transformer module of PyTorch is the reason; else None.

    Meant for the error a study raises when a hooked layer did not run: append
    the sentence it returns.
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        return None
    parts = layer.split(".")
    ancestors = [(".".join(parts[:i]), modules.get(".".join(parts[:i]))) for i in range(len(parts) - 1, -1, -1)]
    ancestors = [(n, m) for n, m in ancestors if m is not None and (n or m is model)]
    for name, mod in ancestors:
        if isinstance(mod, nn.MultiheadAttention) and layer.startswith((name + "." if name else "") + "out_proj"):
            where = name or "the model"
            return (f"{layer!r} is the output projection of the nn.MultiheadAttention {where!r}, which PyTorch applies "
                    f"with its weights directly and never calls as a module (in train and eval mode alike), so no hook "
                    f"on it can fire; study {where!r} itself (its output is the attention's output), or write the "
                    "attention with its own nn.Linear layers")
    for name, mod in ancestors:
        if isinstance(mod, FUSED_TYPES):
            where = name or "the model"
            return (f"{layer!r} sits inside the {type(mod).__name__} {where!r}, whose eval-mode fast path in PyTorch runs "
                    "the block as one fused kernel and skips its submodules and their hooks; run the passes on the slow "
                    "path: `with conceptevo.models.fastpath.slow_path(model): ...` (it sets "
                    "torch.backends.mha.set_fastpath_enabled(False) while it runs)")
    return None
