"""Example patches: each stimulus cropped to the receptive field around its argmax position.

A person judges a neuron's concept by looking at the input regions that made it
fire. The stimuli pass already recorded, for every neuron, its top-k images and
the flat argmax position of each in the neuron's activation map; this module
turns those into pictures without a second pass over the dataset:

1. **Receptive fields** are derived from the model itself (:func:`receptive_fields`).
   A probe copy of the model gets positive weights (``1 / fan_in``), neutral
   normalisation, and its max-pools swapped for average pools of the same
   geometry, so that every path from input to output carries a strictly positive
   gradient. The gradient of one output position with respect to a constant
   input is then nonzero exactly on the input pixels that position can see, for
   any wiring: strides, pooling, residual sums, concatenated branches. Each
   probe sample backpropagates one position ``(t, t)`` on the diagonal, which
   gives the row extent of output row t and the column extent of output column t
   at once; large layers are probed at a subset of positions and fitted with
   the affine ``start = offset + i * stride`` law (clipped to the image), which
   is checked against every measured position.
2. **Crops**: each stimulus image is read by index from the dataset and cut to
   the box of its argmax position, then resized to one square cell size.
3. **Storage** (under ``patches/`` in the workspace): per checkpoint, sprite
   sheets (PNG, at most 1024 px a side) holding each neuron's k patches in a
   row, the boxes in input pixels (``boxes.npy``) and an ``index.json``
   describing the sheet geometry; once per study the full stimulus images as
   sprite sheets with their dataset indices and labels; per model the receptive
   fields (``receptive_fields.json``).

:class:`PatchStore` reads it back; one neuron's patches come out of a cached,
decoded sheet in well under a millisecond.
"""
from __future__ import annotations

import copy
import hashlib
import io as _pyio
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .data.base import display_image
from .errors import CheckpointError, ConceptEvoError, WorkspaceError
from .io import atomic_path, hash_json, load_npy, read_json, save_npy, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SHEET_MAX = 1024          # sprite sheets are at most this many pixels a side (one decodes in ~20 ms)
DEFAULT_MAX_CELL = 64     # automatic patch size: the largest receptive field, clipped to [16, 64]


# ---------------------------------------------------------------------------------------------
# receptive fields
# ---------------------------------------------------------------------------------------------
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


class _Stop(Exception):
    pass


def _forward_until(probe: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run ``probe`` on ``x`` until every layer in ``layers`` has produced its output; return those outputs."""
    modules = dict(probe.named_modules())
    outs: dict[str, torch.Tensor] = {}
    wanted = set(layers)
    handles = []

    def make(name):
        def hook(_m, _i, out):
            if not isinstance(out, torch.Tensor):
                raise ConceptEvoError(f"layer {name!r} returns {type(out).__name__}, not a tensor; choose a module whose output is a tensor")
            outs[name] = out
            if wanted.issubset(outs):
                raise _Stop
        return hook

    try:
        for name in layers:
            if name not in modules:
                raise ConceptEvoError(f"layer {name!r} is not a module of the model")
            handles.append(modules[name].register_forward_hook(make(name)))
        try:
            with _PoolsAsAverages():
                probe(x)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in outs]
    if missing:
        raise ConceptEvoError(f"layer(s) {', '.join(missing)} never ran in the forward pass; choose modules that forward() calls")
    return outs


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


# ---------------------------------------------------------------------------------------------
# sprite sheets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SheetGeometry:
    """Where item j of entry n sits: entries are rows of ``per_entry`` cells, ``groups`` side by side, ``rows`` down."""

    cell: int
    per_entry: int
    groups: int
    rows: int
    count: int

    @classmethod
    def plan(cls, count: int, per_entry: int, cell: int, max_side: int = SHEET_MAX) -> "SheetGeometry":
        width = per_entry * cell
        if width > max_side:
            raise ConceptEvoError(f"{per_entry} patches of {cell} px do not fit a {max_side} px sheet; lower the patch size")
        groups = max(1, max_side // width)
        rows = max(1, max_side // cell)
        # do not make a single sheet larger than it needs to be
        if count <= groups * rows:
            rows = max(1, math.ceil(count / groups))
            if rows == 1:
                groups = max(1, count)
        return cls(cell, per_entry, groups, rows, count)

    @property
    def per_sheet(self) -> int:
        return self.groups * self.rows

    @property
    def sheets(self) -> int:
        return max(1, math.ceil(self.count / self.per_sheet))

    @property
    def sheet_size(self) -> tuple[int, int]:
        """(width, height) in pixels of a full sheet."""
        return self.groups * self.per_entry * self.cell, self.rows * self.cell

    def locate(self, n: int, j: int = 0) -> tuple[int, int, int]:
        """(sheet, x, y) of cell j of entry n."""
        s, q = divmod(int(n), self.per_sheet)
        gy, gx = divmod(q, self.groups)
        return s, (gx * self.per_entry + int(j)) * self.cell, gy * self.cell

    def to_dict(self) -> dict:
        return {"cell": self.cell, "per_entry": self.per_entry, "groups": self.groups, "rows": self.rows,
                "count": self.count, "sheets": self.sheets}

    @classmethod
    def from_dict(cls, d: dict) -> "SheetGeometry":
        return cls(int(d["cell"]), int(d["per_entry"]), int(d["groups"]), int(d["rows"]), int(d["count"]))


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    a = np.ascontiguousarray(arr)
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB")
    buf = _pyio.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_sheets(folder: Path, prefix: str, geom: SheetGeometry, channels: int, entry) -> list[str]:
    """Write PNG sheets; ``entry(n)`` gives entry n's cells ``[per_entry, P, P, C]`` uint8. Returns the file names.

    One sheet at a time is held in memory (at most 4096 x 4096 pixels).
    """
    from .io import write_bytes

    P, C = geom.cell, channels
    names = []
    for s in range(geom.sheets):
        lo, hi = s * geom.per_sheet, min(geom.count, (s + 1) * geom.per_sheet)
        used_rows = math.ceil((hi - lo) / geom.groups)
        Wd = geom.groups * geom.per_entry * P
        sheet = np.zeros((used_rows * P, Wd, C), dtype=np.uint8)
        for n in range(lo, hi):
            _, x, y = geom.locate(n, 0)
            cells = entry(n)
            sheet[y:y + P, x:x + geom.per_entry * P] = cells.transpose(1, 0, 2, 3).reshape(P, geom.per_entry * P, C)
        name = f"{prefix}-{s:03d}.png"
        write_bytes(folder / name, _png_bytes(sheet))
        names.append(name)
    for old in folder.glob(f"{prefix}-*.png"):  # sheets left by an earlier, larger run
        if old.name not in names:
            old.unlink(missing_ok=True)
    return names


def _resize(crop: np.ndarray, P: int) -> np.ndarray:
    """A crop [h, w, C] uint8 resized to [P, P, C]: nearest when enlarging (honest pixels), area when shrinking."""
    from PIL import Image

    h, w, C = crop.shape
    if (h, w) == (P, P):
        return crop
    img = Image.fromarray(crop[..., 0] if C == 1 else crop, mode="L" if C == 1 else "RGB")
    resample = Image.Resampling.NEAREST if max(h, w) <= P else Image.Resampling.BOX
    # keep the aspect ratio (fields clipped at the image border are not square): centre on black
    scale = P / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    arr = np.asarray(img.resize((nw, nh), resample))
    if arr.ndim == 2:
        arr = arr[..., None]
    out = np.zeros((P, P, C), dtype=np.uint8)
    oy, ox = (P - nh) // 2, (P - nw) // 2
    out[oy:oy + nh, ox:ox + nw] = arr
    return out


def to_uint8_image(img) -> np.ndarray:
    """A dataset image (tensor/array ``[C, H, W]``, values in [0, 1]) as uint8 ``[H, W, C]``.

    Images outside [0, 1] (e.g. normalised by mean and std) are stretched to their own range.
    """
    a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim == 2:
        a = a[None]
    a = np.nan_to_num(a.astype(np.float32), nan=0.0)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:  # not the [0, 1] of the dataset protocol (e.g. normalised): stretch to be visible
        a = (a - lo) / max(hi - lo, 1e-12)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def crop_patches(images: np.ndarray, image_rows: np.ndarray, boxes: np.ndarray, cell: int) -> np.ndarray:
    """Cut ``boxes`` ``[N, k, 4]`` out of ``images[image_rows]`` and resize each to ``cell`` px: ``[N, k, P, P, C]``."""
    N, k = image_rows.shape
    C = images.shape[-1]
    out = np.zeros((N, k, cell, cell, C), dtype=np.uint8)
    cache: dict[tuple, np.ndarray] = {}
    for n in range(N):
        for j in range(k):
            r = int(image_rows[n, j])
            if r < 0:
                continue
            t, l, b, rt = (int(v) for v in boxes[n, j])
            key = (r, t, l, b, rt)
            got = cache.get(key)
            if got is None:
                got = _resize(images[r, t:b, l:rt], cell)
                cache[key] = got
            out[n, j] = got
    return out


# ---------------------------------------------------------------------------------------------
# computing and storing patches for a workspace
# ---------------------------------------------------------------------------------------------
def patches_dir(ws, model: str | None = None, tag: str | None = None) -> Path:
    from .workspace import _safe

    p = Path(ws.path) / "patches"
    if model is not None:
        p = p / _safe(model)
    if tag is not None:
        p = p / _safe(tag)
    return p


def _stage_key(ws, name: str) -> str:
    rec = ws.stage(name)
    return rec.get("key", "") if rec else ""


def _auto_cell(rfs: Iterable[ReceptiveField], max_cell: int = DEFAULT_MAX_CELL) -> int:
    biggest = max((max(rf.size) for rf in rfs), default=16)
    return int(min(max(biggest, 16), max_cell))


def compute_patches(ws, models: Sequence[str] | None = None, cell: int | None = None, force: bool = False,
                    progress: bool = True, trust: bool = False, dataset=None, networks=None) -> list[str]:
    """Receptive fields, example patches and stimulus images for every checkpoint with stimuli.

    Skips checkpoints whose patches are up to date (their stimuli and the patch
    settings are unchanged). Returns the stage names written. The caller should
    hold the workspace lock (:class:`~conceptevo.workspace.WorkspaceLock`).

    ``dataset`` (item i = the image stimuli call i) and ``networks`` ({model:
    nn.Module}, for the receptive fields) replace the study's recorded dataset
    and checkpoints, for workspaces built from results in memory
    (:func:`conceptevo.results.workspace_from_results`).
    """
    from tqdm.auto import tqdm

    from .pipeline import build_for_dataset, load_model

    if cell is not None and (isinstance(cell, bool) or not isinstance(cell, int) or not 4 <= cell <= 256):
        raise ConceptEvoError(f"cell (the patch size in pixels) must be an integer in 4..256, got {cell!r}")
    all_models = ws.models
    models = list(models) if models is not None else all_models
    for m in models:
        if m not in all_models:
            raise WorkspaceError(f"model {m!r} is not in this study; models: {', '.join(all_models) or 'none'}")
    todo = [(m, t) for m in models for t in ws.tags(m) if ws.stage(f"stimuli/{m}/{t}") is not None]
    if not todo:
        raise WorkspaceError(f"the workspace {ws.path} has no stimuli yet; run `conceptevo run` on its config first")
    if dataset is None:
        if not ws.config.get("data") and not force and ws.stage("patches/images") is not None \
                and all(ws.stage(f"patches/{m}/{t}") is not None for m, t in todo):
            return []  # built from results in memory: its patches were made then, from the images it was given
        dataset = ws.images()  # positions are image indices, as in the stimuli
    shape = tuple(int(s) for s in dataset[0][0].shape)
    manifest_models = ws.manifest.get("models", {})

    # 1. receptive fields, once per model (they depend on the architecture only)
    rfs_by_model: dict[str, dict[str, ReceptiveField]] = {}
    rf_keys: dict[str, str] = {}
    for m in sorted({m for m, _ in todo}):
        info = manifest_models[m]
        first_tag = next(t for mm, t in todo if mm == m)
        first = next(c for c in info["checkpoints"] if c["tag"] == first_tag)
        stim_layers = [l.name for l in ws.stimuli(m, first_tag).layers]
        net = (networks or {}).get(m)
        structure = [] if net is None else [hashlib.sha256(repr(net).encode()).hexdigest()[:16]]
        rf_key = hash_json([FORMAT_VERSION, info["arch"], info.get("options", {}), stim_layers, shape] + structure)
        rf_path = patches_dir(ws, m) / "receptive_fields.json"
        if not force and rf_path.exists() and read_json(rf_path).get("key") == rf_key:
            rfs = {d["layer"]: ReceptiveField.from_dict(d) for d in read_json(rf_path)["layers"]}
        else:
            if net is None:
                try:
                    net = load_model(info["arch"], info.get("options", {}), first["path"], dataset, trust=trust, **info.get("load", {}))
                except CheckpointError as e:  # receptive fields do not depend on the weights
                    log.info("building %s without weights for its receptive fields (%s)", m, e)
                    net = build_for_dataset(info["arch"], info.get("options", {}), dataset, info.get("load", {}).get("import_path")).eval()
            rfs = receptive_fields(net, stim_layers, shape)
            write_json(rf_path, {"key": rf_key, "model": m, "arch": info["arch"], "input_shape": list(shape),
                                 "layers": [rf.to_dict() for rf in rfs.values()]})
        rfs_by_model[m], rf_keys[m] = rfs, rf_key
    k_max = max(int(ws.stimuli(m, t).k) for m, t in todo)
    if cell is None:
        cell = min(_auto_cell(rf for rfs in rfs_by_model.values() for rf in rfs.values()), SHEET_MAX // k_max)
    elif cell * k_max > SHEET_MAX:
        raise ConceptEvoError(f"{k_max} patches of {cell} px do not fit a {SHEET_MAX} px sprite sheet; "
                              f"use a cell of at most {SHEET_MAX // k_max} px")

    # 2. the full stimulus images (every image any checkpoint's stimuli use)
    all_pairs = [(m, t) for m in all_models for t in ws.tags(m) if ws.stage(f"stimuli/{m}/{t}") is not None]
    img_key = hash_json([FORMAT_VERSION, [_stage_key(ws, f"stimuli/{m}/{t}") for m, t in all_pairs], shape])
    img_dir = patches_dir(ws) / "images"
    if force or not ws.is_done("patches/images", img_key):
        used = np.unique(np.concatenate([np.asarray(ws.stimuli(m, t).indices).ravel() for m, t in all_pairs]))
        used = used[used >= 0]
        # the images as people see them (resized/cropped like the model's input, never mean/std-normalised)
        first_img = to_uint8_image(display_image(dataset, int(used[0])))
        labels = np.array([int(dataset[int(i)][1]) for i in used], dtype=np.int64) if not hasattr(dataset, "targets") \
            else np.asarray(dataset.targets, dtype=np.int64)[used]
        icell = int(min(max(shape[1], shape[2]), 96))
        geom = SheetGeometry.plan(len(used), 1, icell)
        # the images themselves, written straight into a memory-mapped .npy (never all in memory)
        with atomic_path(img_dir / "pixels.npy", suffix=".npy") as tmp:
            pix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(used),) + first_img.shape)
            for r, i in enumerate(tqdm(used, desc="stimulus images", disable=not progress, leave=False)):
                im = first_img if r == 0 else to_uint8_image(display_image(dataset, int(i)))
                if im.shape != first_img.shape:
                    raise ConceptEvoError(f"image {int(i)} has shape {im.shape}, image {int(used[0])} {first_img.shape}; "
                                          "example patches need images of one size")
                pix[r] = im
            pix.flush()
            files = _write_sheets(img_dir, "sheet", geom, first_img.shape[-1], lambda r: _resize(pix[r], icell)[None])
            del pix
        save_npy(img_dir / "indices.npy", used.astype(np.int64))
        save_npy(img_dir / "labels.npy", labels)
        write_json(img_dir / "index.json", {
            "format": FORMAT_VERSION, "geometry": geom.to_dict(), "sheets": files, "image_shape": list(first_img.shape),
            "classes": [str(c) for c in (getattr(dataset, "classes", None) or [])],
        })
        ws.finish("patches/images", img_key, {"cell": icell}, images=int(len(used)))
    store = PatchStore(ws)
    used = store.image_indices
    pixels = load_npy(img_dir / "pixels.npy", mmap=True)

    # 3. per checkpoint: boxes, crops, sheets
    written, token_noted = [], set()
    for m, t in tqdm(todo, desc="patches", disable=not progress, leave=False):
        name = f"patches/{m}/{t}"
        key = hash_json([FORMAT_VERSION, _stage_key(ws, f"stimuli/{m}/{t}"), rf_keys[m], cell])
        if not force and ws.is_done(name, key):
            continue
        stim = ws.stimuli(m, t)
        rfs = rfs_by_model[m]
        N, k = stim.indices.shape
        boxes = np.zeros((N, k, 4), dtype=np.int32)
        for info, sl in zip(stim.layers, stim.layer_slices().values()):
            if info.name not in rfs:
                raise ConceptEvoError(f"no receptive field for layer {info.name!r} of {m}; recompute with force=True")
            rf = rfs[info.name]
            if info.channel_axis != 1:  # token-shaped units ([B, T, C]): no 2-D map to cut a token's patch from
                if (m, info.name) not in token_noted:
                    token_noted.add((m, info.name))
                    log.info("layer %r of %s holds token-shaped units: its example patches are whole stimulus images "
                             "(patches of single tokens are not supported yet; token positions are in the stimuli)", info.name, m)
                boxes[sl] = (0, 0, *rf.input_size)
                continue
            if tuple(rf.spatial) != tuple(info.spatial):
                raise ConceptEvoError(
                    f"layer {info.name!r} of {m} {t} has activation maps of {info.spatial} in the stimuli but "
                    f"{rf.spatial} in the model; were the stimuli computed with another image size?"
                )
            boxes[sl] = rf.boxes(np.asarray(stim.positions[sl]))
        rows = np.searchsorted(used, np.asarray(stim.indices))
        rows = np.where((rows < len(used)) & (used[np.minimum(rows, len(used) - 1)] == np.asarray(stim.indices)), rows, -1)
        geom = SheetGeometry.plan(N, k, cell)
        folder = patches_dir(ws, m, t)
        files = _write_sheets(folder, "sheet", geom, pixels.shape[-1],
                              lambda n: crop_patches(pixels, rows[n:n + 1], boxes[n:n + 1], cell)[0])
        save_npy(folder / "boxes.npy", boxes)
        write_json(folder / "index.json", {
            "format": FORMAT_VERSION, "model": m, "tag": t, "geometry": geom.to_dict(), "sheets": files,
            "channels": int(pixels.shape[-1]),
        })
        ws.finish(name, key, {"cell": cell}, neurons=int(N))
        written.append(name)
    return written


class PatchStore:
    """Read a workspace's example patches; decoded sheets are cached (thread-safe, LRU, ``cache_mb`` at most)."""

    def __init__(self, ws, cache_mb: int = 256):
        self.ws = ws
        self._lock = threading.Lock()
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_max = cache_mb * 2**20
        self._index: dict[tuple[str, str], dict] = {}
        self._images: dict | None = None

    # -- availability ----------------------------------------------------------------------------
    def has(self, model: str, tag: str) -> bool:
        return self.ws.stage(f"patches/{model}/{tag}") is not None and (patches_dir(self.ws, model, tag) / "index.json").exists()

    @property
    def has_images(self) -> bool:
        return self.ws.stage("patches/images") is not None and (patches_dir(self.ws) / "images" / "index.json").exists()

    def index(self, model: str, tag: str) -> dict:
        key = (model, tag)
        if key not in self._index:
            if not self.has(model, tag):
                raise WorkspaceError(f"no example patches for {model} {tag} yet; compute them with `conceptevo patches {self.ws.path}`")
            self._index[key] = read_json(patches_dir(self.ws, model, tag) / "index.json")
        return self._index[key]

    def geometry(self, model: str, tag: str) -> SheetGeometry:
        return SheetGeometry.from_dict(self.index(model, tag)["geometry"])

    def boxes(self, model: str, tag: str) -> np.ndarray:
        return load_npy(patches_dir(self.ws, model, tag) / "boxes.npy", mmap=True)

    # -- images ----------------------------------------------------------------------------------
    @property
    def images_index(self) -> dict:
        if self._images is None:
            if not self.has_images:
                raise WorkspaceError(f"no stimulus images yet; compute them with `conceptevo patches {self.ws.path}`")
            self._images = read_json(patches_dir(self.ws) / "images" / "index.json")
        return self._images

    @property
    def image_indices(self) -> np.ndarray:
        return load_npy(patches_dir(self.ws) / "images" / "indices.npy")

    @property
    def image_labels(self) -> np.ndarray:
        return load_npy(patches_dir(self.ws) / "images" / "labels.npy")

    def image(self, index: int) -> np.ndarray:
        """The full stimulus image with dataset index ``index``, uint8 ``[H, W, C]``."""
        idx = self.image_indices
        r = int(np.searchsorted(idx, index))
        if r >= len(idx) or idx[r] != index:
            raise ConceptEvoError(f"image {index} is not a stimulus of any checkpoint")
        return np.asarray(load_npy(patches_dir(self.ws) / "images" / "pixels.npy", mmap=True)[r])

    # -- patches ---------------------------------------------------------------------------------
    def _sheet(self, path: Path) -> np.ndarray:
        with self._lock:
            arr = self._cache.get(path)
            if arr is not None:
                self._cache.move_to_end(path)
                return arr
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
        if arr.ndim == 2:
            arr = arr[..., None]
        with self._lock:
            if path not in self._cache:
                self._cache[path] = arr
                self._cache_bytes += arr.nbytes
            while self._cache_bytes > self._cache_max and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return arr

    def patches(self, model: str, tag: str, row: int) -> np.ndarray:
        """Neuron ``row``'s k patches, uint8 ``[k, P, P, C]``."""
        idx = self.index(model, tag)
        geom = SheetGeometry.from_dict(idx["geometry"])
        if not 0 <= row < geom.count:
            raise ConceptEvoError(f"neuron row {row} is out of range for {model} {tag} ({geom.count} neurons)")
        s, x, y = geom.locate(row, 0)
        sheet = self._sheet(patches_dir(self.ws, model, tag) / idx["sheets"][s])
        P, k = geom.cell, geom.per_entry
        strip = sheet[y:y + P, x:x + k * P]
        return strip.reshape(P, k, P, -1).transpose(1, 0, 2, 3)

    def strip_png(self, model: str, tag: str, row: int) -> bytes:
        """Neuron ``row``'s k patches side by side, as PNG bytes."""
        p = self.patches(model, tag, row)
        k, P, _, C = p.shape
        return _png_bytes(p.transpose(1, 0, 2, 3).reshape(P, k * P, C))


__all__ = [
    "ReceptiveField", "receptive_fields", "probe_copy", "SheetGeometry", "crop_patches", "to_uint8_image",
    "compute_patches", "PatchStore", "patches_dir",
]
