"""Train a model and save checkpoints through training, finer early on.

Concepts form early (on Fashion-MNIST training accuracy passes 75% within the
first epoch), so by default the first epoch is checkpointed at geometric
fractions (1/32, 1/16, ..., 1/2, 1 of it), then every epoch. Each checkpoint records its top-1 and top-5
accuracy on fixed, seeded evaluation subsets of the training and test data.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.loader import iter_batches
from ..errors import ConceptEvoError, check_device, check_positive
from ..hooks import eval_mode, train_mode
from .checkpoints import Checkpoint, epoch_tag, save_checkpoint, write_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 3
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    first_epoch_checkpoints: int = 6   # checkpoints within epoch 1, geometric: 1/2^(n-1), ..., 1/4, 1/2, 1
    every_steps: int | None = None     # or: a checkpoint every N optimiser steps
    train_images: int | None = None    # images per epoch (a seeded subset), None = all
    eval_images: int = 2000            # images used to measure each checkpoint's accuracy
    bn_images: int = 1024              # training images that re-estimate BatchNorm statistics at a checkpoint
    save_initial: bool = False         # also save the untrained model as e0
    device: str = "cpu"

    def validate(self) -> None:
        check_positive("epochs", self.epochs)
        check_positive("lr", self.lr)
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
    """Train ``model`` with SGD + cosine schedule and save checkpoints into ``out_dir``.

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

    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
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
