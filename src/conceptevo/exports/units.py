"""What the exports share: every checkpoint's units as rows, with their metadata and top patch.

A *unit* is one neuron (a channel of a layer) of one checkpoint. For each
checkpoint with stimuli, :func:`checkpoint_units` gives the rows in the
workspace's own neuron order (the order of the stimuli, the projection, the
layout and the patch sheets): the unit id (``LAYER:CHANNEL``), its layer and
channel, its vector in the unified space, its 2-D layout position, the distance
it moved since the model's previous checkpoint, and the classes of its stimuli
(the dataset labels of its top-k images). :class:`UnitPictures` reads each
unit's top patch (the crop of its strongest stimulus) and the stimulus images.

Text studies (``[data] kind = "text"``) have token windows, not images: their
units' "classes" are the argmax tokens of their contexts (``top_class``: the
commonest, ``top_classes``: e.g. ``"e 6, ␣ 3, a 1"``) and ``top_context`` is
the unit's strongest context as one line, the argmax token in brackets
(``"the old m[a]n said"``), newlines and tabs as visible marks.

Everything is read through the workspace's public methods and the patch store;
missing stages give ``None`` fields, never errors, so an export can say what is
missing and carry on.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..errors import ConceptEvoError
from ..io import load_npy
from ..patches import PatchStore, patches_dir, to_uint8_image
from ..units import layers_of, split_neuron_id

log = logging.getLogger(__name__)

#: How many of a unit's most frequent stimulus classes the ``top_classes`` text names.
TOP_CLASSES = 3


@dataclass
class CheckpointUnits:
    """The units of one checkpoint, row-aligned with the workspace's arrays."""

    model: str
    tag: str
    epoch: float | None
    ids: list[str]
    vectors: np.ndarray | None        # float32 [N, dim] in the unified space (NaN rows: no vector)
    xy: np.ndarray | None             # float32 [N, 2] layout coordinates
    moved: np.ndarray | None          # float32 [N] distance moved since the previous checkpoint (NaN: unknown)
    top_class: list[str]              # most frequent class among the unit's stimuli ('' when unknown)
    top_classes: list[str]            # e.g. "sandal 6, sneaker 3, bag 1" (counts out of k)
    top_context: list[str] = field(default_factory=list)  # text studies: the strongest context, "be[f]ore" ('' else)
    step: int | None = None           # the training step, where the checkpoint names one

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def layers(self) -> list[str]:
        return layers_of(self.ids)

    @property
    def channels(self) -> list[str]:
        return [str(split_neuron_id(nid)[1]) for nid in self.ids]


class StimulusLabels:
    """Dataset labels of stimulus images, and the class names.

    The patch store holds the label of every stimulus image when example
    patches are computed; otherwise the study's dataset is opened (through the
    workspace) and asked. When neither works, labels are unknown (-1) and the
    class columns stay empty; the reason is logged once.
    """

    def __init__(self, ws, store):
        self.ws = ws
        self.classes: list[str] = []
        self._indices = np.zeros(0, np.int64)
        self._labels = np.zeros(0, np.int64)
        self._dataset = None
        self._tried = False
        if store.has_images:
            self._indices = np.asarray(store.image_indices, dtype=np.int64)
            self._labels = np.asarray(store.image_labels, dtype=np.int64)
            self.classes = [str(c) for c in store.images_index.get("classes", [])]

    def dataset(self):
        """The study's training set, opened once; None (logged) when it cannot be opened."""
        if not self._tried:
            self._tried = True
            try:
                self._dataset = self.ws.dataset("train")
            except (ConceptEvoError, OSError) as e:
                log.warning("the study's dataset cannot be opened (%s); stimulus classes are left empty", e)
                self._dataset = None
            if self._dataset is not None and not self.classes:
                self.classes = [str(c) for c in (getattr(self._dataset, "classes", None) or [])]
        return self._dataset

    def labels(self, indices) -> np.ndarray:
        """Labels of dataset images ``indices`` (any shape; -1 where unknown or the index is -1)."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.full(idx.shape, -1, dtype=np.int64)
        flat, res = idx.ravel(), out.ravel()
        if len(self._indices):
            pos = np.clip(np.searchsorted(self._indices, flat), 0, len(self._indices) - 1)
            hit = (flat >= 0) & (self._indices[pos] == flat)
            res[hit] = self._labels[pos[hit]]
        todo = (res < 0) & (flat >= 0)
        if todo.any() and self.dataset() is not None:
            ds = self._dataset
            targets = getattr(ds, "targets", None)
            wanted = np.unique(flat[todo])
            inside = wanted < len(ds)
            got = np.full(len(wanted), -1, dtype=np.int64)
            if targets is not None and len(targets) == len(ds):
                got[inside] = np.asarray(targets, dtype=np.int64)[wanted[inside]]
            else:
                got[inside] = [int(ds[int(i)][1]) for i in wanted[inside]]
            res[todo] = got[np.searchsorted(wanted, flat[todo])]
        return out

    def name(self, label: int) -> str:
        if label < 0:
            return ""
        return self.classes[label] if label < len(self.classes) else str(label)


def class_summary(labels: np.ndarray, names: StimulusLabels, top: int = TOP_CLASSES) -> tuple[list[str], list[str]]:
    """Per row of ``labels`` ``[N, k]``: the most frequent class and ``"a 6, b 3, c 1"`` (ties: lower label first)."""
    first, text = [], []
    for row in np.asarray(labels):
        counts = Counter(int(v) for v in row if v >= 0)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        first.append(names.name(ranked[0][0]) if ranked else "")
        text.append(", ".join(f"{names.name(c)} {n}" for c, n in ranked))
    return first, text


class TokenNames:
    """The names of a text study's tokens, as :class:`StimulusLabels` names classes: newlines and tabs as marks,
    spaces as ``␣`` (a name alone, a space token would be blank, and a TSV cell trims it away)."""

    def __init__(self, ws):
        from ..contexts import workspace_tokenizer

        self.tokenizer = workspace_tokenizer(ws)

    def name(self, label: int) -> str:
        from ..contexts import visible_marks

        return visible_marks(self.tokenizer.token_str(int(label))).replace(" ", "\u2423") if label >= 0 else ""


def _text_summary(ws, names: TokenNames, m: str, t: str, stim) -> tuple[list[str], list[str], list[str]]:
    """A text checkpoint's units: (top argmax token, top argmax tokens with counts, strongest context)."""
    from ..contexts import context_strings, load_contexts

    ctx = load_contexts(ws, m, t)
    centre = np.where(np.asarray(stim.indices) >= 0, ctx[:, :, ctx.shape[2] // 2], -1)
    first, text = class_summary(centre, names)
    lines = []
    for unit in ctx:
        before, tok, after = context_strings(names.tokenizer, unit[0])
        lines.append(f"{before}[{tok}]{after}")
    return first, text, lines


def checkpoint_units(ws, labels: StimulusLabels | None = None, store=None) -> Iterator[CheckpointUnits]:
    """Every checkpoint with stimuli, model by model in training order."""
    from ..contexts import is_text_workspace

    store = store if store is not None else PatchStore(ws)
    text = is_text_workspace(ws)
    tokens = TokenNames(ws) if text else None
    labels = labels if labels is not None or text else StimulusLabels(ws, store)
    layout_done = ws.stage("layout") is not None
    for m in ws.models:
        prev = None
        for c in ws.checkpoints(m):
            t = c.tag
            if ws.stage(f"stimuli/{m}/{t}") is None:
                log.info("%s %s has no stimuli: not exported", m, t)
                prev = None
                continue
            stim = ws.stimuli(m, t)
            vectors = None
            if ws.stage(f"projection/{m}/{t}") is not None:
                vectors = np.asarray(ws.projection(m, t).vectors, dtype=np.float32)
            xy = None
            if layout_done and ws.layout_path(m, t).exists():
                xy = np.asarray(ws.layout(m, t), dtype=np.float32)
                if len(xy) != len(stim):
                    log.warning("the layout of %s %s has %d rows for %d units: left out", m, t, len(xy), len(stim))
                    xy = None
            moved = None
            if vectors is not None:
                moved = (np.linalg.norm(vectors - prev, axis=1).astype(np.float32)
                         if prev is not None and prev.shape == vectors.shape
                         else np.full(len(vectors), np.nan, dtype=np.float32))
            prev = vectors
            if text:
                first, top, lines = _text_summary(ws, tokens, m, t, stim)
                yield CheckpointUnits(m, t, c.epoch, list(stim.neuron_ids), vectors, xy, moved, first, top, lines, c.step)
            else:
                first, top = class_summary(labels.labels(stim.indices), labels)
                yield CheckpointUnits(m, t, c.epoch, list(stim.neuron_ids), vectors, xy, moved, first, top, step=c.step)


class UnitPictures:
    """Each unit's top patch (``uint8 [P, P, C]``) and the images, or ``None`` where there are none."""

    def __init__(self, ws, store=None, labels: StimulusLabels | None = None):
        self.ws = ws
        self.store = store if store is not None else PatchStore(ws)
        self.labels = labels if labels is not None else StimulusLabels(ws, self.store)
        self.missing: list[str] = []   # "model tag" of checkpoints without patches
        self._stored = self._pixels = None
        self._has: dict[tuple[str, str], bool] = {}

    def has(self, model: str, tag: str) -> bool:
        ok = self._has.get((model, tag))
        if ok is None:
            ok = self._has[(model, tag)] = self.store.has(model, tag)
            if not ok:
                self.missing.append(f"{model} {tag}")
        return ok

    @property
    def cell(self) -> int | None:
        """The patch size in pixels (of the first checkpoint that has patches)."""
        for m in self.ws.models:
            for t in self.ws.tags(m):
                if self.store.has(m, t):
                    return int(self.store.geometry(m, t).cell)
        return None

    def top_patch(self, model: str, tag: str, row: int) -> np.ndarray | None:
        if not self.has(model, tag):
            return None
        return self.store.patches(model, tag, row)[0]

    def image(self, index: int) -> np.ndarray | None:
        """The image with dataset index ``index``: a stored stimulus image, else read from the study's dataset."""
        if self.store.has_images:
            if self._stored is None:
                self._stored = np.asarray(self.store.image_indices)
                self._pixels = load_npy(patches_dir(self.ws) / "images" / "pixels.npy", mmap=True)
            r = int(np.searchsorted(self._stored, index))
            if r < len(self._stored) and self._stored[r] == index:
                return np.asarray(self._pixels[r])
        ds = self.labels.dataset()
        if ds is None or not 0 <= index < len(ds):
            return None
        return to_uint8_image(ds[int(index)][0])

    def note(self) -> str | None:
        """A line on what has no pictures and how to get them, or None."""
        if not self.missing:
            return None
        return (f"no example patches for {len(self.missing)} checkpoint(s) ({', '.join(self.missing[:4])}"
                f"{', ...' if len(self.missing) > 4 else ''}): their units have blank pictures; "
                f"compute them with `conceptevo patches {self.ws.path}`")


def to_rgb(img: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, C]`` (C = 1, 3 or 4) as ``uint8 [H, W, 3]``."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return a[..., :3]


__all__ = ["CheckpointUnits", "StimulusLabels", "TokenNames", "UnitPictures", "checkpoint_units", "class_summary", "to_rgb", "TOP_CLASSES"]
