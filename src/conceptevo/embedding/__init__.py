"""Base semantic space: neuron embedding (METHOD §3-4) and image embedding (METHOD §5).

- :func:`coactivation_pairs` draws the co-activation multiset D from stimuli;
- :func:`embed_neurons` learns the base neuron vectors (skip-gram, Algorithm 1);
- :func:`embed_images` learns image vectors whose stimulus means reproduce them.
"""
from __future__ import annotations

from .images import ImageEmbedding, embed_images, fit_summary, stimulus_matrix
from .neurons import (DEFAULT_EPOCHS, NeuronEmbedding, embed_neurons, embed_neurons_reference, objective,
                      sample_epoch)
from .pairs import coactivation_pairs, stimulus_memberships

__all__ = [
    "coactivation_pairs", "stimulus_memberships",
    "NeuronEmbedding", "embed_neurons", "embed_neurons_reference", "objective", "sample_epoch", "DEFAULT_EPOCHS",
    "ImageEmbedding", "embed_images", "stimulus_matrix", "fit_summary",
]
