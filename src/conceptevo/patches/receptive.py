"""Receptive fields: which input pixels each position of a layer's activation map can see.

Measured on the model itself (see :func:`receptive_fields`), so any wiring is handled: strides,
pooling, residual sums, concatenated branches.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConceptEvoError
from ..hooks import layer_hooks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceptiveField:
    """Where each output position of one layer looks in the input.

    ``rows[i] = (start, stop)`` is the half-open range of input rows that output
    row ``i`` depends on, ``cols[j]`` the same for columns; both are clipped to the
    input. A layer without a spatial map (``Linear``) sees the whole input.
    """

    layer: str
    input_size: tuple[int, int]
    spatial: tuple[int, ...]
    rows: np.ndarray   # int64 [H_out, 2]
    cols: np.ndarray   # int64 [W_out, 2]

    @property
    def size(self) -> tuple[int, int]:
        """The largest extent (height, width) of any position's field, in input pixels."""
        return int((self.rows[:, 1] - self.rows[:, 0]).max()), int((self.cols[:, 1] - self.cols[:, 0]).max())

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` of output position (h, w); bottom/right exclusive."""
        return int(self.rows[h, 0]), int(self.cols[w, 0]), int(self.rows[h, 1]), int(self.cols[w, 1])

    def boxes(self, positions: np.ndarray) -> np.ndarray:
        """Boxes ``[..., 4]`` of flat positions in the layer's activation map (-1: the whole input)."""
        positions = np.asarray(positions, dtype=np.int64)
        H, W = self.input_size
        out = np.empty(positions.shape + (4,), dtype=np.int32)
        if len(self.spatial) != 2:
            out[...] = (0, 0, H, W)
            return out
        hw = self.spatial[1]
        valid = (positions >= 0) & (positions < self.spatial[0] * hw)
        p = np.where(valid, positions, 0)
        h, w = p // hw, p % hw
        out[..., 0] = self.rows[h, 0]
        out[..., 1] = self.cols[w, 0]
        out[..., 2] = self.rows[h, 1]
        out[..., 3] = self.cols[w, 1]
        out[~valid] = (0, 0, H, W)
        return out

    def to_dict(self) -> dict:
        return {"layer": self.layer, "input_size": list(self.input_size), "spatial": list(self.spatial),
                "rows": self.rows.tolist(), "cols": self.cols.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ReceptiveField":
        return cls(d["layer"], tuple(d["input_size"]), tuple(d["spatial"]),
                   np.asarray(d["rows"], dtype=np.int64).reshape(-1, 2), np.asarray(d["cols"], dtype=np.int64).reshape(-1, 2))


_MAX_TO_AVG = {
    F.max_pool1d: F.avg_pool1d, F.max_pool2d: F.avg_pool2d, F.max_pool3d: F.avg_pool3d,
    torch.max_pool1d: F.avg_pool1d, torch.max_pool2d: F.avg_pool2d, torch.max_pool3d: F.avg_pool3d,
}
_ADAPTIVE_MAX_TO_AVG = {
    F.adaptive_max_pool1d: F.adaptive_avg_pool1d, F.adaptive_max_pool2d: F.adaptive_avg_pool2d,
    F.adaptive_max_pool3d: F.adaptive_avg_pool3d,
}


def _sum_pool_dilated(x, kernel_size, stride, padding, dilation):
    """A max-pool's footprint, as a sum, for dilated 2-D pools (avg_pool has no dilation)."""
    k = nn.modules.utils._pair(kernel_size)
    s = nn.modules.utils._pair(stride if stride not in (None, []) else kernel_size)
    p, d = nn.modules.utils._pair(padding), nn.modules.utils._pair(dilation)
    B, C, H, W = x.shape
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, C*kh*kw, L]
    Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return cols.view(B, C, k[0] * k[1], -1).sum(2).view(B, C, Ho, Wo)


class _PoolsAsAverages(TorchFunctionMode):
    """Inside this mode, max-pooling (module or functional) becomes average pooling of the same geometry.

    A max-pool passes gradient to one input of each window; an average pool to
    all of them, which is the footprint a receptive field needs.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _MAX_TO_AVG and not kwargs.get("return_indices", False) and not (len(args) > 6 and args[6]):
            names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
            a = dict(zip(names, args))
            a.update(kwargs)
            dil = a.get("dilation", 1)
            if dil not in (1, (1,), (1, 1), (1, 1, 1), [1, 1]):
                if func in (F.max_pool2d, torch.max_pool2d) and not a.get("ceil_mode", False):
                    return _sum_pool_dilated(a["input"], a["kernel_size"], a.get("stride"), a.get("padding", 0), dil)
                return func(*args, **kwargs)
            stride = a.get("stride")
            return _MAX_TO_AVG[func](a["input"], a["kernel_size"], stride if stride not in (None, []) else None,
                                     a.get("padding", 0), a.get("ceil_mode", False))
        if func in _ADAPTIVE_MAX_TO_AVG and not kwargs.get("return_indices", False) and not (len(args) > 2 and args[2]):
            out_size = args[1] if len(args) > 1 else kwargs["output_size"]
            x = args[0] if args else kwargs["input"]
            return _ADAPTIVE_MAX_TO_AVG[func](x, out_size)
        return func(*args, **kwargs)


def probe_copy(model: nn.Module) -> nn.Module:
    """A float64, eval-mode copy of ``model`` whose every input-to-output path has positive gain.

    Weights become ``1 / fan_in``, biases 0, other parameters 1; batch-norm
    statistics become (0, 1). With a positive input every activation is then
    positive, so ReLUs pass everything and no sum cancels.
    """
    probe = copy.deepcopy(model).to("cpu", torch.float64).eval()
    with torch.no_grad():
        for mod in probe.modules():
            for name, p in mod.named_parameters(recurse=False):
                if not p.is_floating_point():
                    continue
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() >= 2:
                    p.fill_(1.0 / max(1, p[0].numel()))
                else:
                    p.fill_(1.0)
            for name, b in mod.named_buffers(recurse=False):
                if name == "running_mean":
                    b.zero_()
                elif name == "running_var":
                    b.fill_(1.0)
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


def _forward_until(probe: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run ``probe`` on ``x`` until every layer in ``layers`` has produced its output; return those outputs."""
    with layer_hooks(probe, layers, mode="until") as outs:
        with _PoolsAsAverages():
            probe(x)
    outs.require_all()
    return dict(outs)


def _extent(g: torch.Tensor, axis: int) -> tuple[int, int]:
    """(first, last+1) index along ``axis`` (0 rows, 1 columns) where a [C,H,W] gradient is nonzero."""
    mass = g.abs().sum(dim=(0, 2 - axis))
    nz = torch.nonzero(mass > 0).flatten()
    if nz.numel() == 0:
        return -1, -1
    return int(nz[0]), int(nz[-1]) + 1


def _measure(probe, input_shape, layer: str, positions: Sequence[int], spatial: tuple[int, int], chunk: int):
    """Exact row and column extents at output positions (t, t) (clamped per axis)."""
    H_out, W_out = spatial
    rows, cols = {}, {}
    for start in range(0, len(positions), chunk):
        ts = list(positions[start:start + chunk])
        x = torch.ones((len(ts),) + tuple(input_shape), dtype=torch.float64, requires_grad=True)
        out = _forward_until(probe, x, [layer])[layer]
        sel = torch.zeros_like(out)
        for b, t in enumerate(ts):
            sel[b, :, min(t, H_out - 1), min(t, W_out - 1)] = 1.0
        (g,) = torch.autograd.grad((out * sel).sum(), x)
        for b, t in enumerate(ts):
            if t < H_out:
                rows[t] = _extent(g[b], 0)
            if t < W_out:
                cols[t] = _extent(g[b], 1)
    return rows, cols


def _fit_axis(measured: dict[int, tuple[int, int]], n: int, limit: int) -> np.ndarray | None:
    """Extend measured extents to all n positions with start = max(0, a + i*s), stop = min(limit, b + i*s)."""
    idx = sorted(measured)
    starts = [(i, measured[i][0]) for i in idx if measured[i][0] > 0]
    stops = [(i, measured[i][1]) for i in idx if measured[i][1] < limit]
    stride = None
    for pts in (starts, stops):
        if len(pts) >= 2:
            (i0, v0), (i1, v1) = pts[0], pts[-1]
            if (v1 - v0) % (i1 - i0) == 0:
                stride = (v1 - v0) // (i1 - i0)
                break
    if stride is None:
        return None
    a = starts[0][1] - starts[0][0] * stride if starts else -(10 ** 9)
    b = stops[0][1] - stops[0][0] * stride if stops else 10 ** 9
    i = np.arange(n)
    out = np.stack([np.maximum(0, a + i * stride), np.minimum(limit, b + i * stride)], axis=1).astype(np.int64)
    for j in idx:
        if tuple(out[j]) != tuple(measured[j]):
            return None
    return out


def receptive_fields(model: nn.Module, layers: Sequence[str], input_shape: Sequence[int],
                     exact_limit: int = 64, chunk: int = 16) -> dict[str, ReceptiveField]:
    """Receptive field of every output position of each layer, measured on ``model``'s own wiring.

    ``input_shape`` is one image's ``(C, H, W)``. Layers whose output side is at
    most ``exact_limit`` are measured at every position; larger ones at
    ``exact_limit`` spread positions, extended by the affine law and checked
    (a failed check measures every position). The model itself is not changed.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ConceptEvoError(f"input_shape must be (channels, height, width), got {input_shape}")
    H, W = input_shape[1:]
    probe = probe_copy(model)
    with torch.no_grad():
        shapes = {n: tuple(o.shape[1:]) for n, o in _forward_until(probe, torch.ones((1,) + input_shape, dtype=torch.float64), list(layers)).items()}
    out: dict[str, ReceptiveField] = {}
    for name in layers:
        shape = shapes[name]
        spatial = tuple(int(s) for s in shape[1:])
        if len(spatial) != 2:
            out[name] = ReceptiveField(name, (H, W), spatial, np.array([[0, H]]), np.array([[0, W]]))
            continue
        Ho, Wo = spatial
        n = max(Ho, Wo)
        if n <= exact_limit:
            positions = list(range(n))
        else:
            positions = sorted(set(np.round(np.linspace(0, n - 1, exact_limit)).astype(int).tolist())
                               | {n // 2 - 1, n // 2, n // 2 + 1})
        rows, cols = _measure(probe, input_shape, name, positions, (Ho, Wo), chunk)
        R = _fit_axis(rows, Ho, H) if len(rows) < Ho else np.array([rows[i] for i in range(Ho)], dtype=np.int64)
        C = _fit_axis(cols, Wo, W) if len(cols) < Wo else np.array([cols[i] for i in range(Wo)], dtype=np.int64)
        if R is None or C is None:
            log.warning("receptive field of %s does not follow a single stride; measuring all %d positions", name, n)
            rows, cols = _measure(probe, input_shape, name, list(range(n)), (Ho, Wo), chunk)
            R = np.array([rows[i] for i in range(Ho)], dtype=np.int64)
            C = np.array([cols[i] for i in range(Wo)], dtype=np.int64)
        if (R < 0).any() or (C < 0).any():
            raise ConceptEvoError(
                f"could not find the receptive field of layer {name!r}: the input has no influence on some of its "
                "positions in the probe (an operation that zeroes gradients, e.g. a hard threshold?)"
            )
        out[name] = ReceptiveField(name, (H, W), spatial, R, C)
    return out
