"""conceptevo: how the concepts a neural network detects are born and change during training.

An implementation of ConceptEvo (Park et al., CIKM 2023). The pipeline:
data -> stimuli -> embedding -> projection -> importance / evaluation -> figures / explorer.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported lazily so `import conceptevo` stays fast (umap, numba are slow to import).
_EXPORTS = {
    "Stimuli": ".stimuli", "find_stimuli": ".stimuli", "top_responses": ".stimuli",
    "NeuronEmbedding": ".embedding", "embed_neurons": ".embedding",
    "ImageEmbedding": ".embedding", "embed_images": ".embedding",
    "project": ".projection", "fit_layout": ".projection", "UnifiedSpace": ".projection",
    "Workspace": ".workspace",
    "make_figures": ".report", "explore": ".explorer", "export_site": ".explorer",
    "load_checkpoint": ".models", "build_model": ".models", "list_checkpoints": ".models",
    "evolution_importance": ".importance",
    "ConceptEvoError": ".errors",
    "resolve_layers": ".layers",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'conceptevo' has no attribute {name!r}")
