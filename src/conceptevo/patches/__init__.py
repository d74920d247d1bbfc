"""Example patches: each stimulus cropped to the receptive field around its argmax position.

A person judges a neuron's concept by looking at the input regions that made it
fire. The stimuli pass already recorded, for every neuron, its top-k images and
the flat argmax position of each in the neuron's activation map; this module
turns those into pictures without a second pass over the dataset:

1. **Receptive fields** are derived from the model itself (:func:`receptive_fields`).
   A probe copy of the model gets positive weights (``1 / fan_in``), neutral
   normalisation, and its max-pools swapped for average pools of the same
   geometry, so that every path from input to output carries a strictly positive
   gradient. The gradient of one output position with respect to a constant
   input is then nonzero exactly on the input pixels that position can see, for
   any wiring: strides, pooling, residual sums, concatenated branches. Each
   probe sample backpropagates one position ``(t, t)`` on the diagonal, which
   gives the row extent of output row t and the column extent of output column t
   at once; large layers are probed at a subset of positions and fitted with
   the affine ``start = offset + i * stride`` law (clipped to the image), which
   is checked against every measured position.
2. **Crops**: each stimulus image is read by index from the dataset and cut to
   the box of its argmax position, then resized to one square cell size.
3. **Storage** (under ``patches/`` in the workspace): per checkpoint, sprite
   sheets (PNG, at most 1024 px a side) holding each neuron's k patches in a
   row, the boxes in input pixels (``boxes.npy``) and an ``index.json``
   describing the sheet geometry; once per study the full stimulus images as
   sprite sheets with their dataset indices and labels; per model the receptive
   fields (``receptive_fields.json``).

:class:`PatchStore` reads it back; one neuron's patches come out of a cached,
decoded sheet in well under a millisecond.
"""
from .receptive import ReceptiveField, probe_copy, receptive_fields
from .sheets import SHEET_MAX, SheetGeometry, _png_bytes, _resize, _write_sheets, crop_patches, to_uint8_image
from .stage import DEFAULT_MAX_CELL, compute_patches
from .store import FORMAT_VERSION, PatchStore, patches_dir

__all__ = [
    "ReceptiveField", "receptive_fields", "probe_copy", "SheetGeometry", "crop_patches", "to_uint8_image",
    "compute_patches", "PatchStore", "patches_dir",
]
