"""Importance of each neuron's concept evolution for a class (METHOD section 7, paper Eqs 5-7).

Between checkpoint t (``model_from``) and t' (``model_to``), neuron n of layer l
evolves from activation map ``Z_t[n]`` to ``Z_t'[n]``. Its sensitivity on an
image x of class c is the first-order change of the class logit that the
evolution causes, measured with model t's gradient at its own activations::

    S(x) = sum_{h,w} G[n,h,w] * (Z_t'[n,h,w](x) - Z_t[n,h,w](x)),   G = d logit_c / d Z_t,l

and its importance is the share of the class's images with ``S(x) > 0``.

The computation is batched. Per batch: one forward of model t with hooks that
tap every selected layer's output, one ``torch.autograd.grad`` of the summed
class logit with respect to all the tapped outputs (in eval mode images are
independent, so this yields every image's gradient at every layer at once, and
no weight gradients are computed), one forward of model t' under ``no_grad``
capturing the same layers, and one gradient-times-change product per layer
summed over positions. Hooks, not a sequential re-implementation of the
forward, so residual and branching models work.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as ddp
from ..data.base import indexed
from ..data.loader import iter_batches
from ..errors import ConceptEvoError, check_positive
from ..io import atomic_path
from ..hooks import capture, eval_mode, replace_outputs
from ..layers import channel_axes, channel_axis_of
from ..units import neuron_id, num_channels, split_neuron_id, sum_positions
from ._common import (
    check_class,
    class_label,
    check_pair,
    check_shapes,
    explicit_positions,
    full_precision,
    labels_of,
    model_dtype,
    run_model,
    sample_positions,
)

log = logging.getLogger(__name__)


@dataclass
class EvolutionImportance:
    """Importance of every neuron's evolution t -> t' for one class.

    ``scores[j]`` (float32, in [0, 1]) is the share of the sampled images of the
    class on which neuron ``neuron_ids[j]``'s evolution raised the class logit
    (to first order); ``sensitivities[i, j]`` is that first-order change,
    ``S(x_i)`` of Eq 5, for image i. ``image_indices`` are the images' indices in
    the full dataset (the ids stimuli use), ``positions`` their positions in
    the dataset that was passed.
    """

    neuron_ids: list[str]
    scores: np.ndarray          # float32 [N]
    sensitivities: np.ndarray   # float32 [images, N]
    image_indices: np.ndarray   # int64 [images]
    class_index: int
    layers: list[str]
    channels: list[int] = field(default_factory=list)  # per layer, so neurons of layer i are a slice
    positions: np.ndarray | None = None                # int64 [images]

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.sensitivities = np.asarray(self.sensitivities, dtype=np.float32)
        self.image_indices = np.asarray(self.image_indices, dtype=np.int64)
        if not self.channels:
            counts: dict[str, int] = {}
            for nid in self.neuron_ids:
                layer, _ = split_neuron_id(nid)
                counts[layer] = counts.get(layer, 0) + 1
            self.channels = [counts.get(name, 0) for name in self.layers]

    def __len__(self) -> int:
        return len(self.neuron_ids)

    @property
    def num_images(self) -> int:
        return int(self.sensitivities.shape[0])

    def layer_slices(self) -> dict[str, slice]:
        """The columns of each layer's neurons."""
        out, start = {}, 0
        for name, c in zip(self.layers, self.channels):
            out[name] = slice(start, start + c)
            start += c
        return out

    @property
    def mean_sensitivity(self) -> np.ndarray:
        """float32 [N]: each neuron's mean first-order change of the class logit over the images (Eq 5 averaged)."""
        if not self.num_images:
            return np.zeros(len(self), np.float32)
        return self.sensitivities.mean(axis=0, dtype=np.float64).astype(np.float32)

    def ranking(self) -> np.ndarray:
        """Neuron positions from most to least important.

        Ties in score (common: scores are multiples of 1/images) are broken by
        the larger mean sensitivity, then by neuron order.
        """
        return np.lexsort((np.arange(len(self)), -self.mean_sensitivity, -self.scores))

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` most important evolutions as ``(neuron_id, score)``, best first."""
        check_positive("n", n, integer=True)
        return [(self.neuron_ids[j], float(self.scores[j])) for j in self.ranking()[:n]]

    def tie_note(self, n: int = 10) -> str | None:
        """A sentence on the score ties that the top ``n`` runs into and how they were ranked; None without ties.

        Scores are shares of a few images, so many neurons often share one
        (e.g. every image helped: 1.000); the top ``n`` would then be an
        arbitrary cut, and this says which secondary measure made it.
        """
        check_positive("n", n, integer=True)
        order = self.ranking()[:n]
        scores, mean = self.scores, self.mean_sensitivity
        parts, by_order = [], False
        for v in dict.fromkeys(float(x) for x in scores[order]):
            tied = np.flatnonzero(scores == v)
            if tied.size < 2:
                continue
            shown = int(np.sum(scores[order] == v))
            parts.append(f"{tied.size} neurons score {v:.3f}"
                         + (f" ({shown} of them in the top {len(order)})" if shown < tied.size else ""))
            by_order |= len(np.unique(mean[tied])) < tied.size
        if not parts:
            return None
        return ("ties: " + "; ".join(parts) + ". Equal scores are ranked by mean sensitivity (the mean first-order "
                "change of the class logit over the images), larger first" + (", then by neuron order" if by_order else "") + ".")

    def top_lines(self, n: int = 10) -> list[str]:
        """The top ``n`` as printable lines: rank, neuron, score, mean sensitivity, then the tie note if any."""
        mean = self.mean_sensitivity
        lines = [f"  {'rank':>4}  {'neuron':<24} {'score':>6}  mean sensitivity"]
        for rank, j in enumerate(self.ranking()[:n], start=1):
            lines.append(f"  {rank:>4}  {self.neuron_ids[j]:<24} {float(self.scores[j]):>6.3f}  {float(mean[j]):+.4g}")
        note = self.tie_note(n)
        return lines + ([note] if note else [])

    def to_csv(self, path, class_name: str | None = None) -> Path:
        """Write one row per neuron (rank, neuron_id, layer, channel, score, mean_sensitivity), best first.

        With ``class_name`` a first column ``class`` names the class the scores are for.
        """
        path = Path(path)
        mean = self.mean_sensitivity
        with atomic_path(path, suffix=".csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                first = [] if class_name is None else [class_name]
                w.writerow(([] if class_name is None else ["class"]) + ["rank", "neuron_id", "layer", "channel", "score", "mean_sensitivity"])
                for rank, j in enumerate(self.ranking(), start=1):
                    layer, ch = split_neuron_id(self.neuron_ids[j])
                    w.writerow(first + [rank, self.neuron_ids[j], layer, ch, repr(float(self.scores[j])), repr(float(mean[j]))])
        return path

    def save(self, path) -> Path:
        """Save everything to one ``.npz`` file (read back with :meth:`load`)."""
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f, neuron_ids=np.array(self.neuron_ids), scores=self.scores, sensitivities=self.sensitivities,
                    image_indices=self.image_indices, class_index=np.int64(self.class_index),
                    layers=np.array(self.layers), channels=np.asarray(self.channels, dtype=np.int64),
                    positions=(np.asarray(self.positions, dtype=np.int64) if self.positions is not None else np.zeros(0, np.int64)),
                )
        return path

    @classmethod
    def load(cls, path) -> "EvolutionImportance":
        with np.load(path, allow_pickle=False) as z:
            return cls(
                neuron_ids=[str(s) for s in z["neuron_ids"]], scores=z["scores"], sensitivities=z["sensitivities"],
                image_indices=z["image_indices"], class_index=int(z["class_index"]), layers=[str(s) for s in z["layers"]],
                channels=[int(c) for c in z["channels"]], positions=(z["positions"] if z["positions"].size else None),
            )


def _tap(store: dict, name: str):
    """A hook body that keeps the layer output for autograd and passes a copy downstream.

    The copy keeps ``Z`` intact when the next module works in place (e.g.
    ``ReLU(inplace=True)``); gradients flow back through it to the tapped tensor.
    """

    def fn(out: torch.Tensor) -> torch.Tensor:
        z = out if out.requires_grad else out.detach().requires_grad_(True)
        store[name] = z
        return z.clone()

    return fn


def batch_sensitivities(model_from: nn.Module, model_to: nn.Module, layers: Sequence[str], x: torch.Tensor,
                        class_index: int, first: bool = False, channel_axis=None) -> list[torch.Tensor]:
    """Eq 5 for one batch: per layer, the ``[B, channels]`` sensitivities.

    Both models must already be in eval mode. One forward and one
    ``autograd.grad`` through ``model_from``, one ``no_grad`` forward through
    ``model_to``. A token-shaped layer's (``[B, T, C]``) products are summed over its tokens;
    ``channel_axis`` as for :func:`conceptevo.find_stimuli`.
    """
    axes = channel_axes(layers, channel_axis)
    modules = dict(model_to.named_modules())
    taps: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), replace_outputs(model_from, {n: _tap(taps, n) for n in layers}) as calls:
        logits = run_model(model_from, x, first)
        calls.require_once()
        if not 0 <= class_index < logits.shape[1]:
            raise ConceptEvoError(
                f"class index {class_index} is out of range for a model with {logits.shape[1]} outputs; pick 0..{logits.shape[1] - 1}"
            )
        target = logits[:, class_index].sum()
        if not target.requires_grad:
            raise ConceptEvoError("the class logit does not depend on the selected layers; choose layers the output depends on")
        grads = torch.autograd.grad(target, [taps[n] for n in layers], allow_unused=True)
    grad_of = dict(zip(layers, grads))

    def reduce(name: str, z_to: torch.Tensor):
        """Inside model_to's hook: sum over positions of G * (Z_t' - Z_t), so no map of model_to is kept."""
        z_from = taps[name].detach()
        if tuple(z_to.shape) != tuple(z_from.shape):
            return tuple(z_to.shape)  # reported by check_shapes below
        g = grad_of[name]
        axis = channel_axis_of(modules[name], z_to.dim(), axes[name])
        if g is None:  # the layer does not reach the logit: zero gradient, zero sensitivity
            return torch.zeros((z_to.shape[0], num_channels(z_to, axis)), dtype=z_to.dtype, device=z_to.device)
        return sum_positions(g * (z_to - z_from), axis)

    with torch.no_grad(), capture(model_to, layers, reduce) as sums:
        run_model(model_to, x, first)
        sums.require_all()
    bad = [n for n in layers if isinstance(sums[n], tuple)]
    if bad:
        check_shapes(taps, {n: (sums[n] if n in bad else taps[n]) for n in layers}, layers)
    parts = [sums[n] for n in layers]
    return parts


def evolution_importance(model_from: nn.Module, model_to: nn.Module, dataset, class_index: int, layers=None,
                         num_images: int | None = 128, seed: int = 0, batch_size: int = 64, device="cpu",
                         images=None, progress: bool = True, channel_axis=None) -> EvolutionImportance:
    """Importance of every neuron's evolution from ``model_from`` (epoch t) to ``model_to`` (t') for a class.

    Parameters
    ----------
    model_from, model_to:
        Two checkpoints of one architecture, already on ``device``. They are
        run in eval mode; their train/eval flags are restored afterwards.
    dataset:
        A conceptevo dataset (items ``(image, label, index)``) or any torch
        Dataset of ``(image, label)``.
    class_index:
        The class c whose logit is studied.
    layers:
        As :func:`conceptevo.layers.resolve_layers`: None means every Conv2d.
    num_images, seed:
        A seeded sample (``numpy.random.default_rng(seed)``) of ``num_images``
        images of the class; None uses every image of the class.
    images:
        Explicit dataset positions to use instead of sampling.
    channel_axis:
        Where layers' channels sit when :mod:`conceptevo.layers`' rule guesses wrong (as for
        :func:`conceptevo.find_stimuli`); a token-shaped unit's change is summed over its tokens.

    Returns an :class:`EvolutionImportance` whose ``neuron_ids`` are the
    ``"layer:channel"`` ids stimuli use. On CUDA, TF32 is turned off for the
    duration: the activation change is a difference of close numbers.

    Under ``torchrun`` (see :mod:`conceptevo.distributed`) every rank samples
    the same images (the sample is seeded; ranks compare it and both models'
    hashes first), takes every ``world``-th of them, and the rows are
    gathered back in order: every rank returns what one process would, up to
    float rounding in the sensitivities (a batch's composition can change a
    convolution's summation order).
    """
    check_positive("batch_size", batch_size, integer=True)
    names, dev = check_pair(model_from, model_to, layers, device)
    dataset = indexed(dataset)
    labels = labels_of(dataset)
    class_pos = check_class(dataset, class_index, labels)
    if images is not None:
        positions = explicit_positions(dataset, images)
        off = int(np.sum(labels[positions] != class_index))
        if off:
            log.warning("%d of the %d images given are not of class %s", off, positions.size, class_label(dataset, class_index))
    else:
        positions = sample_positions(class_pos, num_images, np.random.default_rng(seed))
    class_index = int(class_index)
    dtype = model_dtype(model_from)
    log.info("importance of %d layers' evolutions for class %s on %d images", len(names), class_label(dataset, class_index),
             positions.size)
    split = ddp.splits(positions.size)
    if ddp.active():
        fp = dataset.fingerprint() if hasattr(dataset, "fingerprint") else type(dataset).__name__
        ddp.check_same("dataset or image sample", f"{len(dataset)}|{fp}|{class_index}|{names}|".encode()
                       + labels.astype(np.int64).tobytes() + b"|" + positions.astype(np.int64).tobytes())
        ddp.check_same("model", ddp.model_hash(model_from) + "|" + ddp.model_hash(model_to))
    mine = ddp.shard(positions) if split else positions

    chunks, idx_chunks, channels = [], [], []
    bar = tqdm(total=int(mine.size), desc=f"importance c{class_index}", unit="img",
               disable=not progress or not ddp.is_main(), leave=False)
    try:
        with eval_mode(model_from, model_to), full_precision():
            for b, (x, _, idx) in enumerate(iter_batches(dataset, batch_size, positions=mine)):
                x = x.to(device=dev, dtype=dtype if x.is_floating_point() else None, non_blocking=True)  # ids stay integers
                parts = batch_sensitivities(model_from, model_to, names, x, class_index, first=(b == 0),
                                            channel_axis=channel_axis)
                if b == 0:
                    channels = [int(p.shape[1]) for p in parts]
                chunks.append(torch.cat(parts, dim=1).float().cpu())
                idx_chunks.append(idx.cpu())
                bar.update(len(idx))
    finally:
        bar.close()
    sens, image_indices = torch.cat(chunks), torch.cat(idx_chunks).to(torch.int64)
    if split:  # every rank's rows, back in the order of positions: the same result as one process, on every rank
        sens, image_indices = ddp.gather_shards(sens, positions.size), ddp.gather_shards(image_indices, positions.size)
    sens = sens.numpy()
    if not np.isfinite(sens).all():
        raise ConceptEvoError("sensitivities contain NaN or Inf; check both checkpoints' weights and the input scaling")
    ids = [neuron_id(name, c) for name, k in zip(names, channels) for c in range(k)]
    scores = (sens > 0).mean(axis=0).astype(np.float32)
    return EvolutionImportance(ids, scores, sens.astype(np.float32), image_indices.numpy(), class_index,
                               list(names), channels, positions)

