"""The reversion experiment: bins of the importance ranking, reverted and measured on both splits."""
from __future__ import annotations

import logging

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ... import distributed as ddp
from ...data.base import indexed
from ...errors import ConceptEvoError, check_positive
from ...hooks import eval_mode
from .._common import check_class, check_pair, class_label, labels_of, sample_positions
from ..scores import evolution_importance
from .engine import reversion_counts
from .tables import LOG_LOSS, METRICS, RANDOM, SPLITS, ReversionResult, bin_labels

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the experiment
def _bin_masks(scores: np.ndarray, bins: int, rng: np.random.Generator) -> np.ndarray:
    """``[bins + 1, C]``: percentile bins of the ranking (most important first), then a random bin.

    Neurons are ranked by score, descending; ties (scores are multiples of
    1/images) are broken at random with ``rng``. The random bin holds
    ``round(C / bins)`` neurons (at least one).
    """
    c = scores.shape[0]
    order = np.lexsort((rng.random(c), -scores))
    masks = np.zeros((bins + 1, c), dtype=bool)
    for i, part in enumerate(np.array_split(order, bins)):
        masks[i, part] = True
    masks[bins, rng.choice(c, size=max(1, int(round(c / bins))), replace=False)] = True
    return masks


def evaluate_reversion(model_from: nn.Module, model_to: nn.Module, train_dataset, test_dataset, class_index: int,
                       layers=None, num_images: int | None = 128, repeats: int = 5, seed: int = 0, bins: int = 4,
                       batch_size: int = 64, device="cpu", num_test_images: int | None = 128,
                       stage: tuple[str, str] | None = None, progress: bool = True,
                       channel_axis=None, log_loss: bool = False) -> "ReversionResult":
    """Accuracy change on class ``class_index`` when each importance bin's evolutions are reverted.

    Per repeat r (seeded with ``(seed, r)``): sample ``num_images`` training
    images of the class; compute every neuron's importance on them
    (:func:`~conceptevo.importance.evolution_importance`); per layer, cut the
    ranking into ``bins`` equal bins plus a random ``1/bins`` of the layer; for
    each layer and bin, run ``model_to`` with those channels' maps replaced by
    ``model_from``'s and record the top-1 / top-5 accuracy change against no
    reversion, on the same training images and on a seeded sample of
    ``num_test_images`` test images of the class (None: all of them).
    ``test_dataset`` may be None (test columns are then NaN). With ``log_loss``
    the result has a third metric, ``"logloss"``: the change of the mean negative
    log-probability of the true class (lower is better, so reverting an important
    bin should raise it).

    Cost per repeat: one importance pass, then per evaluation batch one
    forward of each model plus, per layer, one forward of ``model_to`` forked
    into ``bins + 1`` copies after the layer (see the module docstring);
    ``batch_size`` bounds memory, which the fork multiplies by ``bins + 1``
    past the layer.

    Under ``torchrun`` the importance pass and the counts are shared across
    ranks (every sample is seeded, so all ranks draw the same images and bins)
    and every rank returns the same result.
    """
    check_positive("repeats", repeats, integer=True)
    check_positive("bins", bins, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    if bins < 2:
        raise ConceptEvoError(f"bins must be at least 2, got {bins}")
    names, dev = check_pair(model_from, model_to, layers, device)
    train_dataset = indexed(train_dataset)
    train_labels = labels_of(train_dataset)
    train_pos_all = check_class(train_dataset, class_index, train_labels)
    # for the chance level: the model's outputs where the dataset says (next-token targets: the vocabulary), else its classes
    num_classes = (getattr(train_dataset, "num_outputs", None) or len(getattr(train_dataset, "classes", None) or [])
                   or int(train_labels.max()) + 1)
    test_pos_all = None
    if test_dataset is not None:
        test_dataset = indexed(test_dataset)
        test_pos_all = check_class(test_dataset, class_index, labels_of(test_dataset))
    class_index = int(class_index)
    labels = bin_labels(bins) + [RANDOM]
    nv = len(labels)
    metrics = METRICS + ((LOG_LOSS,) if log_loss else ())
    changes = np.full((1, repeats, len(SPLITS), len(metrics), len(names), nv), np.nan)
    clean = np.full((1, repeats, len(SPLITS), len(metrics)), np.nan)
    counts = np.zeros((1, repeats, len(SPLITS)), dtype=np.int64)
    for r in tqdm(range(repeats), desc=f"reversion c{class_index}", disable=not progress or not ddp.is_main(), leave=False):
        rng = np.random.default_rng([seed, r])
        train_pos = sample_positions(train_pos_all, num_images, rng)
        imp = evolution_importance(model_from, model_to, train_dataset, class_index, layers=names, images=train_pos,
                                   batch_size=batch_size, device=dev, progress=False, channel_axis=channel_axis)
        slices = imp.layer_slices()
        masks = {n: _bin_masks(imp.scores[slices[n]], bins, rng) for n in names}
        evals = [(0, train_dataset, train_pos)]
        if test_dataset is not None:
            evals.append((1, test_dataset, sample_positions(test_pos_all, num_test_images, rng)))
        with eval_mode(model_from, model_to):
            for s, ds, pos in evals:
                ok, rev, n = reversion_counts(model_from, model_to, ds, pos, masks, batch_size=batch_size, device=dev,
                                              desc=f"revert {SPLITS[s]}", check_models=False, channel_axis=channel_axis,
                                              log_loss=log_loss)
                clean[0, r, s] = ok / n
                changes[0, r, s] = np.moveaxis((rev - ok[None, None, :]) / n, -1, 0)
                counts[0, r, s] = n
        log.info("class %s repeat %d: train top-1 change per bin %s", class_label(train_dataset, class_index), r,
                 np.round(changes[0, r, 0, 0].mean(axis=0), 4).tolist())
    return ReversionResult([class_index], list(names), labels, changes, clean, counts,
                           stage=tuple(stage) if stage else None,
                           config=dict(num_images=num_images, num_test_images=num_test_images, repeats=repeats,
                                       seed=seed, bins=bins, num_classes=num_classes), metrics=metrics)
