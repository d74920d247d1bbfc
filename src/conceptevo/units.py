"""What a unit (a "neuron") is: one channel of one layer, and how its map becomes one strength.

Everything the rest of the library needs to know about the shape of a layer's
output lives here, so a new kind of layer is a change to this module only:

* :class:`LayerInfo`: a layer's name, channel count, which axis of its output
  holds the channels, the shape of the positions each channel is measured at,
  and how a channel's values over those positions reduce to one strength.
  A convolution's ``[B, C, H, W]`` output has ``channel_axis=1`` and positions
  ``(H, W)``; a ``Linear``'s ``[B, C]`` has no positions (``()``); a
  token-sequence layer's ``[B, T, C]`` has ``channel_axis=-1`` and positions
  ``(T,)``.
* :func:`strength` / :func:`strength_and_position`: ``[B, C]`` strengths (and
  the flat position that gave each, for reductions that have one) of a batch's
  output, by the layer's reduction. The paper's is the maximum over the map
  (``"max"``, the default); :data:`REDUCTIONS` lists the others.
* :func:`neuron_id` / :func:`split_neuron_id` / :func:`layer_of`: the compact
  ``"layer:channel"`` id, formatted and parsed in this one place.

This module imports neither numba nor torch (the reductions take tensors and
import torch only when called).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from .errors import ConceptEvoError, LayerNotFoundError

#: Reductions of a channel's values over its positions to one strength per image.
#: "max": the paper's (a neuron's strength is the peak of its activation map); "mean": the map's average.
REDUCTIONS = ("max", "mean")

if TYPE_CHECKING:  # torch is imported where tensors are reduced, so reading results never loads it
    import torch


def check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise ConceptEvoError(f"reduce={reduce!r} is not a known reduction; use one of {', '.join(map(repr, REDUCTIONS))}")
    return reduce


# ---------------------------------------------------------------------------------------------- ids
def neuron_id(layer: str, channel: int) -> str:
    """``("features.3", 12)`` -> ``"features.3:12"``."""
    return f"{layer}:{int(channel)}"


def split_neuron_id(nid: str) -> tuple[str, int]:
    """``"features.3:12"`` -> ``("features.3", 12)``; a clear error for anything else."""
    layer, _, ch = str(nid).rpartition(":")
    if not layer or not ch.isdigit():
        raise LayerNotFoundError(f"malformed neuron id {nid!r}: expected 'module.path:channel', e.g. 'features.0:3'")
    return layer, int(ch)


def layer_of(nid: str) -> str:
    """``"features.3:12"`` -> ``"features.3"``."""
    return split_neuron_id(nid)[0]


def layers_of(ids: Iterable[str]) -> list[str]:
    """The layer of every id, in order."""
    return [layer_of(n) for n in ids]


def rows_by_layer(ids: Iterable[str]) -> dict[str, list[int]]:
    """Layer -> positions of its ids in ``ids``, layers in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, nid in enumerate(ids):
        out.setdefault(layer_of(nid), []).append(i)
    return out


# ---------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class LayerInfo:
    """One layer's units, derived from a forward pass of the model (never written by hand).

    ``position_shape`` is the shape of one channel's values within one input:
    ``(H, W)`` for a conv map, ``(T,)`` for tokens, ``()`` for a ``Linear``.
    ``channel_axis`` is where the channels sit in the batch's output (1 for
    ``[B, C, ...]``, -1 for ``[B, ..., C]``); ``reduce`` names the reduction of
    a channel's values to one strength (:data:`REDUCTIONS`).
    """

    name: str
    channels: int
    position_shape: tuple[int, ...] = ()
    channel_axis: int = 1
    reduce: str = "max"

    def __post_init__(self):
        object.__setattr__(self, "position_shape", tuple(int(s) for s in self.position_shape))
        if self.channel_axis not in (1, -1):
            raise ConceptEvoError(f"channel_axis must be 1 ([B, C, ...]) or -1 ([B, ..., C]), got {self.channel_axis!r}")
        check_reduce(self.reduce)

    @classmethod
    def from_output(cls, name: str, shape: Sequence[int], channel_axis: int = 1, reduce: str = "max") -> "LayerInfo":
        """From the shape of one input's output (the batch axis left out): ``(C, H, W)``, ``(T, C)``, ``(C,)``."""
        shape = tuple(int(s) for s in shape)
        if not shape:
            return cls(name, 1, (), channel_axis, reduce)
        if channel_axis == 1:
            return cls(name, shape[0], shape[1:], channel_axis, reduce)
        return cls(name, shape[-1], shape[:-1], channel_axis, reduce)

    @property
    def spatial(self) -> tuple[int, ...]:
        """The position shape (the name stimuli files and receptive fields use for conv maps)."""
        return self.position_shape

    @property
    def num_positions(self) -> int:
        """How many positions one channel is measured at (1 for a ``Linear``)."""
        n = 1
        for s in self.position_shape:
            n *= s
        return n

    def neuron_ids(self) -> list[str]:
        return [neuron_id(self.name, c) for c in range(self.channels)]

    def unravel(self, flat: int) -> tuple[int, ...]:
        """A flat position (as :func:`strength_and_position` gives) as an index into ``position_shape``."""
        if not self.position_shape:
            return ()
        out = []
        for s in reversed(self.position_shape):
            out.append(int(flat) % s)
            flat = int(flat) // s
        return tuple(reversed(out))

    def strength(self, out: torch.Tensor) -> torch.Tensor:
        return strength(out, self.channel_axis, self.reduce)

    def to_json(self) -> dict:
        d = {"name": self.name, "channels": self.channels, "spatial": list(self.position_shape)}
        if self.channel_axis != 1:
            d["channel_axis"] = self.channel_axis
        if self.reduce != "max":
            d["reduce"] = self.reduce
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LayerInfo":
        return cls(d["name"], int(d["channels"]), tuple(d["spatial"]), int(d.get("channel_axis", 1)), d.get("reduce", "max"))


def neuron_ids_of(infos: Sequence[LayerInfo]) -> list[str]:
    return [nid for info in infos for nid in info.neuron_ids()]


# ---------------------------------------------------------------------------------------------- reduction
def channels_first(out: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
    """``out`` as ``[B, C, positions...]`` (a view, no copy)."""
    if channel_axis == 1 or out.dim() <= 2:
        return out
    return out.movedim(-1, 1)


def strength(out: torch.Tensor, channel_axis: int = 1, reduce: str = "max") -> torch.Tensor:
    """``[B, C]`` strengths of a batch's layer output: each channel's values over its positions reduced.

    A ``[B, C]`` output is returned as it is (one value per channel already).
    """
    if out.dim() == 2:
        return out
    out = channels_first(out, channel_axis)
    dims = tuple(range(2, out.dim()))
    if reduce == "max":
        return out.amax(dim=dims)
    check_reduce(reduce)
    return out.mean(dim=dims)


def strength_and_position(out: torch.Tensor, channel_axis: int = 1, reduce: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C]`` strengths and the flat position that gave each (the first, on ties), as new tensors.

    Only the "max" reduction has a position; for the others every position is 0.
    A ``[B, C]`` output is copied (the next module may change it in place).
    """
    import torch

    if out.dim() == 2:
        return out.clone(), torch.zeros_like(out, dtype=torch.int64)
    if reduce != "max":
        s = strength(out, channel_axis, reduce)
        return s, torch.zeros(s.shape, dtype=torch.int64, device=s.device)
    out = channels_first(out, channel_axis)
    if out.dim() == 4 and not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last):
        # channels-last maps: reduce over the positions axis of the NHWC view, with no copy
        b, c = out.shape[:2]
        return out.permute(0, 2, 3, 1).reshape(b, -1, c).max(dim=1)
    return out.flatten(2).max(dim=2)


def position_of(maps: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Flat position (first on ties) that gives the strength of each of ``maps`` ``[..., positions]``."""
    if reduce != "max":
        import torch

        return torch.zeros(maps.shape[:-1], dtype=torch.int64, device=maps.device)
    return maps.argmax(dim=-1)


__all__ = ["REDUCTIONS", "LayerInfo", "neuron_id", "split_neuron_id", "layer_of", "layers_of", "rows_by_layer",
           "neuron_ids_of", "strength", "strength_and_position", "position_of", "channels_first"]
