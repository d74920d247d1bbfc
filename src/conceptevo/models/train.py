"""Train a model and save checkpoints through training, finer early on.

Concepts form early (on Fashion-MNIST training accuracy passes 75% within the
first epoch), so by default the first epoch is checkpointed at geometric
fractions (1/32, 1/16, ..., 1/2, 1 of it), then every epoch. Each checkpoint records its top-1 and top-5
accuracy on fixed, seeded evaluation subsets of the training and test data.

Two optimisers, each with a cosine learning-rate schedule: ``sgd`` (momentum
0.9, lr 0.05, weight decay 5e-4 on every parameter), the CNNs' default, and
``adamw`` (lr 1e-3, weight decay 0.05 on weight matrices only, the first 5% of
the steps a linear warm-up), the default for the built-in ViT
(:func:`default_optimizer`; measured in docs/transformers.md). The settings
actually used are recorded in ``checkpoints.json`` with the rest of the config.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.loader import iter_batches
from ..errors import ConceptEvoError, check_device, check_positive, suggest
from ..hooks import eval_mode, train_mode
from .checkpoints import Checkpoint, epoch_tag, save_checkpoint, write_index

log = logging.getLogger(__name__)


#: each optimiser's defaults: learning rate, weight decay, warm-up (a fraction of all steps, linear from 0)
OPTIMIZER_DEFAULTS = {
    "sgd": {"lr": 0.05, "weight_decay": 5e-4, "warmup": 0.0},
    "adamw": {"lr": 1e-3, "weight_decay": 0.05, "warmup": 0.05},
}
#: architectures whose default optimiser is not SGD (measured: docs/transformers.md, "Training the ViT")
ARCH_OPTIMIZER = {"vit_tiny": "adamw"}


def default_optimizer(arch: str) -> str:
    """The optimiser ``conceptevo train`` and the demo use for ``arch`` unless told: AdamW for ``vit_tiny``, else SGD."""
    return ARCH_OPTIMIZER.get(arch, "sgd")


def check_optimizer(name) -> str:
    """``name`` if it is a known optimiser, else a ConceptEvoError that lists them."""
    if name not in OPTIMIZER_DEFAULTS:
        raise ConceptEvoError(f"optimizer must be one of {', '.join(OPTIMIZER_DEFAULTS)}, got {name!r}."
                              f"{suggest(name, OPTIMIZER_DEFAULTS)}")
    return name


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train` trains. ``lr``, ``weight_decay`` and ``warmup`` left as None take the optimiser's
    defaults (:data:`OPTIMIZER_DEFAULTS`), filled in when the config is made, so the recorded config says
    what was used."""

    epochs: float = 3
    lr: float | None = None            # None: the optimiser's default (sgd 0.05, adamw 1e-3)
    batch_size: int = 128
    momentum: float = 0.9              # SGD's momentum (AdamW: betas 0.9, 0.999)
    weight_decay: float | None = None  # None: the optimiser's default (sgd 5e-4 on all, adamw 0.05 on weight matrices)
    optimizer: str = "sgd"             # sgd or adamw (conceptevo train: default_optimizer(arch))
    warmup: float | None = None        # fraction of the steps with a linear warm-up; None: sgd 0, adamw 0.05
    seed: int = 0
    first_epoch_checkpoints: int = 6   # checkpoints within epoch 1, geometric: 1/2^(n-1), ..., 1/4, 1/2, 1
    every_steps: int | None = None     # or: a checkpoint every N optimiser steps
    train_images: int | None = None    # images per epoch (a seeded subset), None = all
    eval_images: int = 2000            # images used to measure each checkpoint's accuracy
    bn_images: int = 1024              # training images that re-estimate BatchNorm statistics at a checkpoint
    save_initial: bool = False         # also save the untrained model as e0
    device: str = "cpu"

    def __post_init__(self):
        defaults = OPTIMIZER_DEFAULTS[check_optimizer(self.optimizer)]
        for key in ("lr", "weight_decay", "warmup"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, defaults[key])

    def validate(self) -> None:
        check_positive("epochs", self.epochs)
        check_positive("lr", self.lr)
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConceptEvoError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            raise ConceptEvoError(f"warmup (the fraction of the steps that warm the learning rate up) must be in [0, 1), "
                                  f"got {self.warmup!r}")
        check_positive("batch_size", self.batch_size, integer=True)
        check_positive("first_epoch_checkpoints", self.first_epoch_checkpoints, integer=True)
        if self.every_steps is not None:
            check_positive("every_steps", self.every_steps, integer=True)
        check_positive("eval_images", self.eval_images, integer=True)


@torch.no_grad()
def accuracy(model: nn.Module, dataset, positions=None, batch_size: int = 512, device="cpu") -> dict:
    """Top-1 and top-5 accuracy (fractions) of ``model`` on ``dataset`` (or some positions of it)."""
    hit1 = hit5 = n = 0
    with eval_mode(model):
        for images, labels, _ in iter_batches(dataset, batch_size, positions=positions):
            logits = model(images.to(device))
            labels = labels.to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit1 += int((top[:, 0] == labels).sum())
            hit5 += int((top == labels[:, None]).any(dim=1).sum())
            n += len(labels)
    return {"top1": hit1 / max(n, 1), "top5": hit5 / max(n, 1)}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset, positions, batch_size: int = 256, device="cpu") -> None:
    """Recompute BatchNorm running statistics for the model's current weights.

    Early in training the running averages still carry the statistics of much
    older weights (and their initial values), so a checkpoint evaluated in eval
    mode would look far worse than it is. Before each checkpoint the running
    statistics are reset and re-estimated as a plain average over ``positions``
    (training images, train-mode forward, no gradients). Training itself uses
    batch statistics, so this does not change the optimisation.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    try:
        with train_mode(model):
            for images, _, _ in iter_batches(dataset, batch_size, positions=positions):
                model(images.to(device))
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom


def train(model: nn.Module, train_set, test_set, out_dir, config: TrainConfig = TrainConfig(), progress: bool = True,
          callbacks=()) -> list[Checkpoint]:
    """Train ``model`` with ``config.optimizer`` (SGD or AdamW) and a cosine schedule; save checkpoints into ``out_dir``.

    Returns the checkpoints, also indexed in ``out_dir/checkpoints.json``.
    ``callbacks`` get ``on_checkpoint(model, checkpoint)`` after each save.
    """
    config.validate()
    check_device(config.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model.to(device)
    rng = np.random.default_rng(config.seed)
    n_train = len(train_set)
    per_epoch = n_train if config.train_images is None else min(n_train, config.train_images)
    steps_per_epoch = math.ceil(per_epoch / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    save_at = _save_steps(config, steps_per_epoch, total_steps)
    eval_train = np.sort(rng.choice(n_train, size=min(config.eval_images, n_train), replace=False))
    eval_test = np.sort(rng.choice(len(test_set), size=min(config.eval_images, len(test_set)), replace=False))

    opt = make_optimizer(model, config)
    log.info("training %s with %s: lr %g, weight decay %g, warm-up %g of %d steps", type(model).__name__, config.optimizer,
             config.lr, config.weight_decay, config.warmup, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, total=total_steps,
                                                           warmup=round(config.warmup * total_steps)))
    loss_fn = nn.CrossEntropyLoss()
    checkpoints: list[Checkpoint] = []

    def checkpoint(step: int):
        epoch = step / steps_per_epoch
        tag = save_at.get(step) or epoch_tag(epoch)
        recalibrate_batchnorm(model, train_set, eval_train[: config.bn_images], batch_size=config.batch_size, device=device)
        tr = accuracy(model, train_set, eval_train, device=device)
        te = accuracy(model, test_set, eval_test, device=device)
        metrics = {"train_top1": tr["top1"], "train_top5": tr["top5"], "test_top1": te["top1"], "test_top5": te["top5"]}
        path = out / f"{tag}.pt"
        save_checkpoint(path, model, epoch=epoch, step=step, metrics=metrics)
        ck = Checkpoint(tag=tag, path=str(path), epoch=round(epoch, 6), step=step, metrics=metrics)
        checkpoints.append(ck)
        write_index(out, checkpoints, config=asdict(config), architecture=type(model).__name__)
        log.info("checkpoint %s: train top-1 %.3f, test top-1 %.3f", tag, metrics["train_top1"], metrics["test_top1"])
        for cb in callbacks:
            cb.on_checkpoint(model, ck)
        model.train()

    if config.save_initial:
        checkpoint(0)
    step = 0
    bar = tqdm(total=total_steps, desc=f"train {type(model).__name__}", disable=not progress, unit="step")
    model.train()
    epoch = 0
    while step < total_steps:
        positions = rng.choice(n_train, size=per_epoch, replace=False) if per_epoch < n_train else None
        for images, labels, _ in iter_batches(train_set, config.batch_size, shuffle=True, seed=config.seed + epoch, positions=positions):
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model(images), labels)
            if not torch.isfinite(loss):
                log.warning("training loss is %s at step %d (learning rate %.3g too high?)", float(loss), step, config.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step in save_at:
                checkpoint(step)
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    if not checkpoints:
        raise ConceptEvoError("training saved no checkpoint; increase epochs")
    return checkpoints


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups for AdamW: weight decay on weight matrices and kernels (2 or more dimensions), none on
    biases and normalisation scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``config`` names, with its settings (SGD: decay on every parameter, as the CNNs were trained)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(step: int, total: int, warmup: int = 0) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear from 1/warmup to 1 over the first ``warmup``
    steps, then a cosine from 1 down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))


def _save_steps(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> dict[int, str]:
    """Steps at which to save, each with its tag: 'e0.25' for the planned fraction of an epoch, 's123' for every_steps."""
    at: dict[int, str] = {}
    if config.every_steps:
        for s in range(config.every_steps, total_steps + 1, config.every_steps):
            at[s] = f"s{s}"
    else:
        # geometric within epoch 1 (1/32, 1/16, ..., 1/2, 1 for n = 6): concepts and accuracy change fastest early
        n = config.first_epoch_checkpoints
        for i in range(n - 1, -1, -1):
            at.setdefault(max(1, round(steps_per_epoch / 2**i)), epoch_tag(1 / 2**i))
        for s in range(steps_per_epoch, total_steps + 1, steps_per_epoch):
            at[s] = epoch_tag(s / steps_per_epoch)
    at = {s: t for s, t in at.items() if s <= total_steps}
    at.setdefault(total_steps, epoch_tag(total_steps / steps_per_epoch))
    return at
