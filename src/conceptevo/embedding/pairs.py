"""Co-activation pairs D (METHOD §3; the paper's Algorithms 3 and 4).

For every image x, ``N_x`` is the set of neurons whose stimuli contain x. Each
image with ``|N_x| >= 2`` contributes ``|N_x| - 1`` pairs: ``N_x`` is shuffled and
consecutive members are paired (a sliding window of length 2). ``D`` is the
multiset of all such pairs, so two neurons that share more stimulus images are
paired more often: a given pair ``{n, m}`` appears, in expectation, ``sum over
shared images x of 2 / |N_x|`` times per draw.

The memberships are grouped by image once; every redraw is then one small
numba pass (a Fisher-Yates shuffle inside each group, from uniform numbers drawn
by numpy) that writes the pairs of consecutive members.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from numba import njit

from ..errors import ConceptEvoError


def check_indices(indices, name: str = "indices") -> np.ndarray:
    """``indices`` as an int64 ``[N, k]`` array, or a ConceptEvoError naming it."""
    arr = np.asarray(indices)
    if arr.ndim != 2:
        raise ConceptEvoError(f"{name} must be a 2-D [neurons, k] array of image indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConceptEvoError(f"{name} must hold integer image indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def stimulus_memberships(indices) -> tuple[np.ndarray, np.ndarray]:
    """Flat (neuron, image) memberships of a stimulus table, each counted once.

    ``indices`` is ``int [N, k]`` (row n = the images of neuron n's stimuli).
    Negative entries are padding (a neuron with fewer than k stimuli) and are
    skipped; an image listed twice in one neuron's row counts once. Returns
    ``(neurons, images)``, two int64 arrays sorted by neuron, then image.
    """
    arr = check_indices(indices)
    n, k = arr.shape
    neurons = np.repeat(np.arange(n, dtype=np.int64), k)
    images = arr.reshape(-1)
    keep = images >= 0
    neurons, images = neurons[keep], images[keep]
    order = np.lexsort((images, neurons))
    neurons, images = neurons[order], images[order]
    if neurons.size > 1:
        first = np.ones(neurons.size, dtype=bool)
        first[1:] = (neurons[1:] != neurons[:-1]) | (images[1:] != images[:-1])
        neurons, images = neurons[first], images[first]
    return neurons, images


@njit(cache=True)
def _shuffled_paths(neurons, starts, keys, heads, tails, pair_images, images):
    """Fisher-Yates shuffle of each image's members, then pairs of consecutive members.

    ``neurons[starts[g]:starts[g + 1]]`` are the members of image group g;
    ``keys`` holds one uniform [0, 1) number per membership (drawn by numpy).
    """
    buf = neurons.copy()
    out = 0
    for g in range(starts.size - 1):
        a = starts[g]
        size = starts[g + 1] - a
        if size < 2:
            continue
        for i in range(size - 1, 0, -1):
            j = min(int(keys[a + i] * (i + 1)), i)
            tmp = buf[a + i]
            buf[a + i] = buf[a + j]
            buf[a + j] = tmp
        for i in range(a, a + size - 1):
            heads[out] = buf[i]
            tails[out] = buf[i + 1]
            pair_images[out] = images[a]
            out += 1


class _ImageGroups:
    """Memberships grouped by image, prepared once so that each redraw of D is O(memberships)."""

    def __init__(self, neurons: np.ndarray, images: np.ndarray):
        order = np.argsort(images, kind="stable")
        self.neurons = neurons[order].astype(np.int32)
        self.images = images[order]
        bounds = np.flatnonzero(self.images[1:] != self.images[:-1]) + 1
        self.starts = np.concatenate([[0], bounds, [self.images.size]]).astype(np.int64)
        self.num_pairs = int(self.images.size - (self.starts.size - 1)) if self.images.size else 0

    def draw(self, rng: np.random.Generator, return_images: bool = False):
        """Pairs of consecutive neurons in a random order of each image's members."""
        heads = np.empty(self.num_pairs, np.int32)
        tails = np.empty(self.num_pairs, np.int32)
        images = np.empty(self.num_pairs, np.int64)
        _shuffled_paths(self.neurons, self.starts, rng.random(self.neurons.size), heads, tails, images, self.images)
        if return_images:
            return heads, tails, images
        return heads, tails


def coactivation_pairs(indices, rng=None, return_images: bool = False):
    """Draw the co-activation multiset D once.

    Parameters
    ----------
    indices : int array [N, k]
        Row n holds the image indices of neuron n's stimuli (negative = padding).
    rng : numpy Generator, int seed or None
        Source of the shuffles of each ``N_x``.
    return_images : bool
        Also return, for each pair, the image that made it.

    Returns
    -------
    heads, tails : int32 arrays [P]
        Pair p is ``(heads[p], tails[p])``, rows of ``indices``. Pairs come grouped
        by image, in increasing image order. ``P = sum over images of
        max(|N_x| - 1, 0)``; no pair joins a neuron with itself.
    images : int64 array [P]
        Only with ``return_images``.
    """
    rng = np.random.default_rng(rng)
    return _ImageGroups(*stimulus_memberships(indices)).draw(rng, return_images)


def pair_counts(heads, tails) -> Counter:
    """Multiset of unordered pairs: ``Counter({(min, max): count})``. For tests and diagnostics."""
    a = np.minimum(heads, tails).astype(np.int64)
    b = np.maximum(heads, tails).astype(np.int64)
    return Counter(zip(a.tolist(), b.tolist()))


def expected_pair_counts(indices) -> dict:
    """Expected count of each unordered pair per draw: ``sum over shared images x of 2 / |N_x|``."""
    neurons, images = stimulus_memberships(indices)
    order = np.argsort(images, kind="stable")
    neurons, images = neurons[order], images[order]
    out: dict = {}
    bounds = np.flatnonzero(np.diff(images)) + 1
    for group in np.split(neurons, bounds):
        s = group.size
        if s < 2:
            continue
        g = np.sort(group).tolist()
        for i in range(s):
            for j in range(i + 1, s):
                key = (g[i], g[j])
                out[key] = out.get(key, 0.0) + 2.0 / s
    return out


__all__ = ["coactivation_pairs", "pair_counts", "expected_pair_counts", "stimulus_memberships"]
