"""A small vision transformer for 28x28 images, written with plain modules so that every hook fires.

``vit_tiny`` (in the zoo): 4x4 patches of a 28x28 image give a 7x7 grid of
49 patch tokens, plus a class token at position 0 (50 tokens). Each of the
``depth`` pre-norm blocks has multi-head self-attention and an MLP; the
MLP's hidden units are a module of their own after the activation,
``blocks.{i}.mlp.act``, whose output is ``[B, T, C]`` (channel last, one
value per token). Those are the model's natural neurons: the default units
(:attr:`ViT.default_units`).

The attention is computed from its own ``qkv`` and ``proj`` linear layers
(not ``nn.MultiheadAttention`` or ``nn.TransformerEncoderLayer``, whose fused
eval-mode fast path skips submodules and their hooks; see
:mod:`conceptevo.models.fastpath`).

Token ``t >= 1`` is the patch at row ``(t - 1) // 7``, column ``(t - 1) % 7``
(:meth:`ViT.token_patch`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConceptEvoError


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ConceptEvoError(f"vit: dim {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, C/heads]
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # its output [B, T, hidden]: the MLP's hidden units
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (a strided convolution), a class token, learned positions, pre-norm blocks, a linear head."""

    #: the layers whose units a study takes by default: the MLP hidden units of every block
    default_units = ("blocks.*.mlp.act",)
    #: layers whose output is [B, T, C] (channel last, tokens in between)
    channel_last = ("blocks.*", "norm")  # fnmatch: "*" spans dots, so every module inside the blocks

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, patch: int = 4, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp: int = 128):
        super().__init__()
        if image_size % patch:
            raise ConceptEvoError(f"vit: image_size {image_size} is not a multiple of the patch size {patch}")
        self.image_size, self.patch = image_size, patch
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        fan_in = in_channels * patch * patch
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))

    def forward(self, x):
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ConceptEvoError(f"vit: expects {self.image_size}x{self.image_size} images, got "
                                  f"{tuple(x.shape[-2:])}; build it with image_size={x.shape[-1]}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, grid*grid, dim], row-major patches
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def token_patch(self, token: int) -> tuple[int, int, int, int] | None:
        """The image box ``(top, left, bottom, right)`` (pixels, end exclusive) of patch token ``token``; None for the class token."""
        if token == 0:
            return None
        if not 1 <= token <= self.grid ** 2:
            raise ConceptEvoError(f"vit: token {token} out of range 0..{self.grid ** 2}")
        r, c = divmod(token - 1, self.grid)
        return r * self.patch, c * self.patch, (r + 1) * self.patch, (c + 1) * self.patch


def vit_tiny(in_channels=1, num_classes=10, image_size=28, patch=4, dim=64, depth=4, heads=4, mlp=128, **_):
    """ViT with 4x4 patches on 28x28 (49 patch tokens + a class token), 4 blocks of width 64, MLP 128, 4 heads.

    Other keyword arguments (the CNNs' ``width``, which ``conceptevo train``
    passes to every architecture) are ignored: the ViT's size is ``dim``,
    ``depth``, ``heads`` and ``mlp``.
    """
    return ViT(in_channels, num_classes, image_size=image_size, patch=patch, dim=dim, depth=depth, heads=heads, mlp=mlp)
