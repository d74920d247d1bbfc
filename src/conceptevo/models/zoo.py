"""Built-in architectures for small (28-32 px) images, and torchvision's by name.

* ``vgg_like``: a VGG-style stack of 3x3 convolutions in four stages, with
  dropout in the classifier (``dropout=0`` turns it off, as in the paper's
  overfitting experiment) and BatchNorm after every convolution
  (``batchnorm=False`` leaves it out, as in the original VGG16).
* ``resnet_like``: a small pre-activation-free ResNet with residual blocks and
  projection shortcuts (branching, not sequential).
* ``vit_tiny``: a small vision transformer (4x4 patches on 28x28, 4 blocks);
  its default units are the MLP hidden units ``blocks.*.mlp.act``, ``[B, T, C]``
  (see :mod:`conceptevo.models.vit` and :func:`default_units`).
* ``tv:NAME``: any torchvision classification model, randomly initialised
  (nothing is downloaded); needs the ``vision`` extra. ``tv:vit_b_16`` is a
  ViT (224x224, 3 channels); its default units are ``encoder.layers.*.mlp.1``.
* ``timm:NAME``: any timm model (``timm:vit_tiny_patch16_224``), randomly
  initialised, with the study's input channels; needs the ``timm`` extra.
* ``hf:FOLDER``: the model a saved folder's ``config.json`` describes (a
  Hugging Face ``transformers`` model, offline; or conceptevo's own with
  ``"conceptevo_arch"``), see :mod:`conceptevo.models.hf`.
* ``package.module:function`` (or ``:Class``): your own, see :func:`build_model`.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConceptEvoError, suggest
from .hf import build_from_config
from .vit import vit_tiny
from .lm import gpt_neox_tiny, lm_tiny

log = logging.getLogger(__name__)


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
    "vit_tiny": vit_tiny,
    # language models (conceptevo.models.lm): they take vocab_size=, not in_channels/num_classes
    "lm_tiny": lm_tiny,
    "gpt_neox_tiny": gpt_neox_tiny,
}


#: Transformer families whose natural units are the MLP hidden units (after the activation), by the model's class:
#: candidate globs in order (library versions rename modules), the first that names a module of the model is used.
KNOWN_UNITS: dict[str, tuple[str, ...]] = {
    # torchvision: EncoderBlock.mlp is an MLP (Sequential): 0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout
    "torchvision.models.vision_transformer.VisionTransformer": ("encoder.layers.*.mlp.1",),
    # timm: Mlp has fc1, act, drop1, norm, fc2, drop2
    "timm.models.vision_transformer.VisionTransformer": ("blocks.*.mlp.act",),
    # Hugging Face transformers (5.x names first, then 4.x)
    "ViTForImageClassification": ("vit.layers.*.mlp.activation_fn", "vit.encoder.layer.*.intermediate.intermediate_act_fn"),
    "ViTModel": ("layers.*.mlp.activation_fn", "encoder.layer.*.intermediate.intermediate_act_fn"),
    "GPTNeoXForCausalLM": ("gpt_neox.layers.*.mlp.act",),
    "GPTNeoXModel": ("layers.*.mlp.act",),
}


def default_units(model: nn.Module) -> tuple[str, ...] | None:
    """The layer names or globs a study takes from ``model`` when it names none, or None for the general default (every Conv2d).

    A model states its own with a ``default_units`` attribute (the built-in
    ViT: its MLP hidden units, ``blocks.*.mlp.act``). Known transformer
    families (:data:`KNOWN_UNITS`: torchvision's and timm's ViT, Hugging Face
    ViT and GPT-NeoX) default to their MLP hidden units too.
    """
    units = getattr(model, "default_units", None)
    if isinstance(units, str):
        units = (units,)
    if units:
        return tuple(units)
    import fnmatch

    names = [n for n, _ in model.named_modules() if n]
    for cls in type(model).__mro__:
        for key in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__):
            for glob in KNOWN_UNITS.get(key, ()):
                if fnmatch.filter(names, glob):
                    return (glob,)
    return None


def build_model(arch: str, in_channels: int = 1, num_classes: int = 10, seed: int | None = None,
                import_path=None, **options) -> nn.Module:
    """Build a model by name: a built-in architecture, ``tv:NAME`` (torchvision), or ``module:function``.

    ``module:function`` (or ``module:Class``) is imported, with the folders
    of ``import_path`` searched first (a study config passes its own folder),
    and called as ``function(in_channels=..., num_classes=..., **options)``,
    each of the three only where the function's signature takes it (any
    name under ``**kwargs``); an option it does not take, or an argument it
    needs and is not given, is an error naming it.

    With ``seed``, the initial weights are the same on every run (drawn from a
    generator seeded for this call; the global random state is left as it
    was). Without it they come from torch's global generator, which recent
    torch seeds differently in every process.
    """
    if seed is None:
        return _build(arch, in_channels, num_classes, import_path, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(arch, in_channels, num_classes, import_path, **options)


def _build(arch: str, in_channels: int, num_classes: int, import_path=None, **options) -> nn.Module:
    if not isinstance(arch, str) or not arch:
        raise ConceptEvoError(f"arch must be a name such as 'vgg_like', 'tv:resnet18' or 'package.module:function', got {arch!r}")
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](in_channels=in_channels, num_classes=num_classes, **options)
    if arch.startswith("hf:"):
        return build_from_config(arch[3:], in_channels=in_channels, num_classes=num_classes, import_path=import_path,
                                 build_builtin=build_model,
                                 **options)
    if arch.startswith("timm:"):
        return _timm_model(arch.split(":", 1)[1], in_channels, num_classes, **options)
    if arch.startswith("tv:") or arch.startswith("torchvision:"):
        return _torchvision_model(arch.split(":", 1)[1], in_channels, num_classes, **options)
    if ":" in arch:
        folders = [str(f) for f in ([import_path] if isinstance(import_path, (str, Path)) else import_path or [])]
        with _searched_first(folders):
            fn = _import_factory(arch, folders)
            return _call_factory(fn, arch, dict(in_channels=in_channels, num_classes=num_classes), options)
    raise ConceptEvoError(
        f"unknown architecture {arch!r}.{suggest(arch, ARCHITECTURES)} Built in: {', '.join(ARCHITECTURES)}; "
        "also 'tv:NAME' for torchvision models, 'timm:NAME' for timm models, 'hf:FOLDER' for a saved folder's config.json (Hugging Face) or "
        "'package.module:function' for your own"
    )


@contextmanager
def _searched_first(folders: list[str]):
    """Within the block, imports look in ``folders`` first (as Python looks in a script's own folder)."""
    added = [f for f in folders if f not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)


def _import_factory(arch: str, folders: list[str]):
    mod_name, _, attr = arch.partition(":")
    if not mod_name or not attr:
        raise ConceptEvoError(f"arch {arch!r}: give 'package.module:function' (or :Class), both parts")
    if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
        stem = Path(mod_name).with_suffix("").as_posix().replace("/", ".")
        raise ConceptEvoError(f"arch {arch!r}: give the module's import name, not a file, e.g. '{stem}:{attr}' "
                              "(the config file's folder is searched first)")
    where = f"{', '.join(folders)} (searched first) and the Python path" if folders else "the Python path"
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            home = folders[0] if folders else "the current folder or an installed package"
            raise ConceptEvoError(
                f"cannot import the model factory {arch!r}: no module {e.name!r} in {where}; put "
                f"{e.name.replace('.', '/')}.py in {home}, set import_path in [[models]], or install the package"
            ) from None
        raise ConceptEvoError(f"importing {mod_name!r} for the model factory {arch!r} failed: it imports {e.name!r}, "
                              f"which is not installed ({e})") from None
    except ImportError as e:
        raise ConceptEvoError(f"importing {mod_name!r} for the model factory {arch!r} failed: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            raise ConceptEvoError(f"module {mod_name!r} ({getattr(module, '__file__', '?')}) has no {attr!r}.{suggest(part, names)} "
                                  f"Callables there: {', '.join(names[:12]) or 'none'}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        raise ConceptEvoError(f"{arch!r} is a model instance, not a function or class; give the class, or a function "
                              "that builds and returns the model")
    if not callable(obj):
        raise ConceptEvoError(f"{arch!r} is a {type(obj).__name__}, not a function or class that builds the model")
    return obj


def _call_factory(fn, arch: str, given: dict, options: dict) -> nn.Module:
    """``fn(**given, **options)`` with only the ``given`` arguments (in_channels, num_classes) its signature takes."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins): pass everything
        params = None
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {**given, **options}
    else:
        named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = [k for k in options if k not in named]
        if unknown:
            raise ConceptEvoError(
                f"the model factory {arch!r} takes no option {', '.join(map(repr, unknown))}; its parameters are "
                f"{', '.join(params) or 'none'}: fix options in [[models]]"
            )
        kwargs = {**{k: v for k, v in given.items() if k in named}, **options}
        skipped = [k for k in given if k not in named]
        if skipped:
            log.debug("model factory %s takes no %s; not passed", arch, ", ".join(skipped))
        needed = [n for n, p in params.items() if p.default is p.empty and n not in kwargs
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if needed:
            raise ConceptEvoError(
                f"the model factory {arch!r} needs {', '.join(map(repr, needed))}, which conceptevo cannot supply; "
                f"give {'them' if len(needed) > 1 else 'it'} in options in [[models]] (options = {{{needed[0]} = ...}})"
            )
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConceptEvoError(f"the model factory {arch!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                              "it must build and return the model")
    return model


def _timm_model(name: str, in_channels: int, num_classes: int, **options) -> nn.Module:
    """A timm model by name, randomly initialised (``pretrained=False``: nothing is downloaded)."""
    try:
        import timm
    except Exception as e:  # ImportError or a broken install
        raise ConceptEvoError(f"timm model {name!r} needs the 'timm' package ({e}); install the 'timm' extra: "
                              "pip install 'conceptevo[timm]' (or pip install timm)") from None
    names = timm.list_models()
    if name not in names:
        raise ConceptEvoError(f"timm has no model {name!r}.{suggest(name, names)}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)


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
