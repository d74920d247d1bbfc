"""Built-in architectures for small (28-32 px) images, and torchvision's by name.

* ``vgg_like``: a VGG-style stack of 3x3 convolutions in four stages, with
  dropout in the classifier (``dropout=0`` turns it off, as in the paper's
  overfitting experiment) and BatchNorm after every convolution
  (``batchnorm=False`` leaves it out, as in the original VGG16).
* ``resnet_like``: a small pre-activation-free ResNet with residual blocks and
  projection shortcuts (branching, not sequential).
* ``tv:NAME``: any torchvision classification model, randomly initialised
  (nothing is downloaded); needs the ``vision`` extra.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ConceptEvoError, suggest


class VGGLike(nn.Module):
    """VGG-style CNN: conv3x3-BN-ReLU blocks (conv3x3-ReLU without BatchNorm), max-pooling between stages."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, dropout: float = 0.5,
                 batchnorm: bool = True):
        super().__init__()
        cfg = [width, width, "M", 2 * width, 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width]
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v) if batchnorm else nn.Identity(),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(c, 4 * width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetLike(nn.Module):
    """A small ResNet: a stem then three stages of two residual blocks."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks = []
        c = width
        for i, w in enumerate([width, 2 * width, 4 * width]):
            blocks.append(BasicBlock(c, w, stride=1 if i == 0 else 2))
            blocks.append(BasicBlock(w, w))
            c = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def vgg_like(in_channels=1, num_classes=10, width=16, dropout=0.5, batchnorm=True, **_):
    return VGGLike(in_channels, num_classes, width=width, dropout=dropout, batchnorm=batchnorm)


def vgg_like_nodropout(in_channels=1, num_classes=10, width=16, batchnorm=True, **_):
    return VGGLike(in_channels, num_classes, width=width, dropout=0.0, batchnorm=batchnorm)


def resnet_like(in_channels=1, num_classes=10, width=16, **_):
    return ResNetLike(in_channels, num_classes, width=width)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "vgg_like": vgg_like,
    "vgg_like_nodropout": vgg_like_nodropout,
    "resnet_like": resnet_like,
}


def build_model(arch: str, in_channels: int = 1, num_classes: int = 10, seed: int | None = None, **options) -> nn.Module:
    """Build a model by name: a built-in architecture, ``tv:NAME`` (torchvision), or ``module:function``.

    With ``seed``, the initial weights are the same on every run (drawn from a
    generator seeded for this call; the global random state is left as it
    was). Without it they come from torch's global generator, which recent
    torch seeds differently in every process.
    """
    if seed is None:
        return _build(arch, in_channels, num_classes, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(arch, in_channels, num_classes, **options)


def _build(arch: str, in_channels: int, num_classes: int, **options) -> nn.Module:
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](in_channels=in_channels, num_classes=num_classes, **options)
    if arch.startswith("tv:") or arch.startswith("torchvision:"):
        return _torchvision_model(arch.split(":", 1)[1], in_channels, num_classes, **options)
    if ":" in arch:
        import importlib

        mod_name, _, fn_name = arch.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConceptEvoError(f"cannot import model factory {arch!r} ({e}); give 'package.module:function'") from None
        return fn(in_channels=in_channels, num_classes=num_classes, **options)
    raise ConceptEvoError(
        f"unknown architecture {arch!r}.{suggest(arch, ARCHITECTURES)} Built in: {', '.join(ARCHITECTURES)}; "
        "also 'tv:NAME' for torchvision models or 'package.module:function' for your own"
    )


def _torchvision_model(name: str, in_channels: int, num_classes: int, **options) -> nn.Module:
    try:
        import torchvision.models as tvm
    except Exception as e:  # ImportError or a broken torchvision build
        raise ConceptEvoError(
            f"torchvision model {name!r} needs torchvision ({e}); install the 'vision' extra "
            "(on this project's machines: pip install torch==2.14.1 torchvision==0.29.1)"
        ) from None
    names = tvm.list_models(module=tvm)
    if name not in names:
        raise ConceptEvoError(f"torchvision has no model {name!r}.{suggest(name, names)}")
    kwargs = dict(weights=None, num_classes=num_classes)
    if name.startswith("inception"):
        kwargs.update(aux_logits=False, init_weights=True)
    model = tvm.get_model(name, **kwargs, **options)
    if in_channels != 3:
        raise ConceptEvoError(f"torchvision model {name!r} expects 3-channel images; convert the dataset to RGB")
    return model
