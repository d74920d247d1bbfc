"""Sprite sheets: many small pictures (cells) in one PNG, and the crops that fill them."""
from __future__ import annotations

import io as _pyio
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConceptEvoError
from ..io import write_bytes

SHEET_MAX = 1024          # sprite sheets are at most this many pixels a side (one decodes in ~20 ms)


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
