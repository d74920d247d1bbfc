"""Shared checks and plumbing for importance and reversion.

Everything here is private: input validation that raises one-line
:class:`~conceptevo.errors.ConceptEvoError` messages naming the fix, TF32
handling and class sampling. Hooks, eval mode and device checks are
:mod:`conceptevo.hooks`'.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data.base import class_indices
from ..errors import ConceptEvoError, DatasetError, ModelInputError, check_positive
from ..hooks import check_model_device
from ..layers import resolve_layers

log = logging.getLogger(__name__)


class ModelMismatchError(ConceptEvoError):
    """model_from and model_to cannot be compared neuron by neuron."""


# ---------------------------------------------------------------- models
@contextmanager
def full_precision():
    """Turn TF32 off for CUDA convolutions and matmuls (restored on exit).

    Eq 5 multiplies a gradient by ``Z_t' - Z_t``, a difference of two close
    activations: TF32's 10-bit mantissa (PyTorch's default for cuDNN
    convolutions) makes that difference noisy enough to flip signs.
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul


def model_dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32


def check_distinct(model_from: nn.Module, model_to: nn.Module) -> None:
    """Error when the two models are one object or carry identical weights."""
    if model_from is model_to:
        raise ModelMismatchError(
            "model_from and model_to are the same model object; load the two checkpoints (epochs t and t') into two separate models"
        )
    sa, sb = model_from.state_dict(), model_to.state_dict()
    if sa.keys() != sb.keys():
        return
    for k in sa:
        a, b = sa[k], sb[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            return
        if not torch.equal(a, b.to(a.device)):
            return
    raise ModelMismatchError(
        "model_from and model_to have identical weights (the same checkpoint twice?); "
        "compare two different epochs of the model"
    )


def check_pair(model_from: nn.Module, model_to: nn.Module, layers, device) -> tuple[list[str], torch.device]:
    """The checks every two-checkpoint computation starts with: two distinct models with the same
    layers, both on ``device``. Returns the layer names and the device."""
    check_distinct(model_from, model_to)
    names = matching_layers(model_from, model_to, layers)
    dev = check_model_device(model_from, device, "model_from")
    check_model_device(model_to, device, "model_to")
    return names, dev


def matching_layers(model_from: nn.Module, model_to: nn.Module, layers) -> list[str]:
    """Resolve ``layers`` in both models; error naming the first layer that differs."""
    names_from = resolve_layers(model_from, layers)
    names_to = resolve_layers(model_to, layers)
    if names_from != names_to:
        only_from = [n for n in names_from if n not in names_to]
        only_to = [n for n in names_to if n not in names_from]
        detail = (
            f"layer {only_from[0]!r} is in model_from but not in model_to" if only_from
            else f"layer {only_to[0]!r} is in model_to but not in model_from" if only_to
            else "the layers come in a different order"
        )
        raise ModelMismatchError(
            f"model_from and model_to do not have the same layers: {detail}; "
            "compare two checkpoints of one architecture"
        )
    mods_from, mods_to = dict(model_from.named_modules()), dict(model_to.named_modules())
    for name in names_from:
        a, b = mods_from[name], mods_to[name]
        if type(a) is not type(b):
            raise ModelMismatchError(
                f"layer {name!r} is a {type(a).__name__} in model_from but a {type(b).__name__} in model_to; "
                "compare two checkpoints of one architecture"
            )
        ca, cb = _out_channels(a), _out_channels(b)
        if ca is not None and cb is not None and ca != cb:
            raise ModelMismatchError(
                f"layer {name!r} has {ca} channels in model_from but {cb} in model_to; "
                "compare two checkpoints of one architecture"
            )
    return names_from


def _out_channels(module: nn.Module) -> int | None:
    for attr in ("out_channels", "out_features", "num_features"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    return None


def check_shapes(acts_from: Mapping, acts_to: Mapping, layers: Sequence[str]) -> None:
    """Error naming the first layer whose activations (tensors or shapes) differ in shape between the models."""
    for name in layers:
        a, b = tuple(getattr(acts_from[name], "shape", acts_from[name])), tuple(getattr(acts_to[name], "shape", acts_to[name]))
        if a != b:
            what = "channels" if a[1:2] != b[1:2] else "activation-map shape"
            raise ModelMismatchError(
                f"layer {name!r} differs in {what} between the models: {list(a[1:])} in model_from, "
                f"{list(b[1:])} in model_to; compare two checkpoints of one architecture"
            )


def logits_of(output) -> torch.Tensor:
    """The class-score tensor ``[B, classes]`` of a model's output (tensor, tuple or ``.logits``)."""
    if isinstance(output, torch.Tensor):
        out = output
    elif hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        out = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        out = output[0]
    else:
        raise ConceptEvoError(
            f"the model returns {type(output).__name__}; it must return class scores as a [batch, classes] tensor"
        )
    if out.dim() != 2:
        raise ConceptEvoError(
            f"the model returns a tensor of shape {list(out.shape)}; it must return class scores as [batch, classes]"
        )
    return out


def run_model(model: nn.Module, x: torch.Tensor, first: bool) -> torch.Tensor:
    """Forward ``x``; on the first batch, turn a shape error into a one-line hint."""
    try:
        return logits_of(model(x))
    except RuntimeError as e:
        if not first:
            raise
        raise ModelInputError(x.shape[1:], type(model).__name__, e) from None


# ---------------------------------------------------------------- data
def labels_of(dataset) -> np.ndarray:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def class_label(dataset, class_index: int) -> str:
    """``"3 ('Dress')"`` where the dataset names its classes, else ``"3"``: how logs name a class."""
    classes = list(getattr(dataset, "classes", None) or [])
    i = int(class_index)
    return f"{i} ({classes[i]!r})" if 0 <= i < len(classes) else str(i)


def check_class(dataset, class_index, labels: np.ndarray | None = None) -> np.ndarray:
    """Positions of ``class_index``'s images in ``dataset``; errors for a bad or empty class."""
    if isinstance(class_index, bool) or not isinstance(class_index, (int, np.integer)):
        raise DatasetError(f"class_index must be an integer class number, got {class_index!r}")
    class_index = int(class_index)
    if labels is None:
        labels = labels_of(dataset)
    classes = list(getattr(dataset, "classes", None) or [])
    num = len(classes) if classes else (int(labels.max()) + 1 if labels.size else 0)
    if not 0 <= class_index < num:
        raise DatasetError(
            f"class index {class_index} is out of range: the dataset has {num} classes (0..{num - 1}); pick one of them"
        )
    if getattr(dataset, "targets", None) is not None:
        pos = class_indices(dataset, class_index)
    else:
        pos = np.flatnonzero(labels == class_index)
    if pos.size == 0:
        name = f" ({classes[class_index]!r})" if classes else ""
        present = np.unique(labels)
        raise DatasetError(
            f"class {class_index}{name} has no images in this dataset; pick a class that has images "
            f"(present: {', '.join(map(str, present[:20]))}{' ...' if present.size > 20 else ''})"
        )
    return pos


def sample_positions(pos: np.ndarray, sample_size: int | None, rng: np.random.Generator) -> np.ndarray:
    """A sorted seeded sample of ``sample_size`` of the dataset positions ``pos`` (all of them when None or too few).

    ``sample_size`` is what callers take as ``num_images=`` (or ``num_test_images=``); errors and logs name that.
    """
    if sample_size is None:
        return np.sort(pos)
    check_positive("num_images", sample_size, integer=True)
    if sample_size >= pos.size:
        if sample_size > pos.size:
            log.info("the class has %d images, fewer than num_images=%d: using all of them", pos.size, sample_size)
        return np.sort(pos)
    return np.sort(rng.choice(pos, size=sample_size, replace=False))


def explicit_positions(dataset, images) -> np.ndarray:
    pos = np.asarray(images, dtype=np.int64).reshape(-1)
    if pos.size == 0:
        raise DatasetError("images= is empty; pass at least one dataset position")
    n = len(dataset)
    bad = pos[(pos < 0) | (pos >= n)]
    if bad.size:
        raise DatasetError(f"images= holds position {int(bad[0])}, outside the dataset's {n} images; pass positions 0..{n - 1}")
    return pos
