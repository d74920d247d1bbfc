"""Choose evolution stages the way the paper did: by training-accuracy milestones.

The paper studies VGG16's stages 5 -> 21 -> 207, the epochs whose training
top-1 accuracy is nearest 0.25, 0.5 and 0.75. :func:`nearest_milestones` picks
those checkpoints from their recorded accuracies and
:func:`stages_from_milestones` pairs consecutive ones into stages.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping, Sequence

from ..errors import ConceptEvoError

log = logging.getLogger(__name__)

DEFAULT_MILESTONES = (0.25, 0.5, 0.75)


def _records(records) -> list[tuple[str, Mapping]]:
    """(tag, fields) pairs from dicts, objects with ``.tag``/``.metrics`` (Checkpoint), or a tag -> accuracy mapping."""
    if isinstance(records, Mapping):
        return [(str(tag), {"__value__": value}) for tag, value in records.items()]
    out = []
    for r in records:
        if isinstance(r, Mapping):
            if "tag" not in r:
                raise ConceptEvoError(f"a checkpoint record has no 'tag': {dict(r)!r}; every record needs a tag")
            fields = dict(r.get("metrics") or {})
            fields.update({k: v for k, v in r.items() if k != "metrics"})
            out.append((str(r["tag"]), fields))
        elif hasattr(r, "tag"):
            fields = dict(getattr(r, "metrics", None) or {})
            out.append((str(r.tag), fields))
        else:
            raise ConceptEvoError(f"cannot read a checkpoint record of type {type(r).__name__}; give dicts with 'tag' and the accuracy")
    return out


def _example_stages(tags: list[str]) -> str:
    """Two stages made of the tags (first -> middle -> last), or one, for an error message."""
    if len(tags) < 3:
        return ":".join(tags[:1] + tags[-1:]) if len(tags) == 2 else ""
    mid = tags[len(tags) // 2]
    return f"{tags[0]}:{mid},{mid}:{tags[-1]}"


def _accuracies(records, key: str) -> list[tuple[str, float]]:
    pairs = []
    recs = _records(records)
    for tag, fields in recs:
        value = fields.get("__value__", fields.get(key))
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConceptEvoError(f"checkpoint {tag!r} records {key}={value!r}, not a number") from None
        if math.isfinite(value):
            pairs.append((tag, value))
    if not pairs:
        tags = [tag for tag, _ in recs]
        example = _example_stages(tags)
        raise ConceptEvoError(
            f"no checkpoint records {key!r}, which choosing stages by accuracy milestones needs; give the stages "
            + (f"explicitly, e.g. --stages {example} " if example else "explicitly (--stages FROM:TO) ")
            + f"(checkpoints: {', '.join(tags[:12])}{', ...' if len(tags) > 12 else ''}), or record each checkpoint's "
            f"training accuracy as \"metrics\": {{\"{key}\": ...}} in a checkpoints.json beside the checkpoint files"
        )
    if max(v for _, v in pairs) > 1.0 + 1e-9:
        log.info("%s looks like a percentage (max %.3g); dividing by 100", key, max(v for _, v in pairs))
        pairs = [(t, v / 100.0) for t, v in pairs]
    return pairs


def nearest_milestones(records, milestones: Sequence[float] = DEFAULT_MILESTONES, key: str = "train_top1",
                       tolerance: float = 0.15) -> list[str]:
    """Tags of the checkpoints whose ``key`` accuracy is nearest each milestone.

    ``records``: checkpoint records in training order, each a dict with
    ``"tag"`` and ``key`` (at top level or under ``"metrics"``), a
    :class:`~conceptevo.models.checkpoints.Checkpoint`, or a plain
    ``{tag: accuracy}`` mapping. Ties go to the earlier record. A milestone with
    no checkpoint within ``tolerance`` is an error that names the closest one.
    """
    milestones = [float(m) for m in milestones]
    if not milestones:
        raise ConceptEvoError("milestones is empty; give at least one accuracy, e.g. (0.25, 0.5, 0.75)")
    if not tolerance > 0:
        raise ConceptEvoError(f"tolerance must be positive, got {tolerance!r}")
    pairs = _accuracies(records, key)
    tags = []
    for m in milestones:
        best_tag, best_acc = min(pairs, key=lambda p: abs(p[1] - m))  # min keeps the first of equals
        if abs(best_acc - m) > tolerance:
            raise ConceptEvoError(
                f"no checkpoint has {key} near {m:g} (closest: {best_acc:.3f} at {best_tag!r}, more than {tolerance:g} away); "
                "train longer / save more checkpoints, or pick milestones the run reaches"
            )
        log.info("milestone %g -> checkpoint %s (%s=%.3f)", m, best_tag, key, best_acc)
        tags.append(best_tag)
    return tags


def stages_from_milestones(records, milestones: Sequence[float] = DEFAULT_MILESTONES, key: str = "train_top1",
                           tolerance: float = 0.15) -> list[tuple[str, str]]:
    """Consecutive ``(tag_from, tag_to)`` stages between the milestone checkpoints.

    With the paper's milestones (0.25, 0.5, 0.75) this gives two stages, like
    VGG16's 5 -> 21 and 21 -> 207.
    """
    if len(milestones) < 2:
        raise ConceptEvoError("stages need at least two milestones, e.g. (0.25, 0.5, 0.75)")
    tags = nearest_milestones(records, milestones, key=key, tolerance=tolerance)
    stages = []
    for (m0, t0), (m1, t1) in zip(zip(milestones, tags), zip(milestones[1:], tags[1:])):
        if t0 == t1:
            raise ConceptEvoError(
                f"milestones {m0:g} and {m1:g} both fall on checkpoint {t0!r}; save checkpoints more often "
                "or use milestones further apart"
            )
        stages.append((t0, t1))
    return stages


def parse_stages(text: str) -> list[tuple[str, str]]:
    """``"e5:e21,e21:e207"`` -> ``[("e5", "e21"), ("e21", "e207")]`` (for the command line)."""
    stages = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        a, sep, b = part.partition(":")
        if not sep or not a.strip() or not b.strip():
            raise ConceptEvoError(f"cannot read stage {part!r}; write stages as FROM:TO, e.g. e5:e21,e21:e207")
        stages.append((a.strip(), b.strip()))
    if not stages:
        raise ConceptEvoError("no stage given; write stages as FROM:TO, e.g. e5:e21,e21:e207, or 'auto'")
    return stages


__all__: Iterable[str] = ["nearest_milestones", "stages_from_milestones", "parse_stages", "DEFAULT_MILESTONES"]
