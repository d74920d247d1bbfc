"""Checks `conceptevo run` makes before its heavy passes, so a wrong setting stops the run instead of its figures.

- :func:`resolve_channels`: the images' channel count against the first layer
  of each model (read from its last checkpoint). A folder whose channel count
  was chosen automatically is read with the model's; otherwise an error names
  the ``channels`` option.
- :func:`sanity_check`: each model's top-1 accuracy at its last checkpoint on
  a small seeded, class-balanced sample of the pool. When it is not
  significantly above chance (one-sided binomial test against the share of
  the sample's most frequent class, the best a constant guess can do) the run
  stops with :class:`~conceptevo.errors.ChanceAccuracyError`, naming the
  usual causes and the override. The result is recorded in the workspace.
  For text (``kind = "text"``) it is next-token top-1 over every position of
  a sample of windows against the share of the sample's most frequent next
  token (the best constant guess: the unigram majority).
- :func:`check_test_split`: whether ``evaluate-importance`` will find a test
  split; a warning says what will not be possible when there is none.
- :func:`describe_classes`: the class mapping, for the log.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import sample_pool
from .data.loader import iter_batches
from .errors import ChanceAccuracyError, ConceptEvoError, DatasetError, NonFiniteActivationError
from .io import hash_json
from .models import build_model, list_checkpoints
from .models.checkpoints import _read_state, extract_state_dict
from .study import load_model, model_defaults, open_study_dataset, open_study_images

log = logging.getLogger(__name__)

#: Windows in the sanity check of a language model (every position counts: 200 windows of 64 tokens = 12800
#: next-token predictions; positions in one window are not independent, so the binomial p is optimistic).
TEXT_SANITY_WINDOWS = 200
#: Significance level of the chance test: a model passes when P(at least its hits | chance) is below this.
CHANCE_ALPHA = 0.01
#: Sample size of the sanity check: this many images per class, within [SANITY_MIN, SANITY_MAX] (and the pool).
#: 500 images tell a 10-class model at 15% top-1 from chance (10%) at p = 0.0003; a forward pass over them is
#: cheaper than one checkpoint's stimuli pass over the default pool of 5000.
SANITY_PER_CLASS, SANITY_MIN, SANITY_MAX = 50, 500, 2000


# ------------------------------------------------------------------ channels
def first_layer_channels(arch: str, options: dict, checkpoint, dataset, trust: bool = False, key: str | None = None,
                         import_path=None) -> tuple[int, str] | None:
    """(input channels, where that was read) of a model's first convolution, or None when unknown.

    ``in_channels`` in the model's options wins; otherwise the model is built
    (without weights) to find its first ``Conv2d`` and that layer's weight in
    the checkpoint gives the channel count (weight shape ``[out, in/groups, kh, kw]``).
    """
    if "in_channels" in options:
        return int(options["in_channels"]), "in_channels in its options"
    try:
        net = build_model(arch, import_path=import_path, **{**model_defaults(dataset), **options})
    except Exception as e:  # the model's own load reports build errors properly, later
        log.debug("cannot build %s to find its first layer (%s)", arch, e)
        return None
    first = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return None
    name, conv = first
    try:
        state = extract_state_dict(_read_state(Path(checkpoint), trust), checkpoint, key=key)
    except ConceptEvoError as e:
        log.debug("cannot read %s to find its first layer (%s)", checkpoint, e)
        return None
    key = f"{name}.weight"
    hits = [k for k, v in state.items() if (k == key or k.endswith("." + key)) and getattr(v, "ndim", 0) == 4]
    if hits:
        return int(state[hits[0]].shape[1]) * int(conv.groups), f"its first layer {name!r} in {checkpoint}"
    return int(conv.in_channels), f"its first layer {name!r}"


def resolve_channels(config, trust: bool = False):
    """``config`` with the image channel count the models' first layers take (see the module docstring)."""
    data = config.data
    folder_log = logging.getLogger("conceptevo.data.folder")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)  # its mixed-modes warning is said below, once the models are asked
    try:
        images = open_study_images(data)
    finally:
        folder_log.setLevel(level)
    have = int(images[0][0].shape[0])
    mixed = " (the folder mixes grayscale and colour images)" if getattr(images, "mixed_modes", False) else ""
    wanted: dict[int, str] = {}
    for m in config.models:
        cks = list_checkpoints(m.checkpoints)
        if not cks:
            continue
        got = first_layer_channels(m.arch, m.options, cks[-1].path, images, trust, key=m.key, import_path=m.import_path)
        if got is not None:
            wanted.setdefault(got[0], f"model {m.name!r} ({got[1]})")
    if not wanted or set(wanted) == {have}:
        if mixed and not wanted and "channels" not in data.options:
            log.warning("the images read as %d channel(s)%s and no model says what it takes; "
                        "set [data] options.channels to choose", have, mixed)
        return config
    if len(wanted) > 1:
        raise DatasetError("the models take images of different channel counts ("
                           + "; ".join(f"{c} by {w}" for c, w in wanted.items()) + "); study models of one input format")
    need, where = next(iter(wanted.items()))
    folder_auto = data.kind == "folder" and "channels" not in data.options
    if folder_auto and need in (1, 3):
        log.warning("the images read as %d channel(s)%s but %s takes %d: reading them as %s; "
                    "set [data] options.channels to choose", have, mixed, where, need, "grayscale" if need == 1 else "RGB")
        return dataclasses.replace(config, data=dataclasses.replace(data, options={**data.options, "channels": need}))
    fix = (f"set [data] options.channels = {need}" if data.kind == "folder" and need in (1, 3)
           else f"give images with {need} channel(s), or a model built for {have}")
    raise DatasetError(f"the images have {have} channel(s) but {where} takes {need}; {fix}")


# ------------------------------------------------------------------ accuracy against chance
def chance_p_value(correct: int, n: int, chance: float) -> float:
    """One-sided binomial test: P(at least ``correct`` hits in ``n`` | hit rate ``chance``)."""
    from scipy.stats import binom

    return float(binom.sf(int(correct) - 1, int(n), float(chance)))


def sample_size(num_classes: int, pool_size: int) -> int:
    return int(min(pool_size, max(SANITY_MIN, min(SANITY_MAX, SANITY_PER_CLASS * max(1, num_classes)))))


@torch.no_grad()
def _next_token_hits(model: nn.Module, sample, device: str, batch_size: int, what: str) -> int:
    """Correct top-1 next-token predictions of a language model over every position of ``sample``'s windows."""
    from .models.lm import lm_logits

    hits = 0
    for ids, targets, _ in iter_batches(sample, batch_size):
        try:
            logits = lm_logits(model, ids.to(device))
        except (RuntimeError, IndexError) as e:
            raise ConceptEvoError(f"{what} fails on the study's token windows of shape {list(ids.shape[1:])} "
                                  f"({str(e).splitlines()[0][:200]}); check the tokenizer ([data] tokenizer) and "
                                  "the model's vocab_size and context") from None
        if not torch.isfinite(logits).all():
            raise ConceptEvoError(f"{what} produced NaN or Inf logits; check the checkpoint's weights")
        hits += int((logits.argmax(dim=-1).cpu() == targets).sum())
    return hits


@torch.no_grad()
def _hits(model: nn.Module, sample, device: str, batch_size: int, what: str) -> int:
    hits = 0
    for images, labels, _ in iter_batches(sample, batch_size):
        try:
            out = model(images.to(device))
        except RuntimeError as e:
            raise ConceptEvoError(
                f"{what} fails on the study's images of shape {list(images.shape[1:])} "
                f"({str(e).splitlines()[0][:200]}); check [data] options.channels, resize/crop and the model's "
                "arch and options") from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            return -1
        if not torch.isfinite(out).all():
            raise NonFiniteActivationError(_first_nonfinite(model, images.to(device)))
        hits += int((out.argmax(dim=1).cpu() == labels).sum())
    return hits


def _first_nonfinite(model: nn.Module, images: torch.Tensor) -> str:
    """The first module (in execution order) whose output holds NaN or Inf on ``images``."""
    found: list[str] = []

    def hook(name):
        def check(_mod, _inp, out):
            if not found and isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "output"


CAUSES = ("inputs not preprocessed as in training (set [data] mean/std, resize/crop, or transform), "
          "a different channel order or count (options.channels), or classes numbered differently "
          "([data] classes = [...] in the model's output order)")


def sanity_check(ws, config, pool, models: dict, trust: bool = False, allow_chance: bool = False) -> dict:
    """Top-1 of every model's last checkpoint on a seeded sample of the pool; stop when at chance.

    Results are recorded in the manifest under ``sanity`` (one record per
    model, reused while the checkpoint, the data and the sample are
    unchanged) and returned as ``{model: record}``.
    """
    sp = config.stimuli
    text = config.data.kind == "text"
    if text:  # language models: next-token top-1 over every position of a sample of windows
        sample = sample_pool(pool, min(len(pool), TEXT_SANITY_WINDOWS), seed=config.data.seed, per_class=False)
        nexts = np.concatenate([np.asarray(t).ravel() for _, t, _ in iter_batches(sample, 256)])
        labels = nexts
    else:
        ncls = len(np.unique(np.asarray(pool.targets)))
        sample = sample_pool(pool, sample_size(ncls, len(pool)), seed=config.data.seed)
        labels = np.asarray(sample.targets)
    chance = float(np.bincount(labels).max() / len(labels))
    unit = "next tokens" if text else "pool images"
    for m in config.models:
        row = models[m.name]["checkpoints"][-1]
        key = hash_json([sample.fingerprint(), row["sha256"], m.arch, m.options] + ([m.loading()] if m.loading() else []))
        rec = ws.sanity_record(m.name)
        if rec is None or rec.get("key") != key:
            model = load_model(m.arch, m.options, row["path"], pool, trust=trust, **m.loading()).to(sp.device).eval()
            what = f"model {m.name!r} ({row['tag']})"
            hits = (_next_token_hits if text else _hits)(model, sample, sp.device, sp.batch_size, what)
            rec = {"key": key, "tag": row["tag"], "images": len(labels), "seed": config.data.seed, "top1": None}
            if hits < 0:
                log.warning("model %s: its output is not [batch, classes] logits; accuracy not checked", m.name)
            else:
                rec.update(top1=hits / len(labels), correct=hits, chance=chance, p_value=chance_p_value(hits, len(labels), chance))
            ws.record_sanity(m.name, rec)
        if rec.get("top1") is None:
            continue
        log.info("sanity check: %s %s top-1 %.3f on %d %s (chance %.3f; p = %.2g that chance does as well)",
                 m.name, row["tag"], rec["top1"], rec["images"], unit, rec["chance"], rec["p_value"])
        if rec["p_value"] >= CHANCE_ALPHA:
            msg = (f"model {m.name!r} scores top-1 {rec['top1']:.3f} at its last checkpoint {row['tag']} on "
                   f"{rec['images']} {unit}, not above chance ({rec['chance']:.3f}; binomial p = {rec['p_value']:.2g}); "
                   f"usual causes: {CAUSES}")
            if allow_chance or m.allow_chance:
                log.warning("%s; continuing as allowed", msg)
            else:
                raise ChanceAccuracyError(f"{msg}. If this is expected (e.g. an untrained model), "
                                          f"pass --allow-chance to run or set allow_chance = true in its [[models]] table")
    return {m.name: ws.sanity_record(m.name) for m in config.models}


# ------------------------------------------------------------------ test split and classes
def check_test_split(config) -> dict | None:
    """The test split's size and source, or None after a warning saying what will not be possible."""
    data = config.data
    try:
        test = open_study_dataset(data, "test")
    except DatasetError as e:
        if data.kind == "text":  # text: evaluate-importance measures the training occurrences and says so
            log.info("no held-out windows (%s): evaluate-importance will measure its targets on the pool's training "
                     "windows only; set [data] holdout = 0.2 to hold out a seeded fifth of the windows (before the "
                     "stimuli are computed)", str(e).split(";")[0])
            return None
        log.warning("no test split (%s): evaluate-importance will not be possible, as it measures accuracy on "
                    "held-out images; add one, or set [data] holdout = 0.2 to hold out a seeded fifth of the "
                    "training images (before the stimuli are computed)", str(e).split(";")[0])
        return None
    return {"images": len(test), "source": "holdout" if data.holdout is not None else "test split"}


def describe_classes(dataset, explicit: bool) -> str:
    """'model output -> class' for the log, with a hint when the order is the data's own."""
    classes = list(getattr(dataset, "classes", []) or [])
    shown = ", ".join(f"{j} {c}" for j, c in enumerate(classes[:30])) + (", ..." if len(classes) > 30 else "")
    how = "as given by [data] classes" if explicit else "the data's own order; set [data] classes if the model's differs"
    return f"classes (model output: name), {how}: {shown}"
