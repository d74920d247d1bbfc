"""Differential entropy of one-dimensional samples (concept diversity, METHOD §9).

The paper measures concept diversity as "the differential entropy of each
dimension of the neuron embeddings, averaged over the dimensions", without
naming an estimator. This module gives three, selected by ``method``:

``"knn"`` (default): Kozachenko-Leonenko k-nearest-neighbour estimator, in 1-D::

    H = psi(n) - psi(k) + log 2 + (1/n) * sum_i log eps_i

where ``eps_i`` is the distance from ``x_i`` to its k-th nearest other sample
and ``psi`` the digamma function (``log 2`` is the log-length of the unit
"ball" [-1, 1]). It is asymptotically unbiased for any smooth density and has
small bias already for tens of samples, which matters here because a layer
often has only 8-64 neurons. Distances are computed exactly from the sorted
sample (the k nearest neighbours of a point are among the k on either side).

Ties: when ``k + 1`` or more neurons share a coordinate exactly (neurons with
the same stimulus set get the same projected vector), ``eps_i = 0``. Distances
are therefore floored at ``resolution * k * sd / n`` (``sd`` the sample's
standard deviation; ``k * sd / n`` is the order of a typical k-th-neighbour
distance, and the default ``resolution = 0.25`` keeps the floor far below the
distances of tie-free data, so it does not bias them). A clump of identical
neurons then lowers the estimate by a bounded amount per neuron instead of
sending it to ``-inf``; only when all values are equal is the result ``-inf``.

``"vasicek"``: Vasicek's m-spacing estimator as ``scipy.stats.differential_entropy``
computes it (``m = round(sqrt(n) + 0.5)``); negatively biased for small n, kept
because it is what a reader with SciPy would most likely have used (the
paper's code does not say). Exact ties give ``-inf``.

``"gaussian"``: the Gaussian plug-in ``0.5 * log(2 * pi * e * var)``; exact
for normal data, a lower-variance reference otherwise.

All three return nats. For ``N(mu, sigma^2)`` the true value is
``0.5 * log(2 * pi * e * sigma^2)`` (:func:`gaussian_entropy`).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import digamma

from ..errors import ConceptEvoError

METHODS = ("knn", "vasicek", "gaussian")


def gaussian_entropy(sigma: float) -> float:
    """Closed form: the differential entropy (nats) of a normal with standard deviation ``sigma``."""
    if not sigma > 0:
        raise ConceptEvoError(f"sigma must be positive, got {sigma!r}")
    return 0.5 * math.log(2 * math.pi * math.e * sigma * sigma)


def _check(method: str, k: int) -> None:
    if method not in METHODS:
        raise ConceptEvoError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConceptEvoError(f"k (the neighbour rank of the knn estimator) must be a positive integer, got {k!r}")


def kth_neighbour_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each value of ``x`` (1-D) to its k-th nearest other value (exact, O(n k))."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    if n <= k:
        raise ConceptEvoError(f"the k-th neighbour needs more than k={k} values, got {n}")
    # candidates: the k values on either side of each sorted position
    cand = np.full((n, 2 * k), np.inf)
    for j in range(1, k + 1):
        cand[j:, j - 1] = x[j:] - x[:-j]          # left neighbours
        cand[:-j, k + j - 1] = x[j:] - x[:-j]     # right neighbours
    return np.partition(cand, k - 1, axis=1)[:, k - 1]


def differential_entropy(x, method: str = "knn", k: int = 3, resolution: float = 0.25) -> float:
    """Differential entropy (nats) of the 1-D sample ``x`` (finite values only; see the module docstring).

    Returns NaN when fewer than ``k + 1`` finite values remain (``method="knn"``),
    or fewer than 2 (other methods).
    """
    _check(method, k)
    if not resolution > 0:
        raise ConceptEvoError(f"resolution must be positive, got {resolution!r}")
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = len(x)
    if method == "gaussian":
        if n < 2:
            return float("nan")
        var = float(np.var(x, ddof=1))
        return 0.5 * math.log(2 * math.pi * math.e * var) if var > 0 else float("-inf")
    if method == "vasicek":
        if n < 2:
            return float("nan")
        from scipy.stats import differential_entropy as _scipy_de

        with np.errstate(divide="ignore"):
            return float(_scipy_de(x, method="vasicek"))
    if n <= k:
        return float("nan")
    sd = float(np.std(x))
    if sd == 0.0:
        return float("-inf")
    eps = np.maximum(kth_neighbour_distance(x, k), resolution * k * sd / n)
    return float(digamma(n) - digamma(k) + math.log(2.0) + np.mean(np.log(eps)))


def mean_entropy(vectors, method: str = "knn", k: int = 3, resolution: float = 0.25) -> float:
    """Concept diversity of a set of vectors ``[n, dim]``: per-dimension entropy, averaged over dimensions.

    Rows with any non-finite value are dropped first. NaN when too few rows remain.
    """
    _check(method, k)
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ConceptEvoError(f"vectors must be a [neurons, dim] array, got shape {v.shape}")
    v = v[np.isfinite(v).all(axis=1)]
    need = k + 1 if method == "knn" else 2
    if len(v) < need or v.shape[1] == 0:
        return float("nan")
    return float(np.mean([differential_entropy(v[:, d], method, k, resolution) for d in range(v.shape[1])]))


__all__ = ["differential_entropy", "mean_entropy", "gaussian_entropy", "kth_neighbour_distance", "METHODS"]
