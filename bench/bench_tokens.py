"""Stimuli pass over token-shaped units against a bare forward pass, on a small ViT-like model (CPU).

Target (issue 15): wall time <= 1.15x a bare eval forward over the same images at the same batch
size, as for CNNs (bench_stimuli.py). The units are every block's MLP hidden units
(``blocks.N.mlp.act``, GELU outputs ``[B, tokens, hidden]``, channels last), the layers a ViT study
looks at. The model is written here with plain ops (patch-embedding convolution, class token,
pre-norm blocks of multi-head attention and an MLP), untrained: the pass's cost does not depend on
the weights. Both sides are measured in this one run, interleaved, best of the repeats.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """ViT-like: 32x32 images, 4x4 patches (64 + 1 tokens), width 96, 3 heads, MLP 384, 4 blocks."""

    def __init__(self, num_classes: int = 10, size: int = 32, patch: int = 4, dim: int = 96, heads: int = 3,
                 depth: int = 4, hidden: int = 384):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (size // patch) ** 2, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for block in self.blocks:
            t = block(t)
        return self.head(self.norm(t)[:, 0])


def bare_pass(model, ds, batch_size):
    from conceptevo.data.loader import iter_batches

    with torch.inference_mode():
        for images, _, _ in iter_batches(ds, batch_size):
            model(images)


def main():
    from conceptevo import find_stimuli
    from conceptevo.data import open_dataset

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", choices=("small", "vit_tiny"), default="small",
                   help="small: the ViT-like model written here (32x32); vit_tiny: conceptevo's built-in ViT (28x28, "
                        "4 blocks of width 64, MLP 128)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default torch's); on a loaded machine 1 avoids thread-synchronisation stalls "
                        "that slow small ops (the top-k merges) far more than the forward")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model == "vit_tiny":
        from conceptevo.models import build_model

        ds = open_dataset("synthetic", split="train", n=a.images, size=28)
        model = build_model("vit_tiny", in_channels=int(ds[0][0].shape[0]), seed=0).eval()
    else:
        ds = open_dataset("synthetic", split="train", n=a.images, size=32)
        model = SmallViT().eval()
    layers = ["blocks.*.mlp.act"]
    find_stimuli(model, ds, k=10, layers=layers, batch_size=a.batch_size, progress=False, num_images=None)  # warm-up
    runs = {"bare": lambda: bare_pass(model, ds, a.batch_size)}
    for merge in ("layer", "batch"):
        runs[merge] = lambda m=merge: find_stimuli(model, ds, k=10, layers=layers, batch_size=a.batch_size,
                                                   progress=False, merge=m)
    best = {key: float("inf") for key in runs}
    for _ in range(a.repeats):
        for key, fn in runs.items():
            t = time.perf_counter(); fn(); best[key] = min(best[key], time.perf_counter() - t)
    stim = runs["layer"]()
    info = stim.layers[0]
    print(f"stimuli pass vs bare forward ({'SmallViT' if a.model == 'small' else 'vit_tiny'}, {len(stim)} token units in {len(stim.layers)} layers "
          f"of {list(info.position_shape)} tokens, channel_axis {info.channel_axis}; {a.images} images, "
          f"batch {a.batch_size}, {torch.get_num_threads()} threads, best of {a.repeats}, interleaved):")
    print(f"  bare forward {best['bare']:.2f} s   stimuli pass merging per layer (the CPU default) {best['layer']:.2f} s, "
          f"ratio {best['layer'] / best['bare']:.3f}  (target <= 1.15)")
    print(f"  stimuli pass merging per batch (the GPU default) {best['batch']:.2f} s, ratio {best['batch'] / best['bare']:.3f}")


if __name__ == "__main__":
    main()
