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
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def shard(positions: np.ndarray) -> np.ndarray:
    """This rank's share of ``positions`` (interleaved, so each share keeps the order)."""
    return positions[rank():: world()]


def _device_for_collectives(device) -> torch.device:
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


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
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:
        raise ConceptEvoError(
            f"rank {rank()}: a collective operation failed ({str(e).splitlines()[0][:160]}); another rank probably died. "
            "Nothing from this pass was written; fix the failing rank and rerun"
        ) from None


def model_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_same(what: str, value: str) -> None:
    """Stop with a clear error if ranks disagree on ``value`` (e.g. a dataset or model hash)."""
    if not active():
        return
    digest = torch.tensor(list(hashlib.sha256(value.encode()).digest()), dtype=torch.uint8)
    everyone = all_gather_cat(digest[None], dim=0)
    bad = [r for r in range(world()) if not torch.equal(everyone[r], everyone[0])]
    if bad:
        raise ConceptEvoError(
            f"ranks {bad} see a different {what} than rank 0; give every rank the same data, model and checkpoint"
        )
