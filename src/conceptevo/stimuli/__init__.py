"""Stimuli (Algorithm 2): each neuron's top-k images, found in one streaming pass.

A neuron's strength on an image is the maximum of its activation map; its
stimuli are the k images of largest strength, ties broken by the lower image
index. Per layer the pass keeps ``[C, k]`` tensors of values, image indices and
argmax positions, merged with each batch's ``[C, B]`` strengths; activation
maps are reduced inside the forward hook, so nothing proportional to
images x neurons x positions is ever held.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as ddp
from . import _fused, _insert
from ..data.loader import iter_batches
from ..containers import Stimuli
from ..errors import ConceptEvoError, ModelInputError, NonFiniteActivationError, check_positive
from ..hooks import capture, check_model_device, eval_mode
from ..layers import channel_axes, layer_info, resolve_layers
from ..units import LayerInfo, channels_first, neuron_ids_of, position_of, strength_and_position

log = logging.getLogger(__name__)


def _strength(out: torch.Tensor, info: LayerInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: the strength (:func:`conceptevo.units.strength_and_position`) and its flat position.

    ``[B, C]`` each, new tensors in every case. Conv maps and ``[B, T, C]`` tokens reduced by max on CUDA
    go through the fused Triton kernel when it is available (one read of each map at full bandwidth; tokens
    through :func:`conceptevo.stimuli._fused.as_maps`, a view).
    """
    if info.reduce == "max" and out.dim() > 2:
        maps = out if info.channel_axis == 1 else _fused.as_maps(out) if out.dim() == 3 else None
        fused = _fused.try_max_argmax(maps) if maps is not None else None
        if fused is not None:
            return fused
    return strength_and_position(out, info.channel_axis, info.reduce)


class _TopK:
    """Running top-k of one layer: values, indices, positions as ``[C, k]`` tensors on the device."""

    def __init__(self, channels: int, k: int, device):
        self.v = torch.full((channels, k), -torch.inf, device=device)
        self.i = torch.full((channels, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
        self.p = torch.full((channels, k), -1, dtype=torch.int64, device=device)
        self.k = k
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(channels, dtype=torch.float64, device=device)

    @classmethod
    def concat(cls, parts: Sequence["_TopK"]) -> "_TopK":
        """One state holding ``parts``' channels one after another."""
        out = cls.__new__(cls)
        out.k = parts[0].k
        for attr in ("v", "i", "p", "sum", "sumsq"):
            setattr(out, attr, torch.cat([getattr(t, attr) for t in parts]))
        return out

    def finite(self) -> torch.Tensor:
        """Per channel: no NaN or Inf strength seen. (Any such value makes the running sums NaN or Inf,
        while finite float32 strengths cannot overflow a float64 sum: no separate check per batch.)"""
        return torch.isfinite(self.sum) & torch.isfinite(self.sumsq)

    def _add_sums(self, vals: torch.Tensor) -> None:
        self.sum += vals.sum(0, dtype=torch.float64)
        self.sumsq += (vals * vals).sum(0, dtype=torch.float64)

    def update_from_output(self, out: torch.Tensor, info: LayerInfo, idx: torch.Tensor, ascending_after: bool) -> None:
        """Merge one batch's layer output. Argmax positions are computed only for the (image, channel)
        pairs that enter the top-k, not for the whole batch (the full max-with-index reduction costs
        about a third of a small CNN's forward on a CPU, and far more for ``[B, T, C]`` tokens)."""
        vals = info.strength(out)
        if self.v.device.type == "cpu" and _insert.usable(out):
            # CPU: one compiled insertion pass, which scans the map of each entering value for its position
            vals = vals.float()
            self._add_sums(vals)
            maps = channels_first(out, info.channel_axis).flatten(2) if out.dim() > 2 and info.reduce == "max" else None
            _insert.merge(vals, idx, self.v, self.i, self.p, maps=maps)
            return
        B = vals.shape[0]
        # new candidates carry -(2 + row) as a placeholder position, resolved after the merge
        placeholder = -(2 + torch.arange(B, device=vals.device)).unsqueeze(1).expand(B, vals.shape[1])
        self.update(vals, placeholder, idx, ascending_after)
        new = self.p <= -2  # [C, k]; resolved without a host synchronisation
        if out.dim() == 2:
            self.p = torch.where(new, torch.zeros_like(self.p), self.p)
            return
        C = new.shape[0]
        rows = torch.where(new, -self.p - 2, torch.zeros_like(self.p))
        chans = torch.arange(C, device=out.device).unsqueeze(1).expand_as(rows)
        maps = channels_first(out, info.channel_axis)[rows, chans].reshape(C, self.k, -1)  # only k maps per channel
        self.p = torch.where(new, position_of(maps, info.reduce), self.p)

    def update(self, vals: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, ascending_after: bool) -> None:
        vals = vals.float()
        self._add_sums(vals)
        if self.v.device.type == "cpu":
            # the compiled insertion pass (same entries, same order as the tensor merge below; no host
            # synchronisation to avoid on a CPU)
            _insert.merge(vals, idx, self.v, self.i, self.p, given=pos)
            return
        self.merge_tensors(vals, pos, idx, ascending_after)

    def merge_tensors(self, vals: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, ascending_after: bool) -> None:
        """The merge as tensor operations, for GPUs (no host synchronisation): ``[C, k + B]`` candidates, one
        stable sort. The same entries in the same order as the CPU's insertion pass."""
        C, B = vals.shape[1], vals.shape[0]
        self._merge(torch.cat([self.v, vals.t()], dim=1), torch.cat([self.i, idx.expand(C, B)], dim=1),
                    torch.cat([self.p, pos.t()], dim=1), ascending_after)

    def merge_ranks(self) -> None:
        """Combine every rank's top-k into the exact global top-k (same result on every rank)."""
        if not ddp.active():
            return
        self._merge(ddp.all_gather_cat(self.v, 1), ddp.all_gather_cat(self.i, 1), ddp.all_gather_cat(self.p, 1), False)
        self.sum = ddp.all_reduce_sum(self.sum)
        self.sumsq = ddp.all_reduce_sum(self.sumsq)

    def _merge(self, cv, ci, cp, ascending_after: bool) -> None:
        if not ascending_after:
            # put candidates in ascending index order so the stable sort below breaks ties by index
            order = torch.sort(ci, dim=1, stable=True).indices
            cv, ci, cp = cv.gather(1, order), ci.gather(1, order), cp.gather(1, order)
        # stable descending sort: among equal values the earlier (lower-index) candidate wins
        order = torch.sort(cv, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.v, self.i, self.p = cv.gather(1, order), ci.gather(1, order), cp.gather(1, order)


def find_stimuli(model: nn.Module, dataset, k: int = 10, layers=None, batch_size: int = 256, device="cpu",
                 progress: bool = True, num_images: int | None = None, desc: str = "stimuli",
                 amp: bool | str = False, channels_last: bool = False, merge: str = "auto",
                 channel_axis=None) -> Stimuli:
    """Top-k stimuli of every neuron of ``layers`` (default: the model's default units, as resolve_layers) over ``dataset``.

    ``dataset`` is any torch Dataset returning ``(image, label)`` (index =
    position) or ``(image, label, index)``. One pass, no gradients. The model
    must already be on ``device``. On a GPU, each batch is moved once, the
    top-k merge stays on the device, and nothing waits for the device until the
    pass ends. ``amp`` runs the forward under autocast (``True`` = bfloat16, or
    ``"float16"``); ``channels_last`` converts the model and batches to that
    memory format. Both change activations by rounding, so stimuli can differ
    from a float32 pass where strengths are nearly tied.

    ``merge`` chooses where the top-k merge happens; both give the same
    stimuli. ``"layer"``: inside each layer's hook, with argmax positions
    computed only for the maps that enter the top-k (fastest on a CPU, where
    a max-with-index reduction costs about a third of a small CNN's forward).
    On a CPU either mode merges by one compiled insertion pass per layer and
    batch (:mod:`conceptevo.stimuli._insert`); on a GPU by tensor operations.
    ``"batch"``: each hook only reduces its maps to ``[B, C]`` maxima and
    argmaxes (on CUDA with Triton, by a fused kernel that reads each map once
    at full bandwidth: :mod:`conceptevo.stimuli._fused`); one merge per batch
    covers every layer (fewest kernel launches: fastest on a GPU, most of all
    for models with many layers).
    ``"auto"``: "layer" on a CPU, "batch" elsewhere.

    ``channel_axis`` says where a layer's channels sit when the rule of :mod:`conceptevo.layers` guesses
    wrong: 1 or -1 for every layer, or ``{"name or glob": 1 or -1}``. A token-shaped layer (``[B, T, C]``,
    channels last) has one strength per image and unit, the max over tokens; its position is the token
    index. The axis used is recorded in each layer's :class:`~conceptevo.units.LayerInfo`.
    """
    check_positive("k", k, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    if merge not in ("auto", "layer", "batch"):
        raise ConceptEvoError(f"merge={merge!r} is not one of 'auto', 'layer', 'batch'")
    n = len(dataset)
    my_images = ddp.shard(np.arange(n))
    if ddp.active():
        fp = dataset.fingerprint() if hasattr(dataset, "fingerprint") else type(dataset).__name__
        ddp.check_same("dataset", f"{n}|{fp}")
        ddp.check_same("model", ddp.model_hash(model) + f"|{k}|{layers}")
    if n < ddp.world():
        raise ConceptEvoError(f"{n} images cannot be shared by {ddp.world()} ranks; use fewer ranks")
    if n < k:
        raise ConceptEvoError(f"k={k} is larger than the image pool ({n} images); lower k or use a larger pool")
    device = check_model_device(model, device)
    param = next(model.parameters(), None)
    # images take the model's floating dtype (a float64 or float16 model gets float64 or float16 images);
    # integer inputs (a language model's token ids) stay integer
    model_dtype = param.dtype if param is not None and param.is_floating_point() else None
    per_batch = merge == "batch" or (merge == "auto" and device.type != "cpu")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = None if not amp else (torch.float16 if amp in ("float16", "fp16", "half") else torch.bfloat16)
    names = resolve_layers(model, layers)
    axes = channel_axes(names, channel_axis)
    modules = dict(model.named_modules())
    states: dict[str, _TopK] = {}
    infos: dict[str, LayerInfo] = {}
    max_seen = -1
    bar = tqdm(total=len(my_images), desc=desc, unit="img", disable=not progress or not ddp.is_main(), leave=False)
    try:
        with eval_mode(model):
            current: dict = {}

            def merge_in_hook(name, out):
                # reduced (and, per layer, merged) as the layer runs: at most one batch of its activations is alive
                if name not in infos:
                    infos[name] = layer_info(modules[name], name, out, axes[name])
                info = infos[name]
                if per_batch:
                    return _strength(out, info)
                if name not in states:
                    states[name] = _TopK(info.channels, k, device)
                states[name].update_from_output(out, info, current["idx"], current["ascending"])
                return True

            with torch.inference_mode(), capture(model, names, merge_in_hook) as outs:
                for images, _, idx in iter_batches(dataset, batch_size, positions=my_images):
                    idx_host = idx
                    ascending = bool(idx_host[0] > max_seen) and bool((idx_host[1:] > idx_host[:-1]).all())
                    max_seen_before = max_seen
                    max_seen = max(max_seen, int(idx_host.max()))
                    outs.clear()
                    current["ascending"] = ascending
                    if device.type == "cuda":
                        # from pinned host memory a copy does not wait for the GPU to finish queued work
                        idx = idx.pin_memory()
                        if not images.is_cuda:
                            images = images.pin_memory()
                    in_dtype = model_dtype if images.is_floating_point() else None
                    images = images.to(device, dtype=in_dtype, non_blocking=True)
                    current["idx"] = idx.to(device, non_blocking=True)  # pinned (above) on a GPU: no host synchronisation
                    if channels_last and images.dim() == 4:
                        images = images.contiguous(memory_format=torch.channels_last)
                    try:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            model(images)
                    except RuntimeError as e:
                        if max_seen_before >= 0:  # not the first batch: a genuine failure, not a shape mismatch
                            raise
                        raise ModelInputError(images.shape[1:], type(model).__name__, e) from None
                    outs.require_all()
                    if per_batch:
                        vals = torch.cat([outs[nm][0] for nm in names], dim=1)
                        if "all" not in states:
                            states["all"] = _TopK(vals.shape[1], k, device)
                        states["all"].update(vals, torch.cat([outs[nm][1] for nm in names], dim=1), current["idx"], ascending)
                    bar.update(len(idx))
    finally:
        bar.close()
    top = states["all"] if per_batch else _TopK.concat([states[nm] for nm in names])
    top.merge_ranks()
    layer_list = [infos[name] for name in names]
    finite, start = top.finite().cpu().numpy(), 0
    for info in layer_list:
        if not finite[start:start + info.channels].all():
            raise NonFiniteActivationError(info.name)
        start += info.channels
    get = lambda attr: getattr(top, attr).cpu().numpy()  # noqa: E731
    mean = (get("sum") / n).astype(np.float32)
    var = np.maximum(get("sumsq") / n - (get("sum") / n) ** 2, 0.0)
    if num_images is None and max_seen >= 0:
        num_images = max_seen + 1  # every image passed, not only the stimuli (top_responses has a row for each)
    return Stimuli(neuron_ids_of(layer_list), get("i"), get("v"), get("p"), layers=layer_list,
                   num_images=num_images, mean=mean, std=np.sqrt(var).astype(np.float32))


def top_responses(model: nn.Module, dataset, stimuli: Stimuli, top: int = 10, batch_size: int = 256, device="cpu",
                  progress: bool = True, num_images: int | None = None) -> np.ndarray:
    """For every image of ``dataset``, its ``top`` most responsive neurons of ``stimuli``' layers.

    Strengths are standardised per neuron with the pool mean and std recorded by
    :func:`find_stimuli`, so layers of different scale compete fairly. Returns
    ``int64 [num_images, top]`` rows of neuron indices (rows of ``stimuli``; rows of images not in
    ``dataset`` are -1). Used to give every image a vector in the unified space.
    """
    if stimuli.mean is None:
        raise ConceptEvoError("these stimuli carry no strength statistics; recompute them with find_stimuli")
    names = [i.name for i in stimuli.layers]
    by_name = {i.name: i for i in stimuli.layers}
    device = check_model_device(model, device)
    mean = torch.as_tensor(np.asarray(stimuli.mean), device=device)
    std = torch.as_tensor(np.maximum(np.asarray(stimuli.std), 1e-6), device=device)
    total = num_images or stimuli.num_images or len(dataset)
    out = np.full((total, top), -1, dtype=np.int64)
    with eval_mode(model), torch.inference_mode(), capture(model, names, lambda name, o: by_name[name].strength(o)) as outs:
        for images, _, idx in tqdm(iter_batches(dataset, batch_size), total=-(-len(dataset) // batch_size),
                                   desc="responses", disable=not progress, leave=False):
            outs.clear()
            model(images.to(device))
            outs.require_all()
            z = (torch.cat([outs[nm].float() for nm in names], dim=1) - mean) / std
            out[idx.numpy()] = z.topk(top, dim=1).indices.cpu().numpy()
    return out


__all__ = ["Stimuli", "find_stimuli", "top_responses"]
