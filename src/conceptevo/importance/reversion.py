"""Evaluate importance by reverting evolutions (METHOD section 8, paper Sec 4.4, Table 1, Fig 6).

For a class c and a stage t -> t': rank each layer's neurons by the importance
of their evolution, cut the ranking into bins (0-25th percentile = most
important), and run model t' with one bin's activation maps replaced by model
t's on the same input ("reverting" those evolutions). If importance is
meaningful, reverting a more important bin costs more accuracy; reverting a
random 25% of the layer should land between the 25-50 and 50-75 bins.

Replacement goes through forward hooks, so any architecture works.

What is computed once and reused, per batch of evaluation images:

* model t's activations at every evaluated layer: one ``no_grad`` forward,
  shared by all layers and bins;
* model t''s clean output (the "no reversion" accuracy): one forward;
* per layer, the prefix of model t' up to that layer runs once for all bins:
  the layer's hook *forks* the batch into one copy per bin (4 percentile bins
  + random), each with its own channels replaced, and the rest of the network
  runs on the stacked copies (on the CPU in chunks of about
  ``batch / (bins + 1)`` images, so the forked tensors stay about one batch
  in size). Forking is
  checked on the first batch against plain per-bin forwards; where it cannot
  work (a skip connection that joins the forked path with an un-forked tensor
  from before the layer, as inside a residual block) that layer falls back to
  one forward per bin, which recomputes its prefix.
"""
from __future__ import annotations

import csv
import json
import logging
from contextlib import contextmanager
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
from ..errors import ConceptEvoError, LayerNotFoundError, check_positive
from ..io import atomic_path, save_figure
from ..layers import capture
from ._common import (
    check_class,
    class_label,
    check_device,
    check_distinct,
    check_shapes,
    eval_mode,
    labels_of,
    matching_layers,
    model_dtype,
    replace_outputs,
    require_once,
    run_model,
    sample_positions,
)
from . import verdicts
from .scores import evolution_importance
from .verdicts import Verdict

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
METRICS = ("top1", "top5")
RANDOM = "random"


def bin_labels(bins: int) -> list[str]:
    """``["0-25", "25-50", "50-75", "75-100"]`` for 4 bins (percentiles of the importance ranking)."""
    edges = [round(100 * i / bins) for i in range(bins + 1)]
    return [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]


# ---------------------------------------------------------------- one reversion
def _channel_index(channels, num: int, device) -> torch.Tensor:
    ch = torch.as_tensor(np.asarray(channels), device=device)
    if ch.dtype == torch.bool:
        if ch.numel() != num:
            raise ConceptEvoError(f"a channel mask must have one entry per channel ({num}), got {ch.numel()}")
        return ch.nonzero().flatten()
    ch = ch.to(torch.int64).flatten()
    if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= num):
        raise ConceptEvoError(f"channels must be in 0..{num - 1}, got {ch.tolist()[:10]}")
    return ch


@contextmanager
def revert(model_to: nn.Module, layer: str, channels, replacement_source):
    """Within the ``with`` block, ``model_to``'s forward uses another model's maps for some channels.

    At ``layer`` the activation maps of ``channels`` (indices or a boolean
    mask) are replaced, and the rest of the network runs on the result.
    ``replacement_source`` is either

    * an ``nn.Module`` (model t): it is run on the same input as ``model_to``
      and its own output at ``layer`` supplies the replacement, or
    * a tensor: model t's activation at ``layer`` for the batch that
      ``model_to`` is about to process.

    Modes are left as they are: put both models in eval mode first. Hooks are
    removed on exit; a forward of ``model_to`` in which ``layer`` never ran is
    an error.
    """
    modules = dict(model_to.named_modules())
    if layer not in modules:
        raise LayerNotFoundError(f"layer {layer!r} is not a module of model_to")
    source: dict[str, torch.Tensor] = {}
    fired = {"n": 0, "before": 0}
    if isinstance(replacement_source, nn.Module):
        if replacement_source is model_to:
            raise ConceptEvoError("replacement_source is model_to itself; give model t (the earlier checkpoint)")
    elif isinstance(replacement_source, torch.Tensor):
        source["z"] = replacement_source.detach()
    else:
        raise ConceptEvoError(
            f"replacement_source must be model t (an nn.Module) or its activation tensor, got {type(replacement_source).__name__}"
        )

    def pre(_mod, args, kwargs):
        fired["before"] = fired["n"]
        if isinstance(replacement_source, nn.Module):
            with torch.no_grad(), capture(replacement_source, [layer], lambda n, o: o.detach().clone()) as acts:
                replacement_source(*args, **kwargs)
                acts.require_all()
            source["z"] = acts[layer]

    def post(_mod, _args, _out):
        if fired["n"] == fired["before"]:
            raise LayerNotFoundError(
                f"layer {layer!r} never ran in model_to's forward pass; choose a module that forward() actually calls"
            )

    def fn(out: torch.Tensor) -> torch.Tensor:
        fired["n"] += 1
        z = source["z"]
        if tuple(z.shape) != tuple(out.shape):
            raise ConceptEvoError(
                f"replacement for layer {layer!r} has shape {list(z.shape)} but model_to's output there is {list(out.shape)}; "
                "give model t's activation for the same batch"
            )
        ch = _channel_index(channels, out.shape[1], out.device)
        if ch.numel() == 0:
            return out
        new = out.clone()
        new[:, ch] = z[:, ch].to(device=out.device, dtype=out.dtype)
        return new

    handles = [model_to.register_forward_pre_hook(pre, with_kwargs=True), model_to.register_forward_hook(post)]
    try:
        with replace_outputs(model_to, {layer: fn}):
            yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- batched evaluation
def _correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., 2]`` counts of top-1 and top-k hits over the last-but-one (image) axis."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit1 = (top[..., 0] == labels).sum(-1)
    hitk = (top == labels.unsqueeze(-1)).any(-1).sum(-1)
    return torch.stack([hit1, hitk], dim=-1)


def _forked(out: torch.Tensor, src: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[V*B, ...]``: copy v of the batch has the channels of ``masks[v]`` taken from ``src``."""
    shape = (masks.shape[0], 1, masks.shape[1]) + (1,) * (out.dim() - 2)
    stacked = torch.where(masks.view(shape), src.unsqueeze(0).to(out.dtype), out.unsqueeze(0))
    return stacked.reshape((-1,) + tuple(out.shape[1:]))


def _refork(out: torch.Tensor, src: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The layer output of a batch already copied V times (variant-major): copy v takes ``masks[v]``'s channels from ``src``."""
    nv, b = masks.shape[0], src.shape[0]
    if out.shape[0] != nv * b:
        raise RuntimeError(f"expected {nv * b} rows at the layer, got {out.shape[0]}")
    shape = (nv, 1, masks.shape[1]) + (1,) * (out.dim() - 2)
    copies = out.reshape((nv, b) + tuple(out.shape[1:]))
    return torch.where(masks.view(shape), src.unsqueeze(0).to(out.dtype), copies).reshape(out.shape)


@contextmanager
def _copied_inputs(module: nn.Module, copies: int, batch: int):
    """Within the block, ``module``'s tensor inputs of ``batch`` rows enter as ``copies`` copies (variant-major)."""

    def rep(a):
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch:
            return a.repeat((copies,) + (1,) * (a.dim() - 1))
        return a

    handle = module.register_forward_pre_hook(lambda _m, args, kwargs: (tuple(map(rep, args)), {k: rep(v) for k, v in kwargs.items()}),
                                              with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _enclosing(layer: str) -> list[str]:
    """The modules that contain ``layer``, innermost first (not the model itself)."""
    parts = layer.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _replaced(out: torch.Tensor, src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not bool(mask.any()):
        return out
    shape = (1, mask.shape[0]) + (1,) * (out.dim() - 2)
    return torch.where(mask.view(shape), src.to(out.dtype), out)


def reversion_counts(model_from: nn.Module, model_to: nn.Module, dataset, positions, masks: dict[str, np.ndarray],
                     batch_size: int = 64, device="cpu", fork: bool = True, progress: bool = False,
                     desc: str = "reversion", check_models: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-1/top-5 hits of ``model_to`` on ``positions`` of ``dataset``, clean and with each reversion.

    ``masks[layer]`` is a boolean ``[variants, channels]`` array: variant v
    reverts that layer's channels where the row is True. Both models must be
    in eval mode. Returns ``(clean [2], reverted [layers, variants, 2], images)``
    with layers in ``masks``' order. ``fork=False`` forces one forward per
    variant (for checking).

    Under ``torchrun`` each rank counts every ``world``-th position and the
    counts are summed, so every rank returns one process's numbers. Ranks
    first compare the positions and masks and, with ``check_models``, both
    models' hashes (:func:`evaluate_reversion` has just compared the models
    and skips that).
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    split = ddp.splits(positions.size)
    if ddp.active():
        ddp.check_same("image sample or masks", b"".join(
            [f"{len(dataset)}|{list(masks)}|".encode(), positions.tobytes()]
            + [np.asarray(m, dtype=bool).tobytes() + str(np.shape(m)).encode() for m in masks.values()]))
        if check_models:
            ddp.check_same("model", ddp.model_hash(model_from) + "|" + ddp.model_hash(model_to))
    mine = ddp.shard(positions) if split else positions
    layers = list(masks)
    dev = torch.device(device)
    dtype = model_dtype(model_to)
    mask_t = {n: torch.as_tensor(np.asarray(m, dtype=bool), device=dev) for n, m in masks.items()}
    nvar = {n: int(m.shape[0]) for n, m in mask_t.items()}
    clean = torch.zeros(2, dtype=torch.int64, device=dev)
    reverted = {n: torch.zeros(nvar[n], 2, dtype=torch.int64, device=dev) for n in layers}
    mode: dict[str, str] = {}
    total = 0
    batches = iter_batches(dataset, batch_size, positions=mine)
    with torch.no_grad():
        for b, (x, y, _) in enumerate(tqdm(batches, total=-(-len(mine) // batch_size), desc=desc,
                                           disable=not progress or not ddp.is_main(), leave=False)):
            x = x.to(device=dev, dtype=dtype, non_blocking=True)
            y = y.to(dev)
            nb = x.shape[0]
            total += nb
            # model t's activations at every layer: once per batch
            with capture(model_from, layers, lambda n, o: o.detach().clone()) as acts_from:
                run_model(model_from, x, b == 0)
                acts_from.require_all()
            # model t''s clean output: once per batch
            with capture(model_to, layers, lambda n, o: tuple(o.shape)) as shapes_to:
                clean += _correct(run_model(model_to, x, b == 0), y, 5)
                shapes_to.require_all()
            if b == 0:
                check_shapes(acts_from, shapes_to, layers)
                for n in layers:
                    if mask_t[n].shape[1] != acts_from[n].shape[1]:
                        raise ConceptEvoError(
                            f"masks for layer {n!r} have {mask_t[n].shape[1]} channels, the layer has {acts_from[n].shape[1]}"
                        )
            for n in layers:
                src, m = acts_from[n], mask_t[n]
                if b == 0:
                    mode[n] = _choose_mode(model_to, n, x, src, m) if fork else "direct"
                if mode[n] != "direct":
                    try:
                        reverted[n] += _fork_counts(model_to, n, x, y, src, m, mode[n])
                    except RuntimeError as e:  # safety net: the check on the first batch passed but this batch cannot fork
                        log.debug("layer %s: fork failed on batch %d (%s); one forward per bin", n, b, str(e)[:120])
                        mode[n] = "direct"
                if mode[n] == "direct":
                    for v in range(nvar[n]):
                        with replace_outputs(model_to, {n: lambda out, s=src, mv=m[v]: _replaced(out, s, mv)}) as calls:
                            logits = run_model(model_to, x, False)
                        require_once(calls)
                        reverted[n][v] += _correct(logits, y, 5)
            del acts_from
    shared = [f"{n} ({mode[n]})" for n in layers if mode.get(n, "direct") != "direct"]
    log.debug("reversion: %d of %d layers share a prefix across bins: %s", len(shared), len(layers), ", ".join(shared))
    rev = torch.stack([reverted[n] for n in layers])
    if split:  # integer counts: the sum over ranks is exactly one process's count
        clean, rev = ddp.all_reduce_sum(clean), ddp.all_reduce_sum(rev)
        total = int(ddp.all_reduce_sum(torch.tensor([total], dtype=torch.int64))[0])
    return clean.cpu().numpy(), rev.cpu().numpy(), total


def _fork_counts(model_to, layer, x, y, src, masks, mode: str = "fork") -> torch.Tensor:
    """``[variants, 2]`` hits with the batch forked into one copy per variant.

    ``mode`` "fork": the batch is copied at ``layer``'s output, so everything
    before the layer runs once. "block:NAME": the batch is copied where it
    enters the enclosing module NAME (say a residual block, whose skip
    connection would otherwise meet a single copy), and the copies are
    reverted at ``layer``; everything before the block runs once.
    On the CPU the batch goes through in chunks of about ``B / variants``
    images, so the forked tensors stay about one batch in size
    (cache-friendlier; the prefix still runs once per image). On an
    accelerator the whole batch is forked at once (fewer, larger kernels).
    """
    nv = masks.shape[0]
    step = x.shape[0] if x.device.type != "cpu" else max(2, -(-x.shape[0] // nv))
    hits = torch.zeros(nv, 2, dtype=torch.int64, device=x.device)
    for xs, ys, ss in zip(x.split(step), y.split(step), src.split(step)):
        logits = _forked_logits(model_to, layer, xs, ss, masks, mode)
        if logits.shape[0] != nv * xs.shape[0]:
            raise RuntimeError(f"expected {nv * xs.shape[0]} outputs, got {logits.shape[0]}")
        hits += _correct(logits.view(nv, xs.shape[0], -1), ys, 5)
    return hits


def _forked_logits(model_to, layer, x, src, masks, mode: str):
    if mode == "fork":
        with replace_outputs(model_to, {layer: lambda out: _forked(out, src, masks)}) as calls:
            logits = run_model(model_to, x, False)
    else:
        block = dict(model_to.named_modules())[mode.partition(":")[2]]
        with _copied_inputs(block, masks.shape[0], x.shape[0]), \
                replace_outputs(model_to, {layer: lambda out: _refork(out, src, masks)}) as calls:
            logits = run_model(model_to, x, False)
    require_once(calls)
    return logits


def _choose_mode(model_to, layer, x, src, masks) -> str:
    """How to share work across the variants at ``layer``: "fork", "block:NAME" or "direct".

    Tried in that order, the first that reproduces plain per-variant forwards
    wins: fork at the layer (the most shared), then copy the batch where it
    enters each enclosing module, innermost first (a residual block's skip
    connection needs the copies before it splits), else one forward per
    variant. Checked on a few images of the batch (at least two, so a skip
    connection cannot pass by broadcasting a single image) against the first
    and last variants' plain forwards.
    """
    k = min(x.shape[0], 4)
    xs, ss, nv = x[:k], src[:k], masks.shape[0]
    refs = {}
    for v in sorted({0, nv - 1}):
        with replace_outputs(model_to, {layer: lambda out, mv=masks[v]: _replaced(out, ss, mv)}):
            refs[v] = run_model(model_to, xs, False)
    for mode in ["fork"] + [f"block:{name}" for name in _enclosing(layer)]:
        try:
            logits = _forked_logits(model_to, layer, xs, ss, masks, mode)
        except (RuntimeError, ConceptEvoError) as e:
            log.debug("layer %s: %s fails (%s)", layer, mode, str(e).splitlines()[0][:120])
            continue
        if logits.shape[0] != nv * k:
            continue
        logits = logits.view(nv, k, -1)
        if all(torch.allclose(logits[v], ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))
               for v, ref in refs.items()):
            return mode
        log.debug("layer %s: %s differs from per-variant forwards", layer, mode)
    return "direct"


# ---------------------------------------------------------------- the experiment
def _bin_masks(scores: np.ndarray, bins: int, rng: np.random.Generator) -> np.ndarray:
    """``[bins + 1, C]``: percentile bins of the ranking (most important first), then a random bin.

    Neurons are ranked by score, descending; ties (scores are multiples of
    1/images) are broken at random with ``rng``. The random bin holds
    ``round(C / bins)`` neurons (at least one).
    """
    c = scores.shape[0]
    order = np.lexsort((rng.random(c), -scores))
    masks = np.zeros((bins + 1, c), dtype=bool)
    for i, part in enumerate(np.array_split(order, bins)):
        masks[i, part] = True
    masks[bins, rng.choice(c, size=max(1, int(round(c / bins))), replace=False)] = True
    return masks


def evaluate_reversion(model_from: nn.Module, model_to: nn.Module, train_dataset, test_dataset, class_index: int,
                       layers=None, num_images: int | None = 128, repeats: int = 5, seed: int = 0, bins: int = 4,
                       batch_size: int = 64, device="cpu", num_test_images: int | None = 128,
                       stage: tuple[str, str] | None = None, progress: bool = True) -> "ReversionResult":
    """Accuracy change on class ``class_index`` when each importance bin's evolutions are reverted.

    Per repeat r (seeded with ``(seed, r)``): sample ``num_images`` training
    images of the class; compute every neuron's importance on them
    (:func:`~conceptevo.importance.evolution_importance`); per layer, cut the
    ranking into ``bins`` equal bins plus a random ``1/bins`` of the layer; for
    each layer and bin, run ``model_to`` with those channels' maps replaced by
    ``model_from``'s and record the top-1 / top-5 accuracy change against no
    reversion, on the same training images and on a seeded sample of
    ``num_test_images`` test images of the class (None: all of them).
    ``test_dataset`` may be None (test columns are then NaN).

    Cost per repeat: one importance pass, then per evaluation batch one
    forward of each model plus, per layer, one forward of ``model_to`` forked
    into ``bins + 1`` copies after the layer (see the module docstring);
    ``batch_size`` bounds memory, which the fork multiplies by ``bins + 1``
    past the layer.

    Under ``torchrun`` the importance pass and the counts are shared across
    ranks (every sample is seeded, so all ranks draw the same images and bins)
    and every rank returns the same result.
    """
    check_positive("repeats", repeats, integer=True)
    check_positive("bins", bins, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    if bins < 2:
        raise ConceptEvoError(f"bins must be at least 2, got {bins}")
    check_distinct(model_from, model_to)
    names = matching_layers(model_from, model_to, layers)
    dev = check_device(model_from, device, "model_from")
    check_device(model_to, device, "model_to")
    train_dataset = indexed(train_dataset)
    train_labels = labels_of(train_dataset)
    train_pos_all = check_class(train_dataset, class_index, train_labels)
    num_classes = len(getattr(train_dataset, "classes", None) or []) or int(train_labels.max()) + 1  # for chance level
    test_pos_all = None
    if test_dataset is not None:
        test_dataset = indexed(test_dataset)
        test_pos_all = check_class(test_dataset, class_index, labels_of(test_dataset))
    class_index = int(class_index)
    labels = bin_labels(bins) + [RANDOM]
    nv = len(labels)
    changes = np.full((1, repeats, len(SPLITS), len(METRICS), len(names), nv), np.nan)
    clean = np.full((1, repeats, len(SPLITS), len(METRICS)), np.nan)
    counts = np.zeros((1, repeats, len(SPLITS)), dtype=np.int64)
    for r in tqdm(range(repeats), desc=f"reversion c{class_index}", disable=not progress or not ddp.is_main(), leave=False):
        rng = np.random.default_rng([seed, r])
        train_pos = sample_positions(train_pos_all, num_images, rng)
        imp = evolution_importance(model_from, model_to, train_dataset, class_index, layers=names, images=train_pos,
                                   batch_size=batch_size, device=dev, progress=False)
        slices = imp.layer_slices()
        masks = {n: _bin_masks(imp.scores[slices[n]], bins, rng) for n in names}
        evals = [(0, train_dataset, train_pos)]
        if test_dataset is not None:
            evals.append((1, test_dataset, sample_positions(test_pos_all, num_test_images, rng)))
        with eval_mode(model_from, model_to):
            for s, ds, pos in evals:
                ok, rev, n = reversion_counts(model_from, model_to, ds, pos, masks, batch_size=batch_size, device=dev,
                                              desc=f"revert {SPLITS[s]}", check_models=False)
                clean[0, r, s] = ok / n
                changes[0, r, s] = np.moveaxis((rev - ok[None, None, :]) / n, -1, 0)
                counts[0, r, s] = n
        log.info("class %s repeat %d: train top-1 change per bin %s", class_label(train_dataset, class_index), r,
                 np.round(changes[0, r, 0, 0].mean(axis=0), 4).tolist())
    return ReversionResult([class_index], list(names), labels, changes, clean, counts,
                           stage=tuple(stage) if stage else None,
                           config=dict(num_images=num_images, num_test_images=num_test_images, repeats=repeats,
                                       seed=seed, bins=bins, num_classes=num_classes))


# ---------------------------------------------------------------- results
@dataclass
class ReversionResult:
    """Accuracy changes from reverting evolutions, for one or more classes of one stage.

    ``changes[k, r, s, m, l, v]``: class k, repeat r, split s (``SPLITS``:
    train, test), metric m (``METRICS``: top1, top5), layer l, variant v
    (``bins``: the percentile bins, then ``"random"``); reverted accuracy minus
    clean accuracy. ``clean[k, r, s, m]`` is the accuracy without reversion and
    ``num_images[k, r, s]`` the number of images it was measured on.
    """

    class_indices: list[int]
    layers: list[str]
    bins: list[str]
    changes: np.ndarray
    clean: np.ndarray
    num_images: np.ndarray
    stage: tuple[str, str] | None = None
    config: dict = field(default_factory=dict)

    splits = SPLITS
    metrics = METRICS

    @property
    def repeats(self) -> int:
        return int(self.changes.shape[1])

    def layer_mean(self) -> np.ndarray:
        """``[classes, repeats, splits, metrics, variants]``: changes averaged over layers."""
        return self.changes.mean(axis=4)

    def summary(self) -> dict[str, np.ndarray]:
        """Mean over layers, then over classes; then mean and std over repeats (``[splits, metrics, variants]``).

        Also ``clean`` (mean accuracy without reversion, ``[splits, metrics]``).
        The std is the sample std across repeats (0 with one repeat).
        """
        per_repeat = self.layer_mean().mean(axis=0)  # [R, S, M, V]
        std = per_repeat.std(axis=0, ddof=1) if self.repeats > 1 else np.zeros(per_repeat.shape[1:])
        return {"mean": per_repeat.mean(axis=0), "std": std, "clean": self.clean.mean(axis=(0, 1))}

    def stage_label(self) -> str:
        return f"{self.stage[0]} -> {self.stage[1]}" if self.stage else ""

    def to_table(self) -> list[dict]:
        """Rows shaped like the paper's Table 1: one per (split, metric), bins as columns.

        Keys: ``stage``, ``split``, ``metric``, ``classes``, ``repeats``,
        ``clean``, then each bin's mean change and ``"<bin> std"``.
        """
        return reversion_table([self])

    def to_markdown(self) -> str:
        return reversion_markdown([self])

    def write_csv(self, path) -> Path:
        return write_reversion_csv(path, [self])

    def write_markdown(self, path) -> Path:
        return write_reversion_markdown(path, [self])

    def plot_bars(self, path, split: str | None = None, metric: str | None = None) -> Path:
        plot_reversion_bars(path, [self], split=split, metric=metric)
        return Path(path)

    def chance(self, metric: str = "top1") -> float | None:
        """The metric's chance level (k / classes for top-k), or None when the number of classes was not recorded."""
        c = self.config.get("num_classes")
        return min(1.0, (1 if metric == "top1" else 5) / c) if c else None

    def check_claim(self, split: str = "train", metric: str = "top1", confidence: float = 0.95) -> dict[str, Verdict]:
        """Do "the more important the bin, the larger the drop" and "random between the middle bins" hold?

        Each answer is a :class:`~conceptevo.importance.verdicts.Verdict`:
        "yes", "no" or "cannot tell", computed from the per-run changes and
        their spread over repeats and classes (see
        :mod:`conceptevo.importance.verdicts`), with a reason holding the
        numbers. ``monotonic``: reverting a more important bin lowers
        accuracy more (and the most important bin lowers it).
        ``random_between``: the random bin's change lies between the two
        middle bins' (25-50 and 50-75 of 4). ``holds``: both.
        """
        s, m = SPLITS.index(split), METRICS.index(metric)
        runs = self.changes[:, :, s, m].mean(axis=2)  # [classes, repeats, variants]: mean over layers
        pre = verdicts.precheck(runs, self.clean[:, :, s, m], self.num_images[:, :, s], self.chance(metric))
        if pre is not None:
            return {"monotonic": pre, "random_between": pre, "holds": pre}
        labels = list(self.bins[:-1])
        mono = verdicts.monotonic(runs, labels, confidence)
        between = verdicts.random_between(runs, labels, confidence)
        return {"monotonic": mono, "random_between": between, "holds": verdicts.both(mono, between)}

    def verdict_lines(self, metric: str = "top1") -> list[str]:
        """One line per split and claim, as the CLI prints them and the Markdown table ends."""
        a, b = verdicts.middle_bins(len(self.bins) - 1)
        lines = []
        for split in SPLITS:
            v = self.check_claim(split=split, metric=metric)
            where = f"{self.stage_label() + ' ' if self.stage else ''}{split} {metric.replace('top', 'top-')}"
            lines.append(f"{where}: more important bin -> larger drop: {v['monotonic']}")
            lines.append(f"{where}: random between {self.bins[a]} and {self.bins[b]}: {v['random_between']}")
        return lines

    # -- persistence
    def save(self, path) -> Path:
        """Save to one ``.npz`` file (read back with :meth:`load`)."""
        path = Path(path)
        meta = dict(class_indices=[int(c) for c in self.class_indices], layers=list(self.layers), bins=list(self.bins),
                    stage=list(self.stage) if self.stage else None, config=self.config)
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, changes=self.changes, clean=self.clean, num_images=self.num_images,
                         meta=np.array(json.dumps(meta, default=str)))
        return path

    @classmethod
    def load(cls, path) -> "ReversionResult":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(meta["class_indices"], meta["layers"], meta["bins"], z["changes"], z["clean"], z["num_images"],
                       stage=tuple(meta["stage"]) if meta.get("stage") else None, config=meta.get("config", {}))


def combine_reversion(results: Sequence[ReversionResult]) -> ReversionResult:
    """Stack per-class results of one stage into one result (its summary averages over classes)."""
    results = list(results)
    if not results:
        raise ConceptEvoError("no reversion results to combine")
    first = results[0]
    for r in results[1:]:
        for attr in ("layers", "bins", "stage"):
            if getattr(r, attr) != getattr(first, attr):
                raise ConceptEvoError(f"cannot combine reversion results with different {attr}: {getattr(first, attr)} vs {getattr(r, attr)}")
        if r.repeats != first.repeats:
            raise ConceptEvoError(f"cannot combine results with {first.repeats} and {r.repeats} repeats; use the same --repeats")
    return ReversionResult(
        [c for r in results for c in r.class_indices], list(first.layers), list(first.bins),
        np.concatenate([r.changes for r in results]), np.concatenate([r.clean for r in results]),
        np.concatenate([r.num_images for r in results]), stage=first.stage, config=dict(first.config),
    )


# ---------------------------------------------------------------- tables and figures
def _results(results) -> list[ReversionResult]:
    return [results] if isinstance(results, ReversionResult) else list(results)


def _named(class_indices, class_names) -> str:
    """'Trouser; Dress' for the classes of a result (their indices when no names are known)."""
    names = list(class_names or [])
    return "; ".join(names[c] if 0 <= c < len(names) else str(c) for c in class_indices)


def reversion_table(results, class_names=None) -> list[dict]:
    """Table 1 rows for one or several results (e.g. one per stage); ``class_names`` adds a column naming the classes."""
    rows = []
    for res in _results(results):
        summ = res.summary()
        for s, split in enumerate(SPLITS):
            for m, metric in enumerate(METRICS):
                if np.isnan(summ["mean"][s, m]).all():
                    continue
                row = {"stage": res.stage_label(), "split": split, "metric": metric,
                       "classes": len(res.class_indices), "repeats": res.repeats,
                       "clean": float(summ["clean"][s, m])}
                if class_names is not None:
                    row["class names"] = _named(res.class_indices, class_names)
                for v, label in enumerate(res.bins):
                    row[label] = float(summ["mean"][s, m, v])
                for v, label in enumerate(res.bins):
                    row[f"{label} std"] = float(summ["std"][s, m, v])
                rows.append(row)
    return rows


def write_reversion_csv(path, results, class_names=None) -> Path:
    rows = reversion_table(results, class_names)
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["stage"])
            w.writeheader()
            for row in rows:
                w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return path


def reversion_markdown(results, class_names=None) -> str:
    """A Markdown table like the paper's Table 1: mean change ± std over repeats per bin."""
    results = _results(results)
    if not results:
        return ""
    bins = results[0].bins
    head = ["Stage", "Accuracy", "Clean"] + [("Random 25%" if b == RANDOM else b) for b in bins]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in reversion_table(results):
        cells = [row["stage"], f"{row['split']} {row['metric'].replace('top', 'top-')}", f"{row['clean']:.3f}"]
        cells += [f"{row[b]:+.3f} ± {row[b + ' std']:.3f}" for b in bins]
        lines.append("| " + " | ".join(cells) + " |")
    res = results[0]
    lines.append("")
    named = f" ({_named(res.class_indices, class_names)})" if class_names is not None else ""
    lines.append(f"Accuracy change (reverted minus clean), mean over layers and {len(res.class_indices)} class(es){named}, "
                 f"± std over {res.repeats} repeats. Bins are percentiles of the importance ranking (0-25 = most important).")
    lines.append("")
    lines.append("Verdicts (top-1; from the per-run changes and their spread over repeats and classes, 95% confidence):")
    lines.append("")
    lines += [f"- {line}" for r in results for line in r.verdict_lines()]
    return "\n".join(lines) + "\n"


def write_reversion_markdown(path, results, class_names=None) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".md") as tmp:
        tmp.write_text(reversion_markdown(results, class_names))
    return path


def plot_reversion_bars(path, results, split: str | None = None, metric: str | None = None):
    """Fig-6-style bars: mean accuracy change per bin with std error bars, random as a dashed line.

    Returns the matplotlib ``Figure`` (no pyplot); writes it to ``path`` unless that is None.

    One row of panels per result (stage); one panel per (split, metric), or
    only the ones named.
    """
    from ..io import new_figure

    results = _results(results)
    if not results:
        raise ConceptEvoError("no reversion results to plot")
    panels = [(s, m) for s in SPLITS for m in METRICS if (split in (None, s)) and (metric in (None, m))]
    if not panels:
        raise ConceptEvoError(f"nothing to plot for split={split!r}, metric={metric!r}; use {SPLITS} and {METRICS}")
    fig = new_figure(figsize=(3.2 * len(panels), 2.8 * len(results)), dpi=120)
    axes = fig.subplots(len(results), len(panels), squeeze=False)
    for i, res in enumerate(results):
        summ = res.summary()
        nb = len(res.bins) - 1
        for j, (s, m) in enumerate(panels):
            ax = axes[i][j]
            si, mi = SPLITS.index(s), METRICS.index(m)
            mean, std = summ["mean"][si, mi], summ["std"][si, mi]
            ax.bar(range(nb), mean[:nb], yerr=std[:nb], capsize=3, color="#4c72b0", zorder=2)
            ax.axhline(mean[nb], color="#c44e52", linestyle="--", linewidth=1.2, label="random 25%")
            if std[nb] > 0:
                ax.axhspan(mean[nb] - std[nb], mean[nb] + std[nb], color="#c44e52", alpha=0.12, linewidth=0, zorder=0)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(range(nb))
            ax.set_xticklabels(res.bins[:nb], fontsize=8)
            ax.set_xlabel("importance percentile", fontsize=8)
            ax.set_title(f"{res.stage_label() + '  ' if res.stage else ''}{s} {m.replace('top', 'top-')}", fontsize=9)
            ax.tick_params(labelsize=8)
            if j == 0:
                ax.set_ylabel("accuracy change", fontsize=8)
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
