"""Datasets for conceptevo: the (image, label, index) protocol and the built-in sources.

Sources: IDX files (Fashion-MNIST and other MNIST-format data), folders of
images with one sub-folder per class, and the synthetic :class:`ConceptShapes`
whose concepts are known by construction. :func:`open_dataset` opens any of
them by kind name.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DatasetError, suggest
from .base import ImageDataset, Subset, class_indices, class_order, display_image, indexed, sample_pool
from .folder import ImageFolderDataset
from .idx import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    IDXDataset,
    find_fashion_mnist,
    find_idx_pair,
    read_idx,
    write_idx,
)
from .synthetic import ConceptShapes
from .transforms import Preprocess, as_preprocess, load_transform

__all__ = [
    "ImageDataset", "Subset", "indexed", "sample_pool", "class_indices",
    "IDXDataset", "FashionMNIST", "find_fashion_mnist", "find_idx_pair", "read_idx", "write_idx",
    "FASHION_MNIST_CLASSES", "ImageFolderDataset", "ConceptShapes",
    "open_dataset", "describe", "DATASET_KINDS", "PREPROCESS_OPTIONS",
    "Preprocess", "load_transform", "display_image", "class_order",
]

#: Kind name -> the options :func:`open_dataset` accepts for it.
DATASET_KINDS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (),
    "idx": ("images", "labels", "name"),
    "folder": ("size", "channels", "skip_corrupt"),
    "synthetic": ("n", "size", "seed", "cache"),
    "text": ("corpus", "tokenizer", "context", "stride"),
}
#: Options every kind accepts: preprocessing (see :mod:`conceptevo.data.transforms`) and the class order.
PREPROCESS_OPTIONS = ("resize", "crop", "mean", "std", "transform", "classes", "class_to_idx")


def open_dataset(kind: str, path: str | os.PathLike | None = None, split: str = "train", **options) -> ImageDataset:
    """Open a dataset by kind.

    - ``"fashion-mnist"``: :class:`FashionMNIST`; ``path`` is the directory of
      its IDX files (default: the Debian package's location).
    - ``"idx"``: ``path`` is a directory holding ``train-``/``t10k-`` IDX files
      named as in Fashion-MNIST; or give ``images=`` and ``labels=`` files.
      Option ``name``.
    - ``"folder"``: :class:`ImageFolderDataset` over ``path``; when ``path``
      has a sub-folder named after ``split`` (``path/train/<class>/...``) that
      one is used, otherwise ``path`` itself, for split "train" only.
      Options ``size``, ``channels``, ``skip_corrupt``.
    - ``"synthetic"``: :class:`ConceptShapes` (no ``path``); options ``n``,
      ``size``, ``seed``, ``cache``.
    - ``"text"``: :class:`~conceptevo.data.text.TextWindows` of the text files
      or folder at ``path``, or of ``corpus="shakespeare"`` / ``"generated"``;
      options ``tokenizer`` (``"char"`` default, ``"bpe"``, a saved tokenizer
      JSON or a Hugging Face folder), ``context`` (default 64) and ``stride``
      (default: context). No test split and no image preprocessing.

    Every kind also takes the preprocessing ``resize``, ``crop``, ``mean``,
    ``std`` and ``transform`` (a callable on the image tensor, or a
    ``"module:name"`` string; see :mod:`conceptevo.data.transforms`), and the
    model's class order: ``classes`` (names by model output index) or
    ``class_to_idx`` (name -> index). For ``idx`` data, whose labels are
    already numbers, these name the labels.
    """
    key = str(kind).strip().lower().replace("_", "-")
    if key not in DATASET_KINDS:
        raise DatasetError(
            f"unknown dataset kind {kind!r}; use one of {', '.join(map(repr, DATASET_KINDS))}."
            + suggest(key, DATASET_KINDS)
        )
    unknown = sorted(set(options) - set(DATASET_KINDS[key]) - set(PREPROCESS_OPTIONS))
    if unknown:
        allowed = ", ".join(DATASET_KINDS[key] + PREPROCESS_OPTIONS)
        raise DatasetError(
            f"dataset kind {key!r} takes no option {', '.join(map(repr, unknown))}; its options: {allowed}"
            + suggest(unknown[0], DATASET_KINDS[key] + PREPROCESS_OPTIONS)
        )
    if key == "text":
        return _open_text(path, split, options)
    prep = {k: options.pop(k, None) for k in ("resize", "crop", "mean", "std", "transform")}
    order = {k: options.pop(k, None) for k in ("classes", "class_to_idx")}
    return _open(key, path, split, options, as_preprocess(**prep), order)


def _open_text(path, split: str, options: dict):
    """Windows of text (kind "text"): one stream, no test split (use ``holdout``); no image preprocessing."""
    from .text import corpus_windows

    if split != "train":
        raise DatasetError(f"text data has no {split!r} split: the windows of one token stream are the training data; "
                           "set [data] holdout = 0.1 to hold out windows instead")
    image_only = sorted(k for k in options if k in PREPROCESS_OPTIONS and options[k] is not None)
    if image_only:
        raise DatasetError(f"text data takes no image option {', '.join(map(repr, image_only))}; drop it")
    corpus = options.get("corpus")
    if (corpus is None) == (path is None):
        raise DatasetError("text data needs exactly one of a path (text files or a folder) and corpus= "
                           "('shakespeare' or 'generated')")
    return corpus_windows(corpus if corpus is not None else path, options.get("tokenizer") or "char",
                          int(options.get("context") or 64), options.get("stride"))


def _open(key: str, path, split: str, options: dict, preprocess, order: dict) -> ImageDataset:
    if key == "fashion-mnist":
        return FashionMNIST(path, split=split).reorder_classes(**order).set_preprocess(preprocess)

    if key == "idx":
        images, labels = options.pop("images", None), options.pop("labels", None)
        if (images is None) != (labels is None):
            raise DatasetError("give both images= and labels= IDX files, or neither and a directory as path")
        if images is None:
            if path is None:
                raise DatasetError(
                    "dataset kind 'idx' needs a path: a directory holding train-/t10k- IDX files, "
                    "or images= and labels= files"
                )
            images, labels = find_idx_pair(path, split)
            options.setdefault("name", f"{Path(path).name or 'idx'}-{split}")
        if any(v is not None for v in order.values()):  # the labels are numbers already: the order names them
            options["classes"] = class_order([], **order)
        return IDXDataset(images, labels, **options).set_preprocess(preprocess)

    if key == "folder":
        if path is None:
            raise DatasetError("dataset kind 'folder' needs a path: a folder with one sub-folder per class")
        root = Path(path)
        if (root / split).is_dir():
            root = root / split
        elif split != "train":
            raise DatasetError(
                f"image folder {root} has no {split!r} sub-folder; lay the data out as "
                f"{root / 'train'}/<class>/... and {root / split}/<class>/..."
            )
        return ImageFolderDataset(root, transform=preprocess, **order, **options)

    # synthetic
    if path is not None:
        raise DatasetError("dataset kind 'synthetic' is generated and takes no path; drop the path")
    return ConceptShapes(split=split, **options).reorder_classes(**order).set_preprocess(preprocess)


def describe(dataset) -> str:
    """A one-line summary: name, size, image shape and classes."""
    name = getattr(dataset, "name", type(dataset).__name__)
    try:
        n = len(dataset)
    except TypeError:
        n = None
    shape = getattr(dataset, "image_shape", None)
    if shape is None and n:
        first = dataset[0][0]
        shape = tuple(getattr(first, "shape", ()))
    classes = list(getattr(dataset, "classes", []) or [])
    parts = [f"{name}: {n if n is not None else '?'} images"]
    if shape:
        parts[0] += " of " + "x".join(str(int(s)) for s in shape)
    if classes:
        shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
        parts.append(f"{len(classes)} classes ({shown})")
    return ", ".join(parts)
