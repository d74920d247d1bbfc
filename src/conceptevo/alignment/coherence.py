"""Concept coherence of neuron groups, on data whose concepts are known (paper Sec 4.2-4.3, automated).

On :class:`~conceptevo.data.ConceptShapes` every image carries known concepts
(shape, colour, family, texture, size, position, background). A neuron is
**dominated** by the concept ``attribute = value`` when at least ``dominance``
(default 0.6) of its k stimuli have it; among the concepts that dominate it,
its *dominant concept* is the one furthest above its base rate in the image
pool (``share - prior``), so that "warm" does not hide "red" and a concept every
image shares does not count. Neurons dominated by no concept have none.

A group's **coherence** is the share of its members whose dominant concept is
the group's most common one (neurons with none never match). The groups'
coherence is compared with that of random groups of the same sizes drawn from
the same neurons (``random_groups`` draws), giving a mean, a standard deviation
and a one-sided permutation p-value.

Datasets without known concepts can use their class labels as the only
attribute (``concepts={"class": labels}``); this measures class purity, a
weaker property, and reports say so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ConceptEvoError


@dataclass
class ConceptCoding:
    """Dominant concept ids of neurons, and what each id means."""

    ids: np.ndarray            # int [N]: index into ``names``, -1 = dominated by no concept
    names: list[str]           # "attribute=value"
    shares: np.ndarray         # float [N]: the dominant concept's share of the neuron's stimuli (0 when none)


def dataset_concepts(dataset) -> tuple[dict[str, np.ndarray], dict[str, list[str]], bool]:
    """(attribute -> value index per image, attribute -> value names, known) for a dataset.

    ``known`` is True for datasets with concepts by construction (``.concepts``),
    False when only class labels are available.
    """
    concepts = getattr(dataset, "concepts", None)
    if isinstance(concepts, dict) and concepts:
        names = getattr(dataset, "concept_names", None) or {a: [str(i) for i in range(int(np.max(v)) + 1)] for a, v in concepts.items()}
        return {a: np.asarray(v, dtype=np.int64) for a, v in concepts.items()}, {a: list(n) for a, n in names.items()}, True
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ConceptEvoError("the dataset has neither known concepts (.concepts) nor class labels (.targets)")
    classes = list(getattr(dataset, "classes", []) or [str(i) for i in range(int(np.max(targets)) + 1)])
    return {"class": np.asarray(targets, dtype=np.int64)}, {"class": classes}, False


def dominant_concepts(indices, concepts: dict[str, np.ndarray], concept_names: dict[str, list[str]] | None = None,
                      dominance: float = 0.6, pool=None, alpha: float | None = None) -> ConceptCoding:
    """Each neuron's dominant concept from its stimuli (``indices`` ``[N, k]`` image indices, -1 = none).

    ``concepts``: attribute -> value index of every image (indexed by image
    index). ``pool``: the image indices whose concept frequencies are the
    priors (default: all images).
    """
    from scipy.stats import binom

    if not 0 < dominance <= 1:
        raise ConceptEvoError(f"dominance must be in (0, 1], got {dominance!r}")
    n_concepts = sum(int(np.max(v)) + 1 for v in concepts.values())
    alpha = 0.05 / max(n_concepts, 1) if alpha is None else float(alpha)
    if not 0 < alpha <= 1:
        raise ConceptEvoError(f"alpha must be in (0, 1], got {alpha!r}")
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 2:
        raise ConceptEvoError(f"indices must be [neurons, k], got shape {idx.shape}")
    valid = idx >= 0
    counts = np.maximum(valid.sum(axis=1), 1)
    names, best_gain = [], np.full(len(idx), -np.inf)
    best_id = np.full(len(idx), -1, dtype=np.int64)
    best_share = np.zeros(len(idx))
    for attr, values in concepts.items():
        values = np.asarray(values, dtype=np.int64)
        if idx.size and idx.max() >= len(values):
            raise ConceptEvoError(f"stimulus image {int(idx.max())} has no {attr!r} value ({len(values)} images known)")
        nv = int(values.max()) + 1
        prior_src = values if pool is None else values[np.asarray(pool, dtype=np.int64)]
        prior = np.bincount(prior_src, minlength=nv) / max(len(prior_src), 1)
        vals = np.where(valid, values[np.where(valid, idx, 0)], -1)
        for v in range(nv):
            hits = (vals == v).sum(axis=1)
            share = hits / counts
            gain = share - prior[v]
            rare = binom.sf(hits - 1, counts, prior[v]) <= alpha
            take = (share >= dominance - 1e-12) & rare & (gain > best_gain)
            label = f"{attr}={concept_names[attr][v] if concept_names and attr in concept_names else v}"
            names.append(label)
            best_gain[take] = gain[take]
            best_id[take] = len(names) - 1
            best_share[take] = share[take]
    return ConceptCoding(best_id, names, best_share)


def group_coherence(concept_ids, groups) -> dict[int, float]:
    """Group label -> share of its members sharing the group's most common dominant concept."""
    cid = np.asarray(concept_ids, dtype=np.int64)
    g = np.asarray(groups, dtype=np.int64)
    out = {}
    for label in np.unique(g[g >= 0]):
        members = cid[g == label]
        have = members[members >= 0]
        out[int(label)] = float(np.bincount(have).max() / len(members)) if have.size else 0.0
    return out


@dataclass
class CoherenceResult:
    """Coherence of the actual groups against random groups of the same sizes."""

    setting: str
    groups: int
    neurons: int
    coherence: float                 # mean over groups
    random_mean: float
    random_std: float
    p_value: float                   # share of random draws at least as coherent (one-sided)
    dominated: float                 # share of the neurons dominated by some concept
    known_concepts: bool = True
    per_group: dict = field(default_factory=dict)
    top_concepts: dict = field(default_factory=dict)   # group -> its most common dominant concept

    def to_dict(self) -> dict:
        return asdict(self)


def coherence_test(concept_ids, groups, names: list[str] | None = None, random_groups: int = 200, seed: int = 0,
                   setting: str = "", min_size: int = 2, known_concepts: bool = True) -> CoherenceResult:
    """Mean group coherence of ``groups`` vs random relabellings (same group sizes, same neurons).

    Groups with fewer than ``min_size`` members are left out.
    """
    cid = np.asarray(concept_ids, dtype=np.int64)
    g = np.asarray(groups, dtype=np.int64)
    if cid.shape != g.shape:
        raise ConceptEvoError(f"concept_ids and groups must have the same length, got {cid.shape} and {g.shape}")
    labels, sizes = np.unique(g[g >= 0], return_counts=True)
    keep = labels[sizes >= min_size]
    mask = np.isin(g, keep)
    if keep.size == 0:
        raise ConceptEvoError(f"no group has at least {min_size} neurons; use fewer groups or more neurons")
    cid, g = cid[mask], g[mask]
    per = group_coherence(cid, g)
    observed = float(np.mean(list(per.values())))
    rng = np.random.default_rng(seed)
    draws = np.empty(random_groups)
    for i in range(random_groups):
        draws[i] = np.mean(list(group_coherence(cid, rng.permutation(g)).values()))
    p = float((1 + np.sum(draws >= observed - 1e-12)) / (1 + random_groups))
    top = {}
    for label in per:
        members = cid[g == label]
        have = members[members >= 0]
        if have.size:
            j = int(np.bincount(have).argmax())
            top[label] = names[j] if names else j
    return CoherenceResult(setting, len(per), int(len(cid)), observed, float(draws.mean()), float(draws.std()), p,
                           float(np.mean(cid >= 0)), known_concepts, per, top)


__all__ = ["ConceptCoding", "dataset_concepts", "dominant_concepts", "group_coherence", "CoherenceResult",
           "coherence_test"]
