"""Input preprocessing: what the model gets, and what people see.

A dataset's images are float tensors ``[C, H, W]`` in [0, 1]. A
:class:`Preprocess` turns them into the model's inputs in two steps:

1. **geometry** (``resize``, then ``crop``): changes which pixels there are.
   Example patches, stimulus images and figures show the images after this
   step, so a patch box in input pixels lands on the right pixels;
2. **values** (a callable ``transform``, then per-channel ``(x - mean) / std``):
   changes only what the model reads. Pictures never show this step.

``resize`` is an integer N (the shorter side becomes N, aspect kept, as
torchvision's ``Resize(N)``) or ``[H, W]``; ``crop`` is an integer N (a
centred N x N square) or ``[H, W]``. ``mean`` and ``std`` hold one value, or
one per channel, in the images' [0, 1] units. ``transform`` is any callable
taking and returning a float tensor ``[C, H, W]`` (it gets the [0, 1] image
after resize/crop; torchvision's tensor transforms, e.g. ``Normalize``, work).
It may also be given as a string ``"package.module:name"`` or
``"path/to/file.py:name"`` naming such a callable, which a study config can
store and every later command can import again.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import DatasetError


def _pair(name: str, value) -> tuple[int, int] | int | None:
    """An int N or an [H, W] pair of positive integers (None passes)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise DatasetError(f"{name} must be a positive integer or a list [height, width] of two, got {list(value)!r}")
        return (int(value[0]), int(value[1]))
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DatasetError(f"{name} must be a positive integer (pixels) or [height, width], got {value!r}")
    return int(value)


def _numbers(name: str, value) -> tuple[float, ...] | None:
    if value is None:
        return None
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if not vals or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
        raise DatasetError(f"{name} must be a number or a list of numbers (one per channel), got {value!r}")
    return tuple(float(v) for v in vals)


def load_transform(spec: str) -> Callable:
    """The callable a ``"package.module:name"`` or ``"path/to/file.py:name"`` string names."""
    if not isinstance(spec, str) or ":" not in spec.strip(":"):
        raise DatasetError(f"transform {spec!r} must name a callable as 'package.module:name' or 'path/to/file.py:name'")
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise DatasetError(f"transform file {path} does not exist; give the path to the .py file that defines {attr!r}")
            mod_name = f"_conceptevo_transform_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(mod_name)
            if module is None:
                spec_ = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec_)
                spec_.loader.exec_module(module)
                sys.modules[mod_name] = module
        else:
            module = importlib.import_module(where)
        fn = getattr(module, attr)
    except DatasetError:
        raise
    except Exception as e:  # ImportError, AttributeError, or an error while running the module
        raise DatasetError(f"cannot load transform {spec!r} ({type(e).__name__}: {e}); "
                           "give 'package.module:name' (importable) or 'path/to/file.py:name'") from None
    if not callable(fn):
        raise DatasetError(f"transform {spec!r} is a {type(fn).__name__}, not a callable; name a function or transform object")
    return fn


class Preprocess:
    """Resize/crop (seen in pictures), then a callable and mean/std (seen by the model only)."""

    def __init__(self, resize=None, crop=None, mean=None, std=None, transform=None):
        self.resize = _pair("resize", resize)
        self.crop = _pair("crop", crop)
        mean, std = _numbers("mean", mean), _numbers("std", std)
        if (mean is None) != (std is None):
            raise DatasetError("give both mean and std (per-channel normalisation), or neither")
        if std is not None and min(std) <= 0:
            raise DatasetError(f"std must be positive, got {list(std)}")
        if mean is not None and (max(abs(m) for m in mean) > 1.0 or max(std) > 1.0):
            raise DatasetError(
                f"mean {list(mean)} / std {list(std)} look like 0..255 pixel units, but images are in [0, 1] here; "
                "divide them by 255 (e.g. mean 125.3 -> 0.491)")
        if mean is not None and len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise DatasetError(f"mean has {len(mean)} values and std {len(std)}; give one per channel for both")
        self.mean, self.std = mean, std
        self.spec = transform if isinstance(transform, str) else None
        if isinstance(transform, str):
            transform = load_transform(transform)
        if transform is not None and not callable(transform):
            raise DatasetError(f"transform must be a callable (image tensor -> tensor), got {type(transform).__name__}")
        self.transform = transform
        self._keeps_shape = True

    # -- what it is
    @property
    def is_identity(self) -> bool:
        return self.resize is None and self.crop is None and self.mean is None and self.transform is None

    @property
    def fixed_size(self) -> bool:
        """True when every output has the same height and width whatever the input's."""
        return self.crop is not None or isinstance(self.resize, tuple)

    def describe(self) -> dict:
        """A JSON-able record of the preprocessing (for the workspace manifest)."""
        d = {}
        if self.resize is not None:
            d["resize"] = list(self.resize) if isinstance(self.resize, tuple) else self.resize
        if self.crop is not None:
            d["crop"] = list(self.crop) if isinstance(self.crop, tuple) else self.crop
        if self.mean is not None:
            d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.transform is not None:
            d["transform"] = self.spec or repr(self.transform)
        return d

    def __repr__(self) -> str:
        return "Preprocess(" + ", ".join(f"{k}={v!r}" for k, v in self.describe().items()) + ")"

    # -- applying it
    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Resize then centre-crop ``[C, H, W]`` or ``[B, C, H, W]`` images (values stay in [0, 1])."""
        if self.resize is None and self.crop is None:
            return x
        single = x.dim() == 3
        if single:
            x = x.unsqueeze(0)
        h, w = x.shape[-2:]
        if self.resize is not None:
            if isinstance(self.resize, tuple):
                size = self.resize
            else:  # shorter side -> N, aspect kept
                s = self.resize / min(h, w)
                size = (self.resize, max(1, round(w * s))) if h <= w else (max(1, round(h * s)), self.resize)
            if tuple(size) != (h, w):
                x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                                  antialias=size[0] < h or size[1] < w).clamp_(0.0, 1.0)
            h, w = size
        if self.crop is not None:
            ch, cw = self.crop if isinstance(self.crop, tuple) else (self.crop, self.crop)
            if ch > h or cw > w:
                raise DatasetError(f"crop {ch}x{cw} is larger than the image ({h}x{w} after resize); "
                                   "use a smaller crop or a larger resize")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        x = x.contiguous()
        return x[0] if single else x

    def _normalise(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if self.mean is None:
            return x
        c = x.shape[channel_dim]
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, c):
                raise DatasetError(f"{name} has {len(vals)} values but the images have {c} channel(s); "
                                   f"give one value or {c}")
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype).view(shape)
        return (x - mean) / std

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        try:
            y = self.transform(x)
        except Exception as e:
            raise DatasetError(
                f"the transform {self.spec or self.transform!r} failed on an image ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); it gets a float tensor [C, H, W] in [0, 1] "
                "(after resize/crop), not a PIL image: drop ToTensor()/PIL-only steps") from None
        if not isinstance(y, torch.Tensor) or y.dim() != 3:
            raise DatasetError(f"the transform {self.spec or self.transform!r} returned "
                               f"{type(y).__name__ if not isinstance(y, torch.Tensor) else list(y.shape)}; "
                               "it must return a float tensor [C, H, W]")
        return y.float()

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input from one image ``[C, H, W]`` after geometry."""
        if self.transform is not None:
            x = self._call(x)
        return self._normalise(x, 0)

    def values_batch(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = torch.stack([self._call(xi) for xi in x])
        return self._normalise(x, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Geometry then values, on one image ``[C, H, W]`` or a batch ``[B, C, H, W]``."""
        x = self.geometry(x)
        return self.values(x) if x.dim() == 3 else self.values_batch(x)

    def check(self, image: torch.Tensor) -> None:
        """Apply to one raw image: raise the error a bad setting gives now, not mid-run; note whether shape is kept."""
        seen = self.geometry(image)
        out = self.values(seen)
        self._keeps_shape = tuple(out.shape) == tuple(seen.shape)

    @property
    def keeps_shape(self) -> bool:
        """False when the callable transform changed the image's shape (pictures then show the model's input)."""
        return self._keeps_shape


def as_preprocess(transform=None, **settings) -> Preprocess | None:
    """A Preprocess from a callable/Preprocess/spec string and the settings; None when it does nothing."""
    if isinstance(transform, Preprocess):
        if any(v is not None for v in settings.values()):
            raise DatasetError("give either a Preprocess as transform or resize/crop/mean/std, not both")
        pp = transform
    else:
        pp = Preprocess(transform=transform, **settings)
    return None if pp.is_identity else pp
