"""A small vision transformer written with plain ops, for the token-shaped unit tests.

A convolution cuts the image into patch tokens, a class token is prepended, two pre-norm blocks of
single-head attention and an MLP (``Linear -> GELU -> Linear``) follow, and the class token's final
state gives the logits. Its units of interest are ``blocks.N.mlp.act`` (GELU, ``[B, T, C]``: one value
per token, channels last) and ``blocks.N.mlp.fc1`` (a ``Linear`` on tokens). The file is also the
"own module" a study config names as ``arch = "tokennet:TinyViT"`` (tests/test_tokens.py).
"""
import math

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.proj(att @ v)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, size: int = 16, patch: int = 4, dim: int = 8,
                 hidden: int = 12, depth: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = 1 + (size // patch) ** 2
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList([Block(dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # [B, patches, dim]
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for block in self.blocks:
            t = block(t)
        return self.head(self.norm(t)[:, 0])


class TinyCNN(nn.Module):
    """A small CNN whose activations are also named ``*.act`` (``conv1.act``: ``[B, C, H, W]``, channels first),
    so one ``[stimuli] layers = ["*.act"]`` picks units of both models in a mixed study."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 6):
        super().__init__()
        self.conv1 = nn.Sequential()
        self.conv1.add_module("conv", nn.Conv2d(in_channels, width, 3, padding=1))
        self.conv1.add_module("act", nn.ReLU())
        self.conv2 = nn.Sequential()
        self.conv2.add_module("conv", nn.Conv2d(width, 2 * width, 3, stride=2, padding=1))
        self.conv2.add_module("act", nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)).mean(dim=(2, 3)))
