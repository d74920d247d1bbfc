"""The running top-k merge: the CPU's compiled insertion pass and the GPU's tensor merge against brute force.

Brute force: every (value, image, position) a channel has seen, sorted by value descending then image
index ascending, the first k kept; slots not yet filled (k larger than the images seen so far) hold
-inf, the largest int64 and position -1. Values come from a few levels so that ties are common, and
batches arrive in order, out of order, and one image at a time.
"""
import numpy as np
import pytest
import torch

from conceptevo.stimuli import _TopK, _insert

FILL_I = np.iinfo(np.int64).max


def brute(seen, C, k):
    """``seen``: per channel a list of (value, index, position); the expected ``[C, k]`` state."""
    v = np.full((C, k), -np.inf, np.float32)
    i = np.full((C, k), FILL_I, np.int64)
    p = np.full((C, k), -1, np.int64)
    for c in range(C):
        best = sorted(seen[c], key=lambda e: (-e[0], e[1]))[:k]
        for j, (val, ind, pos) in enumerate(best):
            v[c, j], i[c, j], p[c, j] = val, ind, pos
    return v, i, p


def batches(order, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(order[start:start + s])
        start += s
    return out


CASES = [  # (images, channels, k, batch sizes, shuffled)
    (30, 5, 4, [7, 7, 7, 7, 2], False),
    (30, 5, 4, [7, 7, 7, 7, 2], True),
    (6, 3, 10, [2, 3, 1], False),   # k larger than the whole pool: unfilled slots stay
    (25, 4, 3, [1] * 25, False),    # one image at a time
    (40, 6, 5, [13, 27], True),
]


@pytest.mark.parametrize("n,C,k,sizes,shuffled", CASES)
@pytest.mark.parametrize("source", ["maps", "tokens", "given", "none"])
def test_insertion_pass_matches_brute_force(n, C, k, sizes, shuffled, source):
    rng = np.random.default_rng(n * 31 + C + k)
    T = 5
    # activations on a few levels: ties between images and between positions within a map
    acts = rng.integers(-2, 3, size=(n, C, T)).astype(np.float32)
    given = rng.integers(0, 100, size=(n, C))
    order = rng.permutation(n) if shuffled else np.arange(n)
    top = _TopK(C, k, "cpu")
    seen = [[] for _ in range(C)]
    for b in batches(order, sizes):
        idx = torch.as_tensor(b, dtype=torch.int64)
        maps = torch.from_numpy(acts[b])  # [B, C, T]
        vals = maps.amax(dim=2)
        if source == "maps":
            _insert.merge(vals, idx, top.v, top.i, top.p, maps=maps)
        elif source == "tokens":  # [B, T, C] channels last, read through a strided view as find_stimuli does
            tokens = maps.transpose(1, 2).contiguous()
            _insert.merge(vals, idx, top.v, top.i, top.p, maps=tokens.movedim(-1, 1))
        elif source == "given":
            _insert.merge(vals, idx, top.v, top.i, top.p, given=torch.from_numpy(given[b]))
        else:
            _insert.merge(vals, idx, top.v, top.i, top.p)
        for row, image in enumerate(b):
            for c in range(C):
                pos = {"given": given[image, c], "none": 0}.get(source, int(np.argmax(acts[image, c])))
                seen[c].append((float(vals[row, c]), int(image), int(pos)))
        ev, ei, ep = brute(seen, C, k)  # after every batch, so k > images seen so far is covered
        np.testing.assert_array_equal(top.v.numpy(), ev)
        np.testing.assert_array_equal(top.i.numpy(), ei)
        np.testing.assert_array_equal(top.p.numpy(), ep)


@pytest.mark.parametrize("n,C,k,sizes,shuffled", CASES)
def test_tensor_merge_matches_insertion(n, C, k, sizes, shuffled):
    """The GPU's merge (run here on CPU tensors) and the CPU's insertion pass keep the same state."""
    rng = np.random.default_rng(7 + n + k)
    vals_all = torch.from_numpy(rng.integers(-3, 3, size=(n, C)).astype(np.float32))
    pos_all = torch.from_numpy(rng.integers(0, 50, size=(n, C)))
    order = rng.permutation(n) if shuffled else np.arange(n)
    a, b = _TopK(C, k, "cpu"), _TopK(C, k, "cpu")
    seen = -1
    for part in batches(order, sizes):
        idx = torch.as_tensor(part, dtype=torch.int64)
        ascending = bool(part[0] > seen) and bool(np.all(np.diff(part) > 0))
        seen = max(seen, int(part.max()))
        a.update(vals_all[part], pos_all[part], idx, ascending)
        b.merge_tensors(vals_all[part], pos_all[part], idx, ascending)
        for attr in ("v", "i", "p"):
            assert torch.equal(getattr(a, attr), getattr(b, attr)), attr


def test_nan_never_enters():
    top = _TopK(2, 2, "cpu")
    vals = torch.tensor([[float("nan"), 1.0], [0.5, float("nan")]])
    _insert.merge(vals, torch.tensor([0, 1]), top.v, top.i, top.p)
    assert top.i.tolist() == [[1, FILL_I], [0, FILL_I]]


def test_usable_only_for_cpu_float32_and_float64():
    assert _insert.usable(torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    assert not _insert.usable(torch.zeros(2, dtype=torch.bfloat16))
    assert not _insert.usable(torch.zeros(2, dtype=torch.float16))
