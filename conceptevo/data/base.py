"""The dataset protocol every part of conceptevo relies on.

A conceptevo dataset returns ``(image, label, index)``: ``image`` a float32
tensor ``[C, H, W]`` with values in [0, 1], ``label`` an int, ``index`` the
image's position in the *full* dataset. Stimuli are keyed by that index, so
they never depend on loader order, shuffling or subsetting.

Any torch Dataset returning ``(image, label)`` is accepted too: it is wrapped
with :func:`indexed`, and its position becomes the index.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Base class: subclasses set ``classes`` and ``targets`` and implement ``image(i)``."""

    classes: list[str]
    targets: np.ndarray  # int64 [len]
    name: str = "dataset"

    def __len__(self) -> int:
        return int(len(self.targets))

    def image(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int):
        i = int(i)
        if i < 0 or i >= len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        return self.image(i), int(self.targets[i]), i

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.image(0).shape)  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """A short hash identifying the data (used to know when cached results are stale)."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(str(len(self)).encode())
        h.update(np.ascontiguousarray(self.targets, dtype=np.int64).tobytes())
        for i in np.linspace(0, len(self) - 1, num=min(len(self), 16)).astype(int):
            h.update(self.image(int(i)).numpy().tobytes())
        return h.hexdigest()[:16]


class Subset(ImageDataset):
    """Some images of a dataset, which keep their index in the full dataset."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        base_targets = getattr(base, "targets", None)
        self.targets = (
            np.asarray(base_targets, dtype=np.int64)[self.indices]
            if base_targets is not None
            else np.array([int(base[int(i)][1]) for i in self.indices], dtype=np.int64)
        )
        self.classes = list(getattr(base, "classes", []))
        self.name = f"{getattr(base, 'name', type(base).__name__)}[{len(self.indices)}]"

    def __getitem__(self, i: int):
        j = int(self.indices[int(i)])
        item = self.base[j]
        return item[0], int(item[1]), (int(item[2]) if len(item) > 2 else j)

    def image(self, i: int) -> torch.Tensor:
        return self[i][0]

    def fingerprint(self) -> str:
        base_fp = self.base.fingerprint() if hasattr(self.base, "fingerprint") else type(self.base).__name__
        return hashlib.sha256(base_fp.encode() + self.indices.tobytes()).hexdigest()[:16]


class _Indexed(Dataset):
    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        return item[0], item[1], i


def indexed(dataset: Dataset) -> Dataset:
    """Return a dataset yielding ``(image, label, index)``; pass ours through unchanged."""
    if isinstance(dataset, ImageDataset):
        return dataset
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DatasetError("the dataset has no len(); conceptevo needs a map-style torch Dataset") from None
    if n == 0:
        raise DatasetError("the dataset is empty; give a dataset with at least one image")
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DatasetError(
            "dataset items must be (image, label) or (image, label, index) tuples; "
            f"got {type(item).__name__}"
        )
    return dataset if len(item) >= 3 else _Indexed(dataset)


def sample_pool(dataset: ImageDataset, size: int | None, seed: int = 0, per_class: bool = True) -> ImageDataset:
    """A seeded subset of ``size`` images (class-balanced when ``per_class``); all when size is None."""
    n = len(dataset)
    if size is not None and size > n:
        log.warning("a pool of %d images was asked for but the dataset has %d; the pool is all %d", size, n, n)
    if size is None or size >= n:
        return dataset
    if size <= 0:
        raise DatasetError(f"pool size must be positive, got {size}")
    rng = np.random.default_rng(seed)
    if per_class and getattr(dataset, "targets", None) is not None:
        targets = np.asarray(dataset.targets)
        classes = np.unique(targets)
        chosen = []
        per = size // len(classes)
        extra = size - per * len(classes)
        for j, c in enumerate(classes):
            idx = np.flatnonzero(targets == c)
            take = min(len(idx), per + (1 if j < extra else 0))
            chosen.append(rng.choice(idx, size=take, replace=False))
        picked = np.sort(np.concatenate(chosen))
    else:
        picked = np.sort(rng.choice(n, size=size, replace=False))
    return Subset(dataset, picked)


def class_indices(dataset, class_index: int) -> np.ndarray:
    """Positions in ``dataset`` of the images of one class."""
    targets = np.asarray(dataset.targets)
    return np.flatnonzero(targets == class_index)
