"""Brute-force reference for text stimuli, for tests of the stimuli pass on language models.

A unit of a ``[B, T, C]`` layer is one channel ``c``. Its strength on a window
is its maximum over the window's tokens; its stimuli are the ``k`` windows
where it is strongest, each with the argmax token's position. Ties: the lower
window index first, and the first position of the maximum in a window. This is
a per-window, per-unit, per-position loop in plain Python: slow, obviously
right, for small cases only.
"""
from __future__ import annotations

import torch
from torch import nn


def layer_output(model: nn.Module, layer: str, ids: torch.Tensor) -> torch.Tensor:
    """The output of module ``layer`` when ``model`` runs on ``ids`` [B, T] (one forward, hook removed after)."""
    got = []
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: got.append(o.detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    if len(got) != 1:
        raise AssertionError(f"layer {layer} ran {len(got)} times in one forward")
    return got[0]


def reference_text_stimuli(model: nn.Module, layer: str, windows, k: int) -> dict[int, list[tuple[int, int, float]]]:
    """For each unit ``c`` of ``layer``: its top-``k`` windows as ``(window index, argmax position, strength)``, strongest first."""
    model.eval()
    per_window = []  # per window: its [T, C] activations, each window run on its own
    for w in range(len(windows)):
        ids = windows[w][0][None]
        act = layer_output(model, layer, ids)
        if act.dim() != 3 or act.shape[:2] != ids.shape:
            raise AssertionError(f"layer {layer} output {tuple(act.shape)} is not [B, T, C] for input {tuple(ids.shape)}")
        per_window.append(act[0])
    C = per_window[0].shape[1]
    out = {}
    for c in range(C):
        scored = []
        for w, act in enumerate(per_window):
            best_pos, best = 0, float(act[0, c])
            for t in range(1, act.shape[0]):
                if float(act[t, c]) > best:
                    best_pos, best = t, float(act[t, c])
            scored.append((w, best_pos, best))
        scored.sort(key=lambda r: (-r[2], r[0]))
        out[c] = scored[:k]
    return out
