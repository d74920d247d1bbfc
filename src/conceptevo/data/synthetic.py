"""ConceptShapes: a generated image dataset whose concepts are known by construction.

Each image shows one shape on a gray, noisy background. Its *concepts* are
drawn independently and uniformly:

==============  =====================================================
attribute       values
==============  =====================================================
``shape``       circle, square, triangle, cross, ring
``colour``      red, orange, yellow (warm); green, cyan, blue (cool)
``family``      warm, cool (determined by ``colour``)
``texture``     plain, stripes, dots, checker
``size``        small, large
``position``    center, top-left, top-right, bottom-left, bottom-right
``background``  clean, noisy (amplitude of the pixel noise)
==============  =====================================================

**Class rule**: the label is the pair (shape, colour family), ``label =
2 * shape + family``, giving 10 classes named ``"warm circle"``, ``"cool
circle"``, ``"warm square"``, ... Texture, size, position and background are
nuisance concepts, independent of the label; the exact colour within a family
is too. A small CNN learns the classes to well over 80% accuracy in a few
epochs.

Every image is a pure function of ``(seed, split, index)``: one random
generator seeded by that triple draws first the image's attributes and
continuous jitter, then its noise. Any index can therefore be rendered alone
and equals the same index rendered in bulk. Rendering is vectorised numpy over
coordinate grids: 10,000 32x32 images take a second or two.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ..errors import DatasetError, suggest
from .base import ImageDataset

log = logging.getLogger(__name__)

SHAPES = ["circle", "square", "triangle", "cross", "ring"]
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue"]
FAMILIES = ["warm", "cool"]
TEXTURES = ["plain", "stripes", "dots", "checker"]
SIZES = ["small", "large"]
POSITIONS = ["center", "top-left", "top-right", "bottom-left", "bottom-right"]
BACKGROUNDS = ["clean", "noisy"]

CONCEPT_NAMES: dict[str, list[str]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "family": FAMILIES,
    "texture": TEXTURES,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}
CLASSES = [f"{fam} {shape}" for shape in SHAPES for fam in FAMILIES]
SPLITS = {"train": 0, "val": 1, "test": 2}

_RGB = np.array(
    [
        [0.92, 0.15, 0.10],  # red
        [0.95, 0.55, 0.08],  # orange
        [0.95, 0.90, 0.15],  # yellow
        [0.15, 0.78, 0.20],  # green
        [0.10, 0.75, 0.92],  # cyan
        [0.20, 0.30, 0.95],  # blue
    ],
    dtype=np.float32,
)
_FAMILY_OF_COLOUR = np.array([0, 0, 0, 1, 1, 1], dtype=np.int64)
# Shape centre per position, as fractions of the image side (x, y).
_CENTRES = np.array([[0.5, 0.5], [0.33, 0.33], [0.67, 0.33], [0.33, 0.67], [0.67, 0.67]], dtype=np.float32)
_RADIUS = np.array([0.19, 0.28], dtype=np.float32)  # small, large; fraction of the side
_NOISE = np.array([0.03, 0.12], dtype=np.float32)  # clean, noisy; half-range of uniform noise
_DIM = 0.6  # brightness of the darker parts of a texture
# Uniform numbers drawn per image before its noise: 0-5 the concepts (shape, colour,
# texture, size, position, background), 6-7 position jitter, 8 radius jitter,
# 9-10 texture phase, 11-13 colour jitter, 14 background gray level.
_N_DRAWS = 15
_CHUNK = 512


def _draws(seed: int, split: int, index: int, size: int | None = None):
    """The generator of one image: its uniform draws, and its noise when ``size`` is given."""
    rng = np.random.default_rng([seed, split, index])
    u = rng.random(_N_DRAWS)
    if size is None:
        return u, None
    return u, rng.random((3, size, size), dtype=np.float32)


def _attributes(u: np.ndarray) -> dict[str, np.ndarray]:
    """Map uniform draws ``[B, _N_DRAWS]`` to the discrete concepts and continuous jitter."""
    def pick(col, k):
        return np.minimum((u[:, col] * k).astype(np.int64), k - 1)

    colour = pick(1, len(COLOURS))
    return {
        "shape": pick(0, len(SHAPES)),
        "colour": colour,
        "family": _FAMILY_OF_COLOUR[colour],
        "texture": pick(2, len(TEXTURES)),
        "size": pick(3, len(SIZES)),
        "position": pick(4, len(POSITIONS)),
        "background": pick(5, len(BACKGROUNDS)),
    }


def _render(u: np.ndarray, noise: np.ndarray, size: int) -> np.ndarray:
    """Draw images from their uniform draws ``[B, _N_DRAWS]`` and noise ``[B, 3, S, S]``; uint8 ``[B, 3, S, S]``."""
    a = _attributes(u)
    u = u.astype(np.float32)
    b = len(u)
    side = np.float32(size)
    jitter = (u[:, 6:8] - 0.5) * (0.06 * side)  # up to +-3% of the side
    centre = _CENTRES[a["position"]] * side + jitter  # [B, 2] (x, y)
    r = (_RADIUS[a["size"]] * side * (0.9 + 0.2 * u[:, 8]))[:, None, None]
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - centre[:, 0, None, None]  # [B, 1, S]
    dy = grid[None, :, None] - centre[:, 1, None, None]  # [B, S, 1]
    dx, dy = np.broadcast_to(dx, (b, size, size)), np.broadcast_to(dy, (b, size, size))

    mask = np.zeros((b, size, size), dtype=bool)
    for s, name in enumerate(SHAPES):
        sel = a["shape"] == s
        if not sel.any():
            continue
        x, y, rr = dx[sel], dy[sel], r[sel]
        if name == "circle":
            m = x * x + y * y <= rr * rr
        elif name == "square":
            m = np.maximum(np.abs(x), np.abs(y)) <= 0.85 * rr
        elif name == "triangle":  # apex up, base below the centre
            m = (y >= -rr) & (y <= 0.75 * rr) & (np.abs(x) <= 0.63 * (y + rr))
        elif name == "cross":
            arm = 0.32 * rr
            m = ((np.abs(x) <= arm) & (np.abs(y) <= rr)) | ((np.abs(y) <= arm) & (np.abs(x) <= rr))
        else:  # ring
            d2 = x * x + y * y
            m = (d2 <= rr * rr) & (d2 >= (0.55 * rr) ** 2)
        mask[sel] = m

    # Texture: brightness 1 or _DIM inside the shape, in coordinates attached to the shape.
    period = max(3.0, size / 10.0)
    px = dx / period + u[:, 9, None, None]
    py = dy / period + u[:, 10, None, None]
    tex = np.ones((b, size, size), dtype=np.float32)
    t = a["texture"]
    for k, name in enumerate(TEXTURES):
        sel = t == k
        if name == "plain" or not sel.any():
            continue
        x, y = px[sel], py[sel]
        if name == "stripes":
            on = np.floor(x + y).astype(np.int64) % 2 == 0
        elif name == "dots":  # a bright dot in the middle of each period cell
            fx, fy = x - np.floor(x) - 0.5, y - np.floor(y) - 0.5
            on = fx * fx + fy * fy <= 0.1
        else:  # checker
            on = (np.floor(x).astype(np.int64) + np.floor(y).astype(np.int64)) % 2 == 0
        tex[sel] = np.where(on, 1.0, _DIM)

    colour = np.clip(_RGB[a["colour"]] + (u[:, 11:14] - 0.5) * 0.14, 0.0, 1.0)  # [B, 3]
    bg = (0.04 + 0.26 * u[:, 14])[:, None, None, None]  # gray level
    img = np.where(mask[:, None], colour[:, :, None, None] * tex[:, None], bg)
    amp = _NOISE[a["background"]][:, None, None, None]
    img = img + (noise - 0.5) * (2 * amp)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


class ConceptShapes(ImageDataset):
    """A synthetic RGB dataset of shapes with known concepts (see the module docstring).

    ``n`` images of ``3 x size x size``, deterministic from ``(seed, split,
    index)``; ``split`` is "train", "val" or "test" and gives independent
    images for the same seed. Attributes: :attr:`classes`, :attr:`targets`,
    :attr:`concepts` (attribute name -> int64 array ``[n]`` of value indices)
    and :attr:`concept_names` (attribute name -> value names).

    With ``cache`` (default: when the uint8 images take at most 256 MiB) the
    first image read renders the whole dataset once and keeps it in memory;
    otherwise each image is rendered when read.
    """

    CACHE_LIMIT = 256 * 2**20

    def __init__(self, n: int = 2000, size: int = 32, seed: int = 0, split: str = "train", cache: bool | None = None):
        for name, value, low in (("n", n, 1), ("size", size, 16)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DatasetError(f"ConceptShapes {name} must be an integer >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DatasetError(f"ConceptShapes seed must be a non-negative integer, got {seed!r}")
        if split not in SPLITS:
            raise DatasetError(
                f"unknown split {split!r} for ConceptShapes; use one of {', '.join(map(repr, SPLITS))}."
                + suggest(split, SPLITS)
            )
        self.n, self.size, self.seed, self.split = int(n), int(size), int(seed), split
        self._split_code = SPLITS[split]
        u = np.stack([_draws(self.seed, self._split_code, i)[0] for i in range(self.n)])
        attrs = _attributes(u)
        self.concepts: dict[str, np.ndarray] = attrs
        self.concept_names: dict[str, list[str]] = {k: list(v) for k, v in CONCEPT_NAMES.items()}
        self.targets = (2 * attrs["shape"] + attrs["family"]).astype(np.int64)
        self.classes = list(CLASSES)
        self.name = f"concept-shapes-{split}"
        nbytes = self.n * 3 * self.size * self.size
        self.cache = nbytes <= self.CACHE_LIMIT if cache is None else bool(cache)
        self._array: np.ndarray | None = None

    def render(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Render the images at ``indices`` (no cache involved); uint8 ``[B, 3, size, size]``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise DatasetError(f"image indices must be in 0..{self.n - 1}; got {int(idx.min())}..{int(idx.max())}")
        out = np.empty((len(idx), 3, self.size, self.size), dtype=np.uint8)
        for start in range(0, len(idx), _CHUNK):
            part = idx[start:start + _CHUNK]
            draws = [_draws(self.seed, self._split_code, int(i), self.size) for i in part]
            u = np.stack([d[0] for d in draws])
            noise = np.stack([d[1] for d in draws])
            out[start:start + len(part)] = _render(u, noise, self.size)
        return out

    @property
    def array(self) -> np.ndarray:
        """All images as uint8 ``[n, 3, size, size]`` (rendered once, then cached)."""
        if self._array is None:
            log.debug("rendering %d ConceptShapes images", self.n)
            arr = self.render(np.arange(self.n))
            arr.flags.writeable = False
            self._array = arr
        return self._array

    def image(self, i: int) -> torch.Tensor:
        x = self.array[i] if self.cache else self.render([i])[0]
        return torch.from_numpy(x.astype(np.float32)).div_(255.0)

    def images_tensor(self, indices: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """The images at ``indices`` (all when None) as one float32 tensor ``[B, 3, size, size]`` in [0, 1]."""
        if indices is None:
            indices = np.arange(self.n)
        idx = np.asarray(indices, dtype=np.int64)
        x = self.array[idx] if self.cache else self.render(idx)
        return torch.from_numpy(x.astype(np.float32)).div_(255.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.preprocess is not None:
            return super().image_shape
        return (3, self.size, self.size)
