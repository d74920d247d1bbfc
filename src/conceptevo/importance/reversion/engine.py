"""The reversion engine: model t' run with some channels' maps replaced by model t's, batched over bins."""
from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ... import distributed as ddp
from ...data.loader import iter_batches
from ...errors import ConceptEvoError, LayerNotFoundError
from ...layers import capture, channel_axes, channel_axis_of
from ...units import channel_masks, channels_first, num_channels
from ...hooks import replace_outputs
from .._common import check_shapes, model_dtype, run_model

log = logging.getLogger(__name__)


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
def revert(model_to: nn.Module, layer: str, channels, replacement_source, channel_axis: int | None = None):
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
        axis = channel_axis_of(modules[layer], out.dim(), channel_axis)  # a token unit's whole [T] map is replaced
        ch = _channel_index(channels, num_channels(out, axis), out.device)
        if ch.numel() == 0:
            return out
        new = out.clone()
        channels_first(new, axis)[:, ch] = channels_first(z, axis)[:, ch].to(device=out.device, dtype=out.dtype)
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


def _measured(logits: torch.Tensor, labels: torch.Tensor, k: int, log_loss: bool) -> torch.Tensor:
    """:func:`_correct`'s counts; with ``log_loss`` as float64 with a third column, the summed negative
    log-probability of the true class (``-log_softmax(logits)[label]``: the cross-entropy, summed over images)."""
    hits = _correct(logits, labels, k)
    if not log_loss:
        return hits
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, labels.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return torch.cat([hits.double(), nll.sum(-1, keepdim=True)], dim=-1)


def _forked(out: torch.Tensor, src: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[V*B, ...]``: copy v of the batch has the channels of ``masks[v]`` (:func:`channel_masks`) taken from ``src``."""
    masks = masks if masks.dim() == out.dim() else channel_masks(masks, out.dim())  # plain [V, C]: channels first
    stacked = torch.where(masks.unsqueeze(1), src.unsqueeze(0).to(out.dtype), out.unsqueeze(0))
    return stacked.reshape((-1,) + tuple(out.shape[1:]))


def _refork(out: torch.Tensor, src: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The layer output of a batch already copied V times (variant-major): copy v takes ``masks[v]``'s channels from ``src``."""
    nv, b = masks.shape[0], src.shape[0]
    if out.shape[0] != nv * b:
        raise RuntimeError(f"expected {nv * b} rows at the layer, got {out.shape[0]}")
    copies = out.reshape((nv, b) + tuple(out.shape[1:]))
    masks = masks if masks.dim() == out.dim() else channel_masks(masks, out.dim())
    return torch.where(masks.unsqueeze(1), src.unsqueeze(0).to(out.dtype), copies).reshape(out.shape)


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
    mask = mask if mask.dim() == out.dim() - 1 else channel_masks(mask[None], out.dim())[0]
    return torch.where(mask.unsqueeze(0), src.to(out.dtype), out)


def reversion_counts(model_from: nn.Module, model_to: nn.Module, dataset, positions, masks: dict[str, np.ndarray],
                     batch_size: int = 64, device="cpu", fork: bool = True, progress: bool = False,
                     desc: str = "reversion", check_models: bool = True,
                     channel_axis=None, log_loss: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-1/top-5 hits of ``model_to`` on ``positions`` of ``dataset``, clean and with each reversion.

    ``masks[layer]`` is a boolean ``[variants, channels]`` array: variant v
    reverts that layer's channels where the row is True. Both models must be
    in eval mode (``channel_axis``: as for :func:`conceptevo.find_stimuli`). Returns ``(clean [2], reverted [layers, variants, 2], images)``
    with layers in ``masks``' order. ``fork=False`` forces one forward per
    variant (for checking). With ``log_loss`` the last axis has a third entry, the
    summed negative log-probability of the true class (cross-entropy of the
    logits; for a model adapted by :func:`~conceptevo.importance.targets.next_token_outputs`, of the
    true next token), and the arrays are float64 (the hits stay whole numbers).

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
    width, kind = (3, torch.float64) if log_loss else (2, torch.int64)
    clean = torch.zeros(width, dtype=kind, device=dev)
    reverted = {n: torch.zeros(nvar[n], width, dtype=kind, device=dev) for n in layers}
    mode: dict[str, str] = {}
    total = 0
    batches = iter_batches(dataset, batch_size, positions=mine)
    with torch.no_grad():
        for b, (x, y, _) in enumerate(tqdm(batches, total=-(-len(mine) // batch_size), desc=desc,
                                           disable=not progress or not ddp.is_main(), leave=False)):
            x = x.to(device=dev, dtype=dtype if x.is_floating_point() else None, non_blocking=True)  # token ids stay integers
            y = y.to(dev)
            nb = x.shape[0]
            total += nb
            # model t's activations at every layer: once per batch
            with capture(model_from, layers, lambda n, o: o.detach().clone()) as acts_from:
                run_model(model_from, x, b == 0)
                acts_from.require_all()
            # model t''s clean output: once per batch
            with capture(model_to, layers, lambda n, o: tuple(o.shape)) as shapes_to:
                clean += _measured(run_model(model_to, x, b == 0), y, 5, log_loss)
                shapes_to.require_all()
            if b == 0:
                check_shapes(acts_from, shapes_to, layers)
                mods, axes = dict(model_to.named_modules()), channel_axes(layers, channel_axis)
                for n in layers:
                    axis = channel_axis_of(mods[n], acts_from[n].dim(), axes[n])
                    if mask_t[n].shape[1] != num_channels(acts_from[n], axis):
                        raise ConceptEvoError(
                            f"masks for layer {n!r} have {mask_t[n].shape[1]} channels, the layer has {num_channels(acts_from[n], axis)}"
                        )
                    mask_t[n] = channel_masks(mask_t[n], acts_from[n].dim(), axis)
            for n in layers:
                src, m = acts_from[n], mask_t[n]
                if b == 0:
                    mode[n] = _choose_mode(model_to, n, x, src, m) if fork else "direct"
                if mode[n] != "direct":
                    try:
                        reverted[n] += _fork_counts(model_to, n, x, y, src, m, mode[n], log_loss)
                    except RuntimeError as e:  # safety net: the check on the first batch passed but this batch cannot fork
                        log.debug("layer %s: fork failed on batch %d (%s); one forward per bin", n, b, str(e)[:120])
                        mode[n] = "direct"
                if mode[n] == "direct":
                    for v in range(nvar[n]):
                        with replace_outputs(model_to, {n: lambda out, s=src, mv=m[v]: _replaced(out, s, mv)}) as calls:
                            logits = run_model(model_to, x, False)
                        calls.require_once()
                        reverted[n][v] += _measured(logits, y, 5, log_loss)
            del acts_from
    shared = [f"{n} ({mode[n]})" for n in layers if mode.get(n, "direct") != "direct"]
    log.debug("reversion: %d of %d layers share a prefix across bins: %s", len(shared), len(layers), ", ".join(shared))
    rev = torch.stack([reverted[n] for n in layers])
    if split:  # integer counts: the sum over ranks is exactly one process's count
        clean, rev = ddp.all_reduce_sum(clean), ddp.all_reduce_sum(rev)
        total = int(ddp.all_reduce_sum(torch.tensor([total], dtype=torch.int64))[0])
    return clean.cpu().numpy(), rev.cpu().numpy(), total


def _fork_counts(model_to, layer, x, y, src, masks, mode: str = "fork", log_loss: bool = False) -> torch.Tensor:
    """``[variants, 2]`` hits with the batch forked into one copy per variant (``[variants, 3]`` with ``log_loss``).

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
    hits = torch.zeros(nv, 3, dtype=torch.float64, device=x.device) if log_loss else \
        torch.zeros(nv, 2, dtype=torch.int64, device=x.device)
    for xs, ys, ss in zip(x.split(step), y.split(step), src.split(step)):
        logits = _forked_logits(model_to, layer, xs, ss, masks, mode)
        if logits.shape[0] != nv * xs.shape[0]:
            raise RuntimeError(f"expected {nv * xs.shape[0]} outputs, got {logits.shape[0]}")
        hits += _measured(logits.view(nv, xs.shape[0], -1), ys, 5, log_loss)
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
    calls.require_once()
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
