"""The running top-k merge on CPUs: one compiled insertion pass per layer and batch (numba).

Why: on a CPU, the tensor merge of :class:`conceptevo.stimuli._TopK` (candidate selection, a stable sort
of ``[C, k + m]``, gathers, then the argmax of every entering map) is a dozen small PyTorch operations per
layer and batch. For a small ViT they were about 10% of the pass in a profile, more than the reduction
of the maps itself, and they barely get faster with more threads (``bench/bench_tokens.py``). Here one loop
visits each ``(image, channel)`` strength once: a value that does not beat the channel's current k-th
entry costs one comparison; one that does is inserted in place (the few entries below it shift down by
one), and only then is its position found, by a scan of that one map.

The order is the tensor merge's: value descending, ties to the lower image index, so the result is the
same entries in the same order. A NaN strength never enters (the pass rejects any NaN at its end, from
the running sums). Positions are the first maximum of the map, as ``torch.argmax`` gives.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

#: output dtypes whose maps the compiled pass reads for positions (numpy has no bfloat16; for float16 and
#: bfloat16 outputs the pass merges their float32 strengths here and PyTorch finds the positions after)
DTYPES = (torch.float32, torch.float64)


@njit(cache=True)
def _insert(vals, idx, maps, given, mode, v, ind, pos):  # pragma: no cover - compiled; tested through merge()
    """Insert every ``vals[b, c]`` (image ``idx[b]``) that beats channel c's k-th entry into ``v``/``ind``/``pos``.

    ``mode`` says where an entering value's position comes from: 0, the first maximum of ``maps[b, c, :]``;
    1, ``given[b, c]``; 2, position 0 (``[B, C]`` outputs and reductions without a position).
    """
    B, C = vals.shape
    k = v.shape[1]
    for b in range(B):  # the comparisons break ties by image index, so the visiting order does not matter;
        for c in range(C):  # channels innermost: a [B, T, C] map's neighbouring channels are neighbours in memory
            x = vals[b, c]
            j = idx[b]
            last = v[c, k - 1]
            if not (x > last or (x == last and j < ind[c, k - 1])):
                continue
            s = k - 1
            while s > 0 and (v[c, s - 1] < x or (v[c, s - 1] == x and ind[c, s - 1] > j)):
                v[c, s] = v[c, s - 1]
                ind[c, s] = ind[c, s - 1]
                pos[c, s] = pos[c, s - 1]
                s -= 1
            v[c, s] = x
            ind[c, s] = j
            if mode == 0:
                best, at = maps[b, c, 0], 0
                for t in range(1, maps.shape[2]):
                    if maps[b, c, t] > best:
                        best, at = maps[b, c, t], t
                pos[c, s] = at
            elif mode == 1:
                pos[c, s] = given[b, c]
            else:
                pos[c, s] = 0


_NO_MAPS = np.zeros((1, 1, 1), dtype=np.float32)
_NO_POS = np.zeros((1, 1), dtype=np.int64)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether :func:`merge` can take these tensors: on the CPU, and floating ones of a dtype numpy reads."""
    return all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype in DTYPES) for t in tensors)


def merge(vals: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, ind: torch.Tensor, pos: torch.Tensor,
          maps: torch.Tensor | None = None, given: torch.Tensor | None = None) -> None:
    """Merge a batch's ``[B, C]`` strengths ``vals`` (images ``idx``) into the ``[C, k]`` state ``v``, ``ind``, ``pos``, in place.

    Positions of entering values come from ``maps`` (``[B, C, positions]``, any strides: the first
    maximum), else from ``given`` (``[B, C]``), else are 0. ``v`` must be float32 and every state
    tensor contiguous (they are written through numpy views).
    """
    mode = 0 if maps is not None else 1 if given is not None else 2
    _insert(np.ascontiguousarray(vals.numpy()), np.ascontiguousarray(idx.numpy(), dtype=np.int64),
            maps.numpy() if maps is not None else _NO_MAPS, given.numpy() if given is not None else _NO_POS,
            mode, v.numpy(), ind.numpy(), pos.numpy())
