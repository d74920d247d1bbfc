"""An automatic intruder test (the paper's human study, Sec 4.2 / Fig 4-5, without people).

Each task shows six neurons: five from one K-means group of the unified space
and one random *intruder* from another group, each neuron represented only by
what a person would see, its example patches (or, without patches, its
stimulus images). A **judge that never sees the embedding** scores every
neuron's membership from the pictures alone:

* each picture is described by three simple aspects: its colours (a joint RGB
  histogram, 4 x 4 x 4 bins; 16 gray levels for one-channel images), its
  gradients (orientations weighted by magnitude, 8 unsigned bins in each of
  2 x 2 cells, HOG-like) and its layout (the picture downsampled to 6 x 6 gray
  levels);
* a neuron's description is the mean over its pictures (histograms enter as
  square roots, so distances between them are Hellinger-like); each aspect is
  scaled so that the typical distance between two neurons of the test is 1;
* in each task the judge looks at every aspect, rescaled by that aspect's
  typical distance between neurons, and leans on the aspects the six neurons
  agree on most (weight proportional to 1 / their mean distance in that
  aspect), as a person would notice "all red" or "all stripes";
* a neuron's membership score is minus its weighted mean distance to the other
  five (the odd one out is far from the rest).

For text studies a neuron's "pictures" are its top contexts (the tokens
around its argmax token, :mod:`conceptevo.contexts`), and the judge reads them
through four aspects (:func:`context_features`): which token is the argmax
(its identity), which tokens stand just before and after it, the character
classes of those three (capital, lower-case, digit, space, newline,
punctuation), and the letter trigrams of the few characters around it. The
same mean, scaling, weighting and scoring apply.

Pooling every task's six (score, grouped-or-intruder) pairs gives an ROC curve
and its AUC, the counterpart of the paper's 0.90 (within the base model) and
0.86 (across models and epochs); chance is 0.5. The same judge on tasks whose
"groups" are random neurons gives the empirical chance level, and the share of
tasks where the lowest score is the intruder is reported with its chance 1/6.
"""
from __future__ import annotations

import logging
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import ConceptEvoError

log = logging.getLogger(__name__)

GROUP_SIZE = 5
#: Aspects that are histograms: they enter as square roots (distances between them are Hellinger-like).
HISTOGRAMS = frozenset({"colour", "gradient", "token", "neighbours", "classes", "ngrams"})


# ---------------------------------------------------------------------------------------------
# the judge
# ---------------------------------------------------------------------------------------------
def _as_float_hwc(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ConceptEvoError(f"a picture must be [H, W, C] or [H, W], got shape {a.shape}")
    a = a.astype(np.float64)
    if a.max() > 1.5:
        a = a / 255.0
    return a


def picture_features(img, bins: int = 8, cells: int = 2, thumb: int = 6) -> dict[str, np.ndarray]:
    """Colour histogram, gradient-orientation histogram and thumbnail of one picture ``[H, W, C]``."""
    a = _as_float_hwc(img)
    H, W, C = a.shape
    if C >= 3:
        q = np.minimum((a[:, :, :3] * 4).astype(np.int64), 3)
        colour = np.bincount((q[:, :, 0] * 16 + q[:, :, 1] * 4 + q[:, :, 2]).ravel(), minlength=64).astype(np.float64)
    else:
        colour = np.bincount(np.minimum((a[:, :, 0] * 16).astype(np.int64), 15).ravel(), minlength=16).astype(np.float64)
    colour /= max(H * W, 1)
    gray = a.mean(axis=2)
    gy = np.zeros_like(gray)
    gx = np.zeros_like(gray)
    if H > 2:
        gy[1:-1] = (gray[2:] - gray[:-2]) / 2
    if W > 2:
        gx[:, 1:-1] = (gray[:, 2:] - gray[:, :-2]) / 2
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi)
    ob = np.minimum((ang / np.pi * bins).astype(np.int64), bins - 1)
    grad = np.zeros((cells, cells, bins))
    ys = np.minimum(np.arange(H) * cells // max(H, 1), cells - 1)
    xs = np.minimum(np.arange(W) * cells // max(W, 1), cells - 1)
    np.add.at(grad, (ys[:, None].repeat(W, 1), xs[None, :].repeat(H, 0), ob), mag)
    grad = grad.ravel()
    grad /= grad.sum() + 1e-9
    # thumbnail: area-average to thumb x thumb
    yi = np.minimum(np.arange(H) * thumb // max(H, 1), thumb - 1)
    xi = np.minimum(np.arange(W) * thumb // max(W, 1), thumb - 1)
    t = np.zeros((thumb, thumb))
    n = np.zeros((thumb, thumb))
    np.add.at(t, (yi[:, None].repeat(W, 1), xi[None, :].repeat(H, 0)), gray)
    np.add.at(n, (yi[:, None].repeat(W, 1), xi[None, :].repeat(H, 0)), 1.0)
    return {"colour": colour, "gradient": grad, "thumbnail": (t / np.maximum(n, 1)).ravel()}


def neuron_description(pictures, features: Callable = picture_features) -> dict[str, np.ndarray]:
    """The mean of ``features`` (default :func:`picture_features`) over a neuron's pictures (or contexts)."""
    feats = [features(p) for p in pictures]
    if not feats:
        raise ConceptEvoError("a neuron has no picture to judge; find its stimuli first")
    return {key: np.mean([f[key] for f in feats], axis=0) for key in feats[0]}


#: Character classes a reader tells apart at a glance; "none" stands for no character (the window's start).
CHAR_CLASSES = ("upper", "lower", "digit", "space", "newline", "punctuation", "other", "none")
_NEWLINES = {"\n", "\r", "\u2028", "\u2029"}


def char_class(ch: str) -> int:
    """Index in :data:`CHAR_CLASSES` of one character ('' -> "none")."""
    if not ch:
        return 7
    if ch in _NEWLINES:
        return 4
    if ch.isspace():
        return 3
    if ch.isupper():
        return 0
    if ch.isalpha():
        return 1
    if ch.isdigit():
        return 2
    return 5 if unicodedata.category(ch)[0] in "PS" else 6


def _bucket(text: str, buckets: int) -> int:
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % buckets


def _class_shares(text: str) -> np.ndarray:
    out = np.zeros(len(CHAR_CLASSES))
    for ch in text or "":
        out[char_class(ch)] += 1
    if not text:
        out[7] = 1
    return out / out.sum()


def context_features(tokens, buckets: int = 256, reach: int = 6) -> dict[str, np.ndarray]:
    """What a reader sees in one context: ``tokens``, the token strings with the argmax token in the middle
    (``''`` where there is no token).

    Aspects (histograms, each summing to 1 or 2): ``token``, the argmax token's identity; ``neighbours``, the
    identities of the tokens just before and just after it; ``classes``, the character classes
    (:data:`CHAR_CLASSES`) of the argmax token's characters, of the character just before it and of the one just
    after it; ``ngrams``, the letter trigrams of the text from ``reach`` characters before the argmax token to
    ``reach`` after it. Identities and trigrams are hashed into ``buckets`` bins.
    """
    tokens = [str(t) for t in tokens]
    if len(tokens) % 2 != 1:
        raise ConceptEvoError(f"a context needs an odd number of tokens with the argmax in the middle, got {len(tokens)}")
    w = len(tokens) // 2
    tok = tokens[w]
    before, after = "".join(tokens[:w]), "".join(tokens[w + 1:])
    prev = next((t for t in reversed(tokens[:w]) if t), "")
    nxt = next((t for t in tokens[w + 1:] if t), "")
    ident = np.zeros(buckets)
    ident[_bucket(tok, buckets)] = 1
    near = np.zeros(2 * buckets)
    near[_bucket(prev, buckets)] += 1
    near[buckets + _bucket(nxt, buckets)] += 1
    classes = np.concatenate([_class_shares(tok), _class_shares(before[-1:]), _class_shares(after[:1])])
    text = before[-reach:] + tok + after[:reach] if reach else tok
    grams = np.zeros(buckets)
    for i in range(max(1, len(text) - 2)):
        grams[_bucket(text[i:i + 3], buckets)] += 1
    return {"token": ident, "neighbours": near, "classes": classes, "ngrams": grams / grams.sum()}


@dataclass
class Descriptions:
    """The judge's view of some neurons: one matrix per aspect, each divided by its typical distance."""

    blocks: list[np.ndarray]

    def __getitem__(self, rows) -> "Descriptions":
        return Descriptions([b[rows] for b in self.blocks])

    def __len__(self) -> int:
        return len(self.blocks[0])


def description_matrix(descriptions: Sequence[dict[str, np.ndarray]]) -> Descriptions:
    """One matrix per aspect, scaled so that two neurons' typical (median) distance in it is 1."""
    blocks = []
    for key in descriptions[0]:
        B = np.stack([d[key] for d in descriptions]).astype(np.float64)
        if key in HISTOGRAMS:
            B = np.sqrt(np.maximum(B, 0.0))
        d = _distances(B)
        typical = float(np.median(d[np.triu_indices(len(B), 1)])) if len(B) > 1 else 1.0
        blocks.append(B / (typical if typical > 0 else 1.0))
    return Descriptions(blocks)


def _distances(f: np.ndarray) -> np.ndarray:
    sq = (f * f).sum(1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0.0))


def judge_task(features) -> np.ndarray:
    """Membership scores of one task's neurons: minus their agreement-weighted mean distance to the others.

    ``features``: a :class:`Descriptions` (one matrix per aspect) or a plain
    ``[neurons, d]`` matrix (one aspect).
    """
    blocks = features.blocks if isinstance(features, Descriptions) else [np.asarray(features, dtype=np.float64)]
    n = len(blocks[0])
    per, spread = [], []
    for b in blocks:
        d = _distances(np.asarray(b, dtype=np.float64))
        per.append(d.sum(axis=1) / (n - 1))
        spread.append(d.sum() / (n * (n - 1)))
    w = 1.0 / (np.asarray(spread) + 1e-9)
    w /= w.sum()
    return -np.sum([wi * p for wi, p in zip(w, per)], axis=0)


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
@dataclass
class IntruderResult:
    """ROC AUC of the judge on one setting's tasks, with the random-group chance level."""

    setting: str
    tasks: int
    auc: float
    intruder_found: float            # share of tasks where the lowest score is the intruder
    chance_auc: float                # the same judge on random groups (empirical chance; theory 0.5)
    chance_found: float              # ... and its intruder-found share (theory 1/6)
    paper_auc: float | None = None
    roc: dict = field(default_factory=dict)         # fpr, tpr of the grouped tasks
    chance_roc: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_tasks(groups: np.ndarray, eligible: np.ndarray, tasks: int, rng: np.random.Generator,
                 mixing: np.ndarray | None = None, intruder_pool: np.ndarray | None = None,
                 min_mix: int = 2) -> list[tuple[np.ndarray, int]]:
    """Draw ``tasks`` intruder tasks: (5 row positions of one group, 1 intruder row from another group).

    ``eligible``: rows that may be group members; ``intruder_pool``: rows that may
    be intruders (default: ``eligible``); ``mixing``: optional label per row
    (model or checkpoint) of which the 5 members must cover at least ``min_mix``
    distinct values (for the across-epochs and across-models settings).
    """
    groups = np.asarray(groups)
    eligible = np.asarray(eligible, dtype=np.int64)
    pool = eligible if intruder_pool is None else np.asarray(intruder_pool, dtype=np.int64)
    by_group: dict[int, np.ndarray] = {}
    for g in np.unique(groups[eligible]):
        rows = eligible[groups[eligible] == g]
        if len(rows) < GROUP_SIZE:
            continue
        if mixing is not None and len(np.unique(mixing[rows])) < min_mix:
            continue
        by_group[int(g)] = rows
    if not by_group:
        raise ConceptEvoError(
            f"no K-means group has {GROUP_SIZE} eligible neurons"
            + (f" from at least {min_mix} different checkpoints/models" if mixing is not None else "")
            + "; use fewer groups (n_groups) or more checkpoints"
        )
    keys = sorted(by_group)
    weights = np.array([len(by_group[k]) for k in keys], dtype=np.float64)
    out = []
    for _ in range(tasks):
        g = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
        rows = by_group[g]
        for _attempt in range(50):
            members = rng.choice(rows, size=GROUP_SIZE, replace=False)
            if mixing is None or len(np.unique(mixing[members])) >= min_mix:
                break
        others = pool[groups[pool] != g]
        if others.size == 0:
            raise ConceptEvoError("every candidate intruder is in the same group; use more K-means groups")
        out.append((members, int(rng.choice(others))))
    return out


def run_tasks(task_list, features, position: dict[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Judge every task; returns pooled (scores, labels: 1 grouped / 0 intruder) and the intruder-found share.

    ``features[position[row]]`` is a row's description (standardised over the test).
    """
    scores, labels, found = [], [], 0
    for members, intruder in task_list:
        rows = list(members) + [intruder]
        s = judge_task(features[[position[int(r)] for r in rows]])
        scores.append(s)
        labels.append(np.r_[np.ones(GROUP_SIZE), 0.0])
        found += int(np.argmin(s) == GROUP_SIZE)
    return np.concatenate(scores), np.concatenate(labels), found / max(len(task_list), 1)


def auc_and_roc(scores, labels) -> tuple[float, dict]:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(roc_auc_score(labels, scores)), {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def intruder_test(groups, eligible, features_of: Callable[[np.ndarray], np.ndarray], tasks: int = 200, seed: int = 0,
                  setting: str = "", mixing=None, intruder_pool=None, paper_auc: float | None = None,
                  min_mix: int = 2) -> IntruderResult:
    """Intruder tasks from K-means ``groups`` and from random groups (chance), judged from pictures.

    ``features_of(rows)`` returns the judge's description matrix of those rows
    (e.g. :func:`description_matrix` of their pictures); it never sees the
    embedding. The random-group tasks draw members and intruder the same way
    from a random relabelling of the same rows.
    """
    if isinstance(tasks, bool) or not isinstance(tasks, (int, np.integer)) or tasks < 1:
        raise ConceptEvoError(f"tasks must be a positive integer, got {tasks!r}")
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    tl = sample_tasks(groups, eligible, tasks, rng, mixing, intruder_pool, min_mix)
    shuffled = groups.copy()
    elig = np.asarray(eligible, dtype=np.int64)
    everyone = elig if intruder_pool is None else np.union1d(elig, np.asarray(intruder_pool, dtype=np.int64))
    shuffled[everyone] = rng.permutation(groups[everyone])
    tl0 = sample_tasks(shuffled, eligible, tasks, rng, mixing, intruder_pool, min_mix)
    rows = np.unique(np.concatenate([np.r_[m, i] for m, i in tl + tl0]).astype(np.int64))
    F = features_of(rows)
    if not isinstance(F, Descriptions):
        F = Descriptions([np.asarray(F, dtype=np.float64)])
    pos = {int(r): j for j, r in enumerate(rows)}
    s, y, found = run_tasks(tl, F, pos)
    auc, roc = auc_and_roc(s, y)
    s0, y0, found0 = run_tasks(tl0, F, pos)
    auc0, roc0 = auc_and_roc(s0, y0)
    log.info("intruder test %s: AUC %.3f (random groups %.3f), intruder found %.2f", setting, auc, auc0, found)
    return IntruderResult(setting, len(tl), auc, found, auc0, found0, paper_auc, roc, roc0)


__all__ = ["Descriptions", "picture_features", "context_features", "char_class", "CHAR_CLASSES", "neuron_description", "description_matrix", "judge_task", "sample_tasks",
           "run_tasks", "intruder_test", "IntruderResult", "auc_and_roc", "GROUP_SIZE"]
