"""Where a workspace keeps its example patches, and :class:`PatchStore`, which reads them back."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import ConceptEvoError, WorkspaceError
from ..io import load_npy, read_json
from ..workspace import Workspace, _safe
from .sheets import SheetGeometry, _png_bytes

FORMAT_VERSION = 2        # of the files under patches/ (a change recomputes them)


def patches_dir(ws: Workspace, model: str | None = None, tag: str | None = None) -> Path:
    p = Path(ws.path) / "patches"
    if model is not None:
        p = p / _safe(model)
    if tag is not None:
        p = p / _safe(tag)
    return p


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

    def marks(self, model: str, tag: str) -> np.ndarray | None:
        """``[neurons, k, 4]`` pixel boxes marked on each example patch (a token-shaped unit's argmax token; -1:
        no mark), or None when the checkpoint has no token-shaped units (its patches carry no marks)."""
        path = patches_dir(self.ws, model, tag) / "marks.npy"
        return load_npy(path, mmap=True) if path.exists() else None

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
