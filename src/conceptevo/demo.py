"""The embedded default study: train three CNNs and a ViT on Fashion-MNIST and build their unified space.

Trains a VGG-like with dropout, the same without dropout, a ResNet-like (the
three with SGD) and a small vision transformer (``vit_tiny``, with AdamW, whose
units are its MLP hidden units, ``blocks.*.mlp.act``: one value per token), with
checkpoints through training (finer in the first epoch), then runs the
whole pipeline over every checkpoint and writes the space per checkpoint, side
by side. Falls back to the built-in generated dataset, with a notice, when
Fashion-MNIST is not installed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from .config import BaseConfig, DataConfig, EmbeddingConfig, LayoutConfig, ModelConfig, StimuliConfig, StudyConfig
from .data import find_fashion_mnist, open_dataset
from .errors import check_device
from .io import read_json, write_bytes, write_json
from .models import build_model
from .models.train import TrainConfig, default_optimizer, train
from .pipeline import run_study

log = logging.getLogger(__name__)

MODELS = [("vgg", "vgg_like"), ("vgg-nodropout", "vgg_like_nodropout"), ("resnet", "resnet_like"), ("vit", "vit_tiny")]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    epochs: float = 3
    train_images: int = 8000       # images per training epoch (a seeded subset of the 60,000)
    first_epoch_checkpoints: int = 6   # 1/32, 1/16, 1/8, 1/4, 1/2 and 1 epoch
    pool: int = 3000               # stimulus image pool
    width: int = 16
    layout: str = "umap"           # the quick run uses PCA: no UMAP compile time
    # the ViT's size (the CNNs' width does not apply): 4 blocks of width 32, MLP 64 -> 256 units
    vit: tuple = (("dim", 32), ("depth", 4), ("heads", 4), ("mlp", 64))
    # how the ViT trains, beside AdamW's defaults: batches of 32 (four times the steps for the same images and
    # about the same CPU time) at a higher peak rate; measured in docs/transformers.md, "Training the ViT"
    vit_train: tuple = (("batch_size", 32), ("lr", 0.005))

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(epochs=1, train_images=4000, first_epoch_checkpoints=2, pool=1000, width=8, layout="pca",
                   vit=(("dim", 32), ("depth", 2), ("heads", 2), ("mlp", 32)))

    def options(self, arch: str) -> dict:
        """The architecture options of one demo model."""
        return dict(self.vit) if arch == "vit_tiny" else {"width": self.width}

    def train_config(self, arch: str, seed: int = 0, device: str = "cpu", **changes) -> TrainConfig:
        """How the demo trains ``arch``: the CNNs with SGD and its defaults, the ViT with AdamW
        (``default_optimizer``) and ``vit_train``; ``changes`` override any field (the benchmarks try others)."""
        fields = dict(epochs=self.epochs, batch_size=128, seed=seed, train_images=self.train_images,
                      first_epoch_checkpoints=self.first_epoch_checkpoints, optimizer=default_optimizer(arch), device=device)
        if arch == "vit_tiny":
            fields.update(self.vit_train)
        return TrainConfig(**{**fields, **changes})


def demo_data(data_dir: str | None = None) -> DataConfig:
    root = data_dir or find_fashion_mnist()
    if root:
        return DataConfig(kind="fashion-mnist", path=str(root))
    log.warning(
        "Fashion-MNIST not found (install it with `apt-get install dataset-fashion-mnist`); "
        "the demo uses the built-in generated dataset of known concepts instead"
    )
    return DataConfig(kind="synthetic", options={"n": 12000})


def run_demo(out="demo-out", quick: bool = False, device: str = "cpu", data_dir: str | None = None, progress: bool = True,
             seed: int = 0, settings: DemoSettings | None = None):
    """Train, build the unified space, write the pictures; return the workspace.

    ``seed`` seeds every model's initialisation and training; ``settings`` replaces the full or quick sizes.
    """
    check_device(device)
    out = Path(out).resolve()
    if settings is None:
        settings = DemoSettings.quick() if quick else DemoSettings()
    data = demo_data(data_dir)
    data = dataclasses.replace(data, pool=settings.pool)
    train_set = open_dataset(data.kind, data.path, split="train", **data.options)
    test_set = open_dataset(data.kind, data.path, split="test", **data.options)
    in_ch = int(train_set[0][0].shape[0])
    models = []
    for name, arch in MODELS:
        run_dir = out / "runs" / name
        tc = settings.train_config(arch, seed=seed, device=device)
        options = settings.options(arch)
        wanted = {"config": dataclasses.asdict(tc), "arch": arch, "data": dataclasses.asdict(data), "options": options}
        marker = run_dir / "demo-run.json"
        if not (marker.exists() and read_json(marker) == json.loads(json.dumps(wanted))):
            model = build_model(arch, in_channels=in_ch, num_classes=len(train_set.classes), seed=tc.seed, **options)
            log.info("training %s (%s)", name, arch)
            train(model, train_set, test_set, run_dir, tc, progress=progress)

            write_json(marker, wanted)
        else:
            log.info("reusing the trained checkpoints in %s", run_dir)
        models.append(ModelConfig(name=name, arch=arch, checkpoints=str(run_dir), options=options))
    config = StudyConfig(
        out=str(out / "study"), data=data, models=models, base=BaseConfig(model="vgg", checkpoint="last"),
        stimuli=StimuliConfig(device=device), embedding=EmbeddingConfig(),  # the defaults (docs/fidelity.md)
        layout=LayoutConfig(method=settings.layout),
    ).validate()
    _write_config(out / "study.toml", config)
    return run_study(config, progress=progress)


def _write_config(path: Path, config: StudyConfig) -> None:
    """Save the demo's study config as TOML, so `conceptevo run` can repeat or extend it."""
    def val(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        return repr(v)

    lines = ["# conceptevo study config (written by `conceptevo demo`)", "[study]", f"out = {val(config.out)}", ""]
    d = config.to_dict()
    for section in ("data", "base", "stimuli", "embedding", "images", "layout"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in d[section].items() if v is not None]
        lines.append("")
    for m in d["models"]:
        lines.append("[[models]]")
        lines += [f"{k} = {val(v)}" for k, v in m.items()]
        lines.append("")
    write_bytes(path, "\n".join(lines).encode())
