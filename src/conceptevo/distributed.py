"""Data-parallel passes on torch.distributed (gloo on CPU, nccl on GPU).

Launch any conceptevo pass under ``torchrun``; when a process group is
initialised (or ``init_from_env()`` is called), passes shard their image pool
across ranks (rank r takes positions r, r + world, ...), merge per-rank
results exactly, and only rank 0 writes. Before a pass, ranks compare a hash of
the dataset and the model and stop with a clear error if they disagree.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import re

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConceptEvoError

log = logging.getLogger(__name__)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu", timeout_s: float = 600) -> bool:
    """Initialise the process group from torchrun's environment variables; False when not launched so."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":  # before the group exists, so NCCL's communicator binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def shard(positions: np.ndarray) -> np.ndarray:
    """This rank's share of ``positions`` (interleaved, so each share keeps the order)."""
    return positions[rank():: world()]


def splits(n: int) -> bool:
    """Whether a pass over ``n`` positions is shared across ranks.

    Not when there are fewer positions than ranks: a rank with an empty share
    would have no batch to learn the layers' shapes from, so every rank then
    computes everything (the same result, with nothing to merge).
    """
    return active() and n >= world()


def gather_shards(t: torch.Tensor, n: int) -> torch.Tensor:
    """Undo :func:`shard` for per-position rows: every rank's rows, ``[n, ...]`` in the unsharded order.

    ``t`` holds this rank's rows (one per position of its share, in order).
    Shares differ in length by at most one; each is padded to the longest for
    the all_gather. Row j of rank r is position ``r + j * world``, so the
    gathered ``[world, longest]`` block read column by column is that order,
    with the padding at the end.
    """
    if not active():
        return t
    longest = -(-n // world())
    if t.shape[0] != len(range(rank(), n, world())):
        raise ConceptEvoError(f"rank {rank()} has {t.shape[0]} rows for a share of {len(range(rank(), n, world()))} positions")
    padded = torch.cat([t, t.new_zeros((longest - t.shape[0],) + tuple(t.shape[1:]))])
    parts = all_gather_cat(padded[None], dim=0)
    return parts.transpose(0, 1).reshape((-1,) + tuple(t.shape[1:]))[:n]


def _device_for_collectives(device) -> torch.device:
    """gloo takes CPU tensors; NCCL takes tensors on this rank's GPU (a CPU tensor goes there and back)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on every rank) along ``dim``."""
    if not active():
        return t
    dev = t.device
    src = t.to(_device_for_collectives(dev)).contiguous()
    parts = [torch.empty_like(src) for _ in range(world())]
    _guard(dist.all_gather, parts, src)
    return torch.cat(parts, dim=dim).to(dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not active():
        return t
    dev = t.device
    src = t.to(_device_for_collectives(dev)).clone()
    _guard(dist.all_reduce, src)
    return src.to(dev)


def broadcast_object(obj):
    if not active():
        return obj
    box = [obj]
    _guard(dist.broadcast_object_list, box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        _guard(dist.barrier)


def _guard(fn, *args, **kwargs):
    """Run a collective; its failure (gloo and NCCL raise RuntimeError) becomes a ConceptEvoError.

    gloo reports a peer that exited at once ("Connection closed by peer");
    one that is alive but never joins is reported after the process group's
    timeout.
    """
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:
        # gloo prefixes its messages with "[/path/to/source.cc:line] "; keep the part that says what happened
        why = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", (str(e).splitlines() or [""])[0])[:160]
        raise ConceptEvoError(
            f"rank {rank()}: a collective operation failed ({why}); another rank probably died or stopped responding. "
            "Nothing from this pass was written; fix the failing rank and rerun"
        ) from None


def model_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_same(what: str, value: str | bytes) -> None:
    """Stop with a clear error if ranks disagree on ``value`` (e.g. a dataset or model hash)."""
    if not active():
        return
    raw = value.encode() if isinstance(value, str) else bytes(value)
    digest = torch.tensor(list(hashlib.sha256(raw).digest()), dtype=torch.uint8)
    everyone = all_gather_cat(digest[None], dim=0)
    bad = [r for r in range(world()) if not torch.equal(everyone[r], everyone[0])]
    if bad:
        raise ConceptEvoError(
            f"ranks {bad} see a different {what} than rank 0; give every rank the same data, model and checkpoint"
        )
