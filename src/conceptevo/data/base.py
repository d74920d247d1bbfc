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
from .transforms import Preprocess

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Base class: subclasses set ``classes`` and ``targets`` and implement ``image(i)``.

    ``image(i)`` is the stored image in [0, 1]; :meth:`pixels` is what people
    see (after any resize/crop); ``dataset[i][0]`` is what the model gets
    (after the whole :attr:`preprocess`, e.g. mean/std normalisation).
    """

    classes: list[str]
    targets: np.ndarray  # int64 [len]
    name: str = "dataset"
    preprocess: Preprocess | None = None

    def __len__(self) -> int:
        return int(len(self.targets))

    def image(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_preprocess(self, preprocess: Preprocess | None) -> "ImageDataset":
        """Use ``preprocess`` (checked on the first image now) for every image the model gets; returns self."""
        if preprocess is not None and preprocess.is_identity:
            preprocess = None
        if preprocess is not None and len(self):
            preprocess.check(self.image(0))
        self.preprocess = preprocess
        return self

    def pixels(self, i: int) -> torch.Tensor:
        """Image ``i`` as people see it: [C, H, W] in [0, 1], resized/cropped as the model's input."""
        x = self.image(i)
        pp = self.preprocess
        if pp is None:
            return x
        return pp.geometry(x) if pp.keeps_shape else pp.values(pp.geometry(x))

    def __getitem__(self, i: int):
        i = int(i)
        if i < 0 or i >= len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        x = self.image(i)
        if self.preprocess is not None:
            x = self.preprocess(x)
        return x, int(self.targets[i]), i

    def reorder_classes(self, classes=None, class_to_idx=None) -> "ImageDataset":
        """Number the classes as the model does (see :func:`class_order`); returns self."""
        order = class_order(self.classes, classes, class_to_idx, where=self.name)
        if order is not None:
            pos = {c: j for j, c in enumerate(order)}
            mapping = np.array([pos[c] for c in self.classes], dtype=np.int64)
            self.targets = mapping[np.asarray(self.targets, dtype=np.int64)]
            self.classes = order
        return self

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of the model's input."""
        return tuple(self[0][0].shape)  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """A short hash identifying the data as the model gets it (used to know when cached results are stale)."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(str(len(self)).encode())
        h.update(np.ascontiguousarray(self.targets, dtype=np.int64).tobytes())
        for i in np.linspace(0, len(self) - 1, num=min(len(self), 16)).astype(int):
            h.update(self[int(i)][0].numpy().tobytes())
        return h.hexdigest()[:16]


def class_order(current, classes=None, class_to_idx=None, where: str = "the dataset") -> list[str] | None:
    """The class names by the model's output index, from ``classes`` (a list) or ``class_to_idx`` (name -> index).

    Every class of ``current`` (the dataset's own names) must appear; outputs
    no class of the data maps to are named ``"output N"``. None when neither
    is given.
    """
    if classes is not None and class_to_idx is not None:
        raise DatasetError("give classes (a list in the model's order) or class_to_idx (name -> index), not both")
    if classes is None and class_to_idx is None:
        return None
    if class_to_idx is not None:
        if not isinstance(class_to_idx, dict) or not class_to_idx:
            raise DatasetError(f"class_to_idx must be a non-empty mapping of class name -> model output index, got {class_to_idx!r}")
        idx = list(class_to_idx.values())
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in idx) or len(set(idx)) != len(idx):
            raise DatasetError(f"class_to_idx must map each class to a distinct non-negative index, got {class_to_idx!r}")
        order = [f"output {j}" for j in range(max(idx) + 1)]
        for name, j in class_to_idx.items():
            order[int(j)] = str(name)
    else:
        if isinstance(classes, str) or not isinstance(classes, (list, tuple)) or not classes:
            raise DatasetError(f"classes must be a non-empty list of class names in the model's output order, got {classes!r}")
        order = [str(c) for c in classes]
    dup = sorted({c for c in order if order.count(c) > 1})
    if dup:
        raise DatasetError(f"classes names {', '.join(map(repr, dup))} more than once; each class must appear once")
    missing = [c for c in current if c not in order]
    if missing:
        raise DatasetError(
            f"{where} has class(es) {', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''} that the "
            f"class order does not list ({', '.join(map(repr, order[:10]))}{', ...' if len(order) > 10 else ''}); "
            "list every class of the data at its model output index")
    return order


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
        label = item[1] if torch.is_tensor(item[1]) and item[1].dim() > 0 else int(item[1])  # text: next tokens [T]
        return item[0], label, (int(item[2]) if len(item) > 2 else j)

    def image(self, i: int) -> torch.Tensor:
        j = int(self.indices[int(i)])
        return self.base.image(j) if hasattr(self.base, "image") else self.base[j][0]

    def pixels(self, i: int) -> torch.Tensor:
        return display_image(self.base, int(self.indices[int(i)]))

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


def display_image(dataset, i: int) -> torch.Tensor:
    """Image at position ``i`` as people see it (before normalisation), when the dataset can tell; else its model input."""
    if hasattr(dataset, "pixels"):
        return dataset.pixels(int(i))
    return dataset[int(i)][0]


def sample_pool(dataset: ImageDataset, size: int | None, seed: int = 0, per_class: bool = True) -> ImageDataset:
    """A seeded subset of ``size`` images (class-balanced when ``per_class``); all when size is None.

    A subset of a :class:`Subset` is again a Subset of the full dataset (its
    ``base``), so ``len(pool.base)`` is always the number of image indices.
    """
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
    if isinstance(dataset, Subset):
        return Subset(dataset.base, dataset.indices[picked])
    return Subset(dataset, picked)


def class_indices(dataset, class_index: int) -> np.ndarray:
    """Positions in ``dataset`` of the images of one class."""
    targets = np.asarray(dataset.targets)
    return np.flatnonzero(targets == class_index)
