"""conceptevo: how the concepts a neural network detects are born and change during training.

An implementation of ConceptEvo (Park et al., CIKM 2023). The pipeline:
data -> stimuli -> embedding -> projection -> importance / evaluation -> figures / explorer.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports each on first use
    from .embedding import ImageEmbedding, NeuronEmbedding, embed_images, embed_neurons
    from .errors import ConceptEvoError
    from .explorer import explore, export_site
    from .importance import evolution_importance
    from .layers import resolve_layers
    from .models import build_model, list_checkpoints, load_checkpoint
    from .projection import UnifiedSpace, fit_layout, project
    from .report import make_figures
    from .stimuli import Stimuli, find_stimuli, top_responses
    from .workspace import Workspace


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'conceptevo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
