"""Max and first argmax of every activation map in one read of the maps: a Triton kernel for GPUs.

Why: the stimuli pass reads each hooked layer's output once more than a bare
forward does, so its overhead is that read. PyTorch's max-with-index reduction
over H x W of a channels-last bfloat16 map ran at about 1.5 TB/s on an H200,
about a third of the card's bandwidth (bench/bench_gpu.py --profile: 18 of
139 ms of a VGG16 pass). This kernel reads tiles of ``[positions, channels]``
along whichever axis is contiguous, keeps a running max and its first position
per channel, and splits long maps across programs so that even a batch's few
large early-layer maps fill the GPU.

Token-shaped units (``[B, T, C]``: a transformer's channel-last activations, one value per token) go
through the same kernel: ``as_maps`` views them as ``[B, C, T, 1]`` maps whose positions are strided by C,
the layout the kernel already reads for channels-last convolution maps, without a copy.

Results equal ``out.flatten(2).max(dim=2)``: the same maxima, ties to the
lowest position, NaN when a map holds a NaN. Used by ``find_stimuli`` on CUDA
tensors when Triton is installed (it comes with PyTorch's CUDA builds); anything
else, or a kernel that fails to build, falls back to PyTorch. The kernel also
runs on CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests check
it on machines without a GPU.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

_TARGET_PROGRAMS = 2048  # enough programs to keep every SM of a large GPU streaming
_disabled = False


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def max_argmax_kernel(x_ptr, val_ptr, idx_ptr, C, HW, stride_b, stride_c, stride_p,
                          STEPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(0)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        split = tl.program_id(2)
        cmask = cs < C
        start = split * (STEPS * BLOCK_P)
        # per tile slot: the running max over this program's tiles and its first position; no cross-thread
        # work until the end (a reduction across the tile in every step made the kernel slower than PyTorch's)
        acc = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
        acc_p = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int32)
        nans = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int32)
        base = x_ptr + b.to(tl.int64) * stride_b + cs[None, :].to(tl.int64) * stride_c
        for step in range(STEPS):
            ps = start + step * BLOCK_P + tl.arange(0, BLOCK_P)
            m = (ps[:, None] < HW) & cmask[None, :]
            x = tl.load(base + ps[:, None].to(tl.int64) * stride_p, mask=m, other=float("-inf")).to(tl.float32)
            nans = nans | (x != x).to(tl.int32)
            better = x > acc  # strictly: a slot's later position with an equal value keeps the earlier one
            acc = tl.where(better, x, acc)
            acc_p = tl.where(better, ps[:, None] + tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int32), acc_p)
        best = tl.max(acc, axis=0)
        # the first position holding the max: the lowest among the slots that reached it
        best_p = tl.min(tl.where(acc == best[None, :], acc_p, HW), axis=0)
        best_p = tl.where(best_p == HW, 0, best_p)  # nothing above -inf: position 0, as PyTorch gives
        best = tl.where(tl.max(nans, axis=0) > 0, float("nan"), best)
        out = (b * tl.num_programs(2) + split) * C + cs
        tl.store(val_ptr + out, best, mask=cmask)
        tl.store(idx_ptr + out, best_p, mask=cmask)

    return max_argmax_kernel


def available(t: torch.Tensor) -> bool:
    """Whether :func:`max_argmax` can take ``t``: a 4-D floating CUDA tensor whose H x W positions share one stride."""
    if _disabled or t.dim() != 4 or not t.is_cuda or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return _has_triton() and _flat_positions(t)


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _flat_positions(t: torch.Tensor) -> bool:
    _, _, h, w = t.shape
    return h == 1 or w == 1 or t.stride(2) == w * t.stride(3)


def max_argmax(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [B, C] float32, flat positions [B, C] int64)`` of the max over each ``[H, W]`` map of ``out``."""
    B, C, H, W = out.shape
    HW = H * W
    stride_p = out.stride(3) if W > 1 else out.stride(2)
    if stride_p == 1 and out.stride(1) != 1:  # positions contiguous (NCHW): long tiles along the map
        block_p, block_c = 64, 16
    else:                                     # channels contiguous (channels-last): wide tiles across channels
        block_p, block_c = 16, 64
    block_c = min(block_c, max(8, 1 << (C - 1).bit_length()))
    cblocks = -(-C // block_c)
    splits = max(1, min(-(-HW // block_p), -(-_TARGET_PROGRAMS // (B * cblocks))))
    # each program covers STEPS tiles; a power of two, so few kernel variants get compiled
    steps = 1 << (-(-HW // (splits * block_p)) - 1).bit_length()
    splits = -(-HW // (steps * block_p))
    vals = torch.empty(B, splits, C, dtype=torch.float32, device=out.device)
    pos = torch.empty(B, splits, C, dtype=torch.int32, device=out.device)
    _kernel()[(B, cblocks, splits)](out, vals, pos, C, HW, out.stride(0), out.stride(1), stride_p,
                                    STEPS=steps, BLOCK_P=block_p, BLOCK_C=block_c)
    if splits == 1:
        return vals[:, 0], pos[:, 0].long()
    # splits hold consecutive position ranges: the first split holding the max has its first position
    v, which = vals.max(dim=1)
    return v, pos.gather(1, which.unsqueeze(1)).squeeze(1).long()


def as_maps(tokens: torch.Tensor) -> torch.Tensor:
    """A ``[B, T, C]`` (channel-last) tensor viewed as ``[B, C, T, 1]`` maps, without a copy.

    Position t of a map is token t, so the flat positions :func:`max_argmax` returns are token indices.
    """
    if tokens.dim() != 3:
        raise ValueError(f"expected a [batch, tokens, channels] tensor, got shape {tuple(tokens.shape)}")
    return tokens.transpose(1, 2).unsqueeze(-1)


def try_max_argmax(out: torch.Tensor):
    """:func:`max_argmax`, or None when it cannot take ``out`` or the kernel fails to build (then never tried again)."""
    global _disabled
    if not available(out):
        return None
    try:
        return max_argmax(out)
    except Exception as e:  # a Triton/driver mismatch must not stop the pass: PyTorch's reduction does the same job
        _disabled = True
        log.warning("the fused max/argmax kernel failed (%s); using PyTorch's reduction instead", str(e).splitlines()[0][:200])
        return None
