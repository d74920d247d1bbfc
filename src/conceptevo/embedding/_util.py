"""Small shared checks for the embedding and projection stages."""
from __future__ import annotations

import numpy as np

from ..errors import ConceptEvoError
from .pairs import check_indices


def stimuli_arrays(stimuli, name: str = "stimuli") -> tuple[list[str], np.ndarray, int | None]:
    """``(neuron_ids, indices [N, k] int64, num_images or None)`` of a Stimuli-like object."""
    try:
        ids = [str(i) for i in stimuli.neuron_ids]
        indices = stimuli.indices
    except AttributeError:
        raise ConceptEvoError(f"{name} must be a conceptevo Stimuli (with .neuron_ids and .indices), "
                              f"got {type(stimuli).__name__}") from None
    indices = check_indices(indices, f"{name}.indices")
    if len(ids) != indices.shape[0]:
        raise ConceptEvoError(f"{name} has {len(ids)} neuron ids but {indices.shape[0]} rows of indices; "
                              "rebuild it with Stimuli.from_arrays")
    num_images = getattr(stimuli, "num_images", None)
    return ids, indices, (None if num_images is None else int(num_images))


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a ConceptEvoError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConceptEvoError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConceptEvoError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_nonnegative(name: str, value) -> float:
    """``value`` as a float >= 0, or a ConceptEvoError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConceptEvoError(f"{name} must be a number >= 0, got {value!r}") from None
    if not v >= 0:
        raise ConceptEvoError(f"{name} must be a number >= 0, got {value!r}")
    return v


def make_rng(seed, name: str = "seed") -> np.random.Generator:
    """A numpy Generator from an int seed, a Generator, or None."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ConceptEvoError(f"{name} must be a non-negative integer, a numpy Generator or None, got {seed!r}")
    return np.random.default_rng(seed)
