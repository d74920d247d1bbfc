"""The study's inputs as its config names them: the image dataset, the stimulus pool, the models.

Everything that rereads a study's data or checkpoints opens them here: the
pipeline, the workspace (:meth:`~conceptevo.workspace.Workspace.images`,
:meth:`~conceptevo.workspace.Workspace.load_model`), the patches, the
importance and alignment commands. It depends on the config, data and models
modules only (never on the workspace), so anything may import it.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import DataConfig
from .data import Subset, open_dataset, sample_pool
from .errors import ConceptEvoError
from .models import build_model, load_checkpoint


def _data_config(data: DataConfig | dict) -> DataConfig:
    if isinstance(data, dict):
        data = data.get("data", data)
        data = DataConfig(**data)
    return data


def open_study_images(data: DataConfig | dict):
    """The training images a study config names, all of them: stimulus indices are positions in this dataset.

    With ``holdout`` it includes the held-out images too; use
    :func:`open_study_dataset` for the training or test split.
    """
    data = _data_config(data)
    return open_dataset(data.kind, data.path, split="train", **data.dataset_options())


def holdout_split(targets, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) positions: a seeded ``fraction`` of every class held out (at least one image of a class of two or more)."""
    targets = np.asarray(targets)
    rng = np.random.default_rng([seed, 1])  # its own stream: the pool's sample (seed) must not follow the split
    held = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        take = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
        held.append(rng.choice(idx, size=take, replace=False))
    held = np.sort(np.concatenate(held)).astype(np.int64)
    kept = np.setdiff1d(np.arange(len(targets)), held).astype(np.int64)
    return kept, held


def open_study_dataset(data: DataConfig | dict, split: str = "train"):
    """The dataset a study config names (``split`` 'train' or 'test').

    With ``holdout`` both splits are subsets of the training images (a seeded,
    class-stratified split); their items keep the image's index in
    :func:`open_study_images`. The test split is numbered with the training
    split's classes, so a class missing from one split cannot shift the others.
    """
    data = _data_config(data)
    if data.holdout is not None:
        if split not in ("train", "test"):
            raise ConceptEvoError(f"unknown split {split!r}; use 'train' or 'test'")
        full = open_study_images(data)
        kept, held = holdout_split(full.targets, data.holdout, data.seed)
        sub = Subset(full, kept if split == "train" else held)
        sub.name = f"{full.name} {split} ({'held-out ' if split == 'test' else ''}{len(sub)} of {len(full)})"
        return sub
    if split == "train":
        return open_study_images(data)
    options = data.dataset_options()
    if data.kind == "folder" and "classes" not in options and "class_to_idx" not in options:
        options["classes"] = open_study_images(data).classes
    return open_dataset(data.kind, data.path, split=split, **options)


def study_pool(data: DataConfig):
    """The stimulus image pool: a seeded, class-balanced subset of the training split (never of held-out images)."""
    ds = open_study_dataset(data, "train")
    # text windows: a uniform sample (balancing by the next token would over-sample rare characters)
    return sample_pool(ds, data.pool, seed=data.seed, per_class=data.kind != "text")


def model_defaults(dataset) -> dict:
    """``in_channels`` and ``num_classes`` for a model of ``dataset``'s inputs and classes (model options override them);
    for text windows, ``vocab_size`` (the tokenizer's) and ``context`` (the window length) instead."""
    if getattr(dataset, "token_windows", False) or getattr(getattr(dataset, "base", None), "token_windows", False):
        windows = dataset if getattr(dataset, "token_windows", False) else dataset.base
        return {"vocab_size": int(windows.tokenizer.vocab_size), "context": int(windows.context)}
    return {"in_channels": int(dataset[0][0].shape[0]),
            "num_classes": max(len(getattr(dataset, "classes", []) or []), int(np.max(dataset.targets)) + 1)}


def load_model(arch: str, options: dict, checkpoint_path, dataset, trust: bool = False, prefix: str | None = None,
               key: str | None = None, import_path=None) -> torch.nn.Module:
    """Build ``arch`` for ``dataset``'s image channels and classes, and load a checkpoint into it.

    ``prefix``, ``key``, ``import_path``: a model's ``loading`` settings (see
    :class:`~conceptevo.config.ModelConfig`; the workspace records them as ``models[NAME]["load"]``).
    """
    model = build_for_dataset(arch, options, dataset, import_path=import_path)
    load_checkpoint(checkpoint_path, model, trust=trust, prefix=prefix, key=key)
    return model.eval()


def build_for_dataset(arch: str, options: dict, dataset, import_path=None) -> torch.nn.Module:
    """``arch`` built for ``dataset``'s image channels and classes (unless ``options`` set them), untrained."""
    return build_model(arch, import_path=import_path, **{**model_defaults(dataset), **options})


__all__ = ["open_study_images", "open_study_dataset", "holdout_split", "study_pool", "model_defaults",
           "load_model", "build_for_dataset"]
