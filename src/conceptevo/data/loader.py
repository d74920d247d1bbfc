"""Batches of ``(images, labels, indices)`` from any conceptevo-compatible dataset.

Datasets that can hand out a whole batch at once (``images_tensor(positions)``,
as the IDX and generated datasets do) are read without per-item Python work
(their ``preprocess``, if any, is applied to the whole batch);
any other torch Dataset goes through a DataLoader.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .base import Subset, indexed


def _fast_source(dataset):
    """(array-backed dataset, positions in it) when batches can be sliced directly, else None."""
    if hasattr(dataset, "images_tensor"):
        return dataset, None
    if isinstance(dataset, Subset) and hasattr(dataset.base, "images_tensor"):
        return dataset.base, dataset.indices
    return None


def _token_source(dataset):
    """(windows dataset, positions in it) for token windows (a dataset with ``token_windows = True`` and
    ``batch(indices) -> (ids, targets)``, such as :class:`~conceptevo.data.text.TextWindows`), else None."""
    if getattr(dataset, "token_windows", False):
        return dataset, None
    if isinstance(dataset, Subset) and getattr(dataset.base, "token_windows", False):
        return dataset.base, dataset.indices
    return None


def iter_batches(dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0, positions=None,
                 num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(images float32 [B,C,H,W], labels int64 [B], indices int64 [B])``.

    Token windows (:class:`~conceptevo.data.text.TextWindows`) yield ``(ids int64 [B, T], next tokens
    int64 [B, T], indices int64 [B])`` instead: token ids stay integers.
    ``positions`` restricts the pass to those positions of ``dataset``; ``indices``
    are always the images' indices in the full dataset.
    """
    n = len(dataset)
    order = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng(seed).permutation(order)
    tokens = _token_source(dataset)
    if tokens is not None:
        base, sub = tokens
        for s in range(0, len(order), batch_size):
            pos = order[s : s + batch_size]
            idx = pos if sub is None else sub[pos]
            ids, targets = base.batch(idx)
            yield ids, targets, torch.as_tensor(idx, dtype=torch.int64)
        return
    fast = _fast_source(dataset)
    if fast is not None:
        base, sub = fast
        targets = torch.as_tensor(np.asarray(base.targets, dtype=np.int64))
        pp = getattr(base, "preprocess", None)
        for s in range(0, len(order), batch_size):
            pos = order[s : s + batch_size]
            idx = pos if sub is None else sub[pos]
            idx_t = torch.as_tensor(idx, dtype=torch.int64)
            images = base.images_tensor(idx)
            yield (images if pp is None else pp(images)), targets[idx_t], idx_t
        return
    ds = indexed(dataset)
    sampler = order.tolist()
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    for images, labels, idx in loader:
        yield images.float(), torch.as_tensor(labels, dtype=torch.int64), torch.as_tensor(idx, dtype=torch.int64)
