"""The unified space in the tools people already use.

- :func:`export_tensorboard`: TensorBoard's embedding projector (every
  checkpoint's units, all checkpoints together, and the images, with metadata
  and example patches as point pictures);
- :func:`export_wandb`: a Weights & Biases run (offline by default) with a
  table of units per checkpoint (2-D layout, classes, top patch as an image)
  and the diagnostics curves.

Both need their optional package (``pip install 'conceptevo[tensorboard]'``,
``'conceptevo[wandb]'``), imported only when called.
"""
from __future__ import annotations

from .projector import export_tensorboard
from .wandb_export import export_wandb

__all__ = ["export_tensorboard", "export_wandb"]
