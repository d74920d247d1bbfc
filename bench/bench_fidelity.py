"""Fidelity of the base neuron embedding against epochs, learning-rate schedule and early stopping.

How faithful is the space users get? On a *planted-concept* stimulus set the
truth is known: every neuron belongs to one of ``C`` concepts and takes
``own`` of its k = 10 stimuli from its concept's group of 100 images (popular
images more often, 1/rank weights) and the rest at random from a
50,000-image pool (scaled with the number of neurons, so that every size has
the same share of chance co-activations). At 4,224 neurons (VGG16's
convolutions) and 200 concepts, J1 levels off within ~100 epochs while
neighbourhoods keep improving.

For every run (one row) the script reports, over ``--seeds`` seeds:

* **purity**: share of a neuron's 5 nearest neighbours (Euclidean, among the
  base neurons' learned vectors) that share its concept (min-max over seeds);
* **cross-checkpoint purity**: an "other checkpoint" of the same network is
  drawn (same concepts and image groups, every neuron's stimuli redrawn, 10% of
  the neurons moved to another concept), projected onto the space through the
  image embedding (least squares plus the indirect step, with responses drawn
  from the planted concepts), and each projected neuron's 5 nearest *base*
  neurons are checked for its (new) concept;
* **seed agreement**, the noise floor: mean Jaccard index of each neuron's
  10-NN sets in the embeddings of two seeds, and the linear CKA of the two
  embeddings (1 = the same up to rotation and scale);
* J1 per pair on one fixed evaluation draw, epochs run and seconds (mean over
  seeds, single-threaded numba, on this machine's load).

With ``--workspace`` it measures a conceptevo workspace's own base stimuli
instead (e.g. the demo's): no concepts are known there, so "purity" uses each
neuron's *dominant class* (at least 60% of its stimuli of one class, as in
``conceptevo.alignment.coherence``); neurons without one are skipped as queries,
and "cross-checkpoint" projects every other checkpoint of the workspace.

Rows: ``before`` is the default before this benchmark (constant lr 0.05; stop when
the mean running J1 of the last 10 epochs rose less than 1e-4 relative over the 10
before; at most 1,000 epochs), reproduced here from that definition; then the
constant rate (the paper's Algorithm 1) at fixed epochs and with the
neighbour-stability early stop; then the linear decay at fixed epochs. The row
marked ``*`` is ``embed_neurons``' default.

Run: ``python bench/bench_fidelity.py`` (``--sizes``, ``--seeds``, ``--quick``,
``--workspace``; ``--markdown`` prints Markdown tables for docs/fidelity.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_embedding import VGG16_CHANNELS, planted_indices, synthetic_responses  # noqa: E402
from conceptevo.alignment.cka import linear_cka  # noqa: E402
from conceptevo.config import EmbeddingConfig  # noqa: E402
from conceptevo.embedding import NeuronEmbedding, embed_images, embed_neurons, objective, sample_epoch  # noqa: E402
from conceptevo.embedding.neurons import (_draw, _prepare, _sgd_epoch, nearest_neighbors,  # noqa: E402
                                         neighbor_jaccard)
from conceptevo.projection import project  # noqa: E402

DEFAULT = EmbeddingConfig()


# ------------------------------------------------------------------------------------------------
# the stimulus sets
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """A base stimulus set with labels (-1 = none) and other checkpoints to project onto its space."""

    name: str
    stimuli: object
    labels: np.ndarray
    others: list            # [(stimuli, labels)]
    responses: np.ndarray   # [num_images, top] base neuron rows, for the indirect step
    num_images: int


def planted_case(neurons: int, concepts: int, own: int = 4, group: int = 100, pool: int | None = None, k: int = 10,
                 switch: float = 0.1, seed: int = 0) -> Case:
    """``pool`` defaults to 50,000 images per 4,224 neurons, so that every size has the same share of chance
    co-activations (random stimuli shared by two neurons)."""
    pool = pool or round(50_000 * neurons / sum(VGG16_CHANNELS))
    rng = np.random.default_rng(seed)
    scale = neurons / sum(VGG16_CHANNELS)
    channels = [max(1, round(c * scale)) for c in VGG16_CHANNELS]
    channels[-1] += neurons - sum(channels)
    ids = [f"features.{layer}:{c}" for layer, ch in enumerate(channels) for c in range(ch)]
    groups = rng.permutation(pool)[: concepts * group].reshape(concepts, group)
    concept = rng.integers(0, concepts, neurons)

    def stimuli(labels, r):
        return types.SimpleNamespace(neuron_ids=ids, indices=planted_indices(labels, groups, k, pool, own, r),
                                     num_images=pool)

    base = stimuli(concept, rng)
    moved = concept.copy()
    move = rng.random(neurons) < switch
    moved[move] = (concept[move] + rng.integers(1, concepts, int(move.sum()))) % concepts
    other = stimuli(moved, rng)
    image_concept = np.full(pool, -1)
    image_concept[groups] = np.arange(concepts)[:, None]
    responses = synthetic_responses(base, concept, image_concept, seed=seed + 3)
    return Case(f"planted {neurons} neurons / {concepts} concepts", base, concept, [(other, moved)], responses, pool)


def workspace_case(path) -> Case:
    """A workspace's base stimuli; labels = each neuron's dominant class (or -1)."""
    from conceptevo.alignment.coherence import dominant_concepts
    from conceptevo.io import load_npy
    from conceptevo.workspace import Workspace

    ws = Workspace(path)
    targets = np.asarray(ws.dataset("train").targets)
    bm, bt = ws.base

    def dominant(st):
        return dominant_concepts(st.indices, {"class": targets}).ids

    base = ws.stimuli(bm, bt, mmap=False)
    others = [(ws.stimuli(m, t, mmap=False), None) for m in ws.models for t in ws.tags(m) if (m, t) != (bm, bt)]
    others = [(st, dominant(st)) for st, _ in others]
    responses = load_npy(ws.path / "embedding" / "responses.npy")
    return Case(f"workspace {path} (base {bm} {bt}, {len(base.neuron_ids)} neurons, {len(others)} other checkpoints)",
                base, dominant(base), others, responses, len(responses))


# ------------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------------
def before_default(stimuli, seed, epochs=1000, window=10, tol=1e-4):
    """The previous default: constant lr 0.05, stop on the running J1's windowed relative rise < tol."""
    ids, groups, num_pairs, rng, vectors = _prepare(stimuli, 30, seed)
    history = []
    for _ in range(epochs):
        j1, _ = _sgd_epoch(vectors, *_draw(groups, len(ids), 3, rng), 0.05)
        history.append(j1)
        if len(history) >= 2 * window:
            new, old = np.mean(history[-window:]), np.mean(history[-2 * window:-window])
            if (new - old) / abs(old) < tol:
                break
    return NeuronEmbedding(ids, vectors, j1_history=np.array(history), epochs_run=len(history), num_pairs=num_pairs)


def runs(quick: bool) -> list[tuple[str, dict | None]]:
    """(label, embed_neurons keyword arguments; None = the previous default)."""
    stop = dict(early_stop=True)
    if quick:
        return [("before (constant lr, J1 stop)", None), ("constant, 1000 epochs", dict(lr_schedule="constant", epochs=1000)),
                ("linear, 300 epochs", dict(lr_schedule="linear", epochs=300)),
                ("linear, 1000 epochs", dict(lr_schedule="linear", epochs=1000)),
                ("linear, 2000 epochs", dict(lr_schedule="linear", epochs=2000))]
    return ([("before (constant lr, J1 stop)", None)]
            + [(f"constant, {e} epochs", dict(lr_schedule="constant", epochs=e)) for e in (100, 300, 1000, 2000)]
            + [("constant, neighbour stop (max 2000)", dict(lr_schedule="constant", epochs=2000, **stop))]
            + [(f"linear, {e} epochs", dict(lr_schedule="linear", epochs=e)) for e in (100, 200, 300, 500, 1000, 2000)]
            + [("linear, 1000, neighbour stop on", dict(lr_schedule="linear", epochs=1000, **stop))])


def is_default(kwargs) -> bool:
    if kwargs is None:
        return False
    d = dataclasses.asdict(DEFAULT)
    return all(kwargs.get(key, d[key]) == d[key] for key in ("lr_schedule", "epochs", "early_stop"))


# ------------------------------------------------------------------------------------------------
# measures
# ------------------------------------------------------------------------------------------------
def label_purity(reference, labels_ref, queries, labels_q, k=5, exclude_self=False) -> float:
    """Share of each labelled query's k nearest reference rows with the query's label."""
    ref = np.asarray(reference, np.float64)
    q = np.asarray(queries, np.float64)
    keep = np.flatnonzero((labels_q >= 0) & np.isfinite(q).all(axis=1))
    if exclude_self:
        nn = nearest_neighbors(ref, keep, k)
    else:
        sq = (ref * ref).sum(1)
        nn = np.concatenate([np.argpartition(sq[None, :] - 2 * q[keep[s:s + 1024]] @ ref.T, k - 1, axis=1)[:, :k]
                             for s in range(0, keep.size, 1024)]) if keep.size else np.empty((0, k), int)
    return float((labels_ref[nn] == labels_q[keep, None]).mean()) if keep.size else float("nan")


def knn_jaccard(a, b, k=10) -> float:
    rows = np.arange(len(a))
    return neighbor_jaccard(nearest_neighbors(a, rows, k), nearest_neighbors(b, rows, k))


def measure(case: Case, label: str, kwargs, seeds, eval_draw) -> dict:
    embs, secs = [], []
    for seed in seeds:
        t = time.perf_counter()
        if kwargs is None:
            emb = before_default(case.stimuli, seed)
        else:
            emb = embed_neurons(case.stimuli, seed=seed, progress=False, **kwargs)
        secs.append(time.perf_counter() - t)
        embs.append(emb)
    purity, cross = [], []
    for emb in embs:
        purity.append(label_purity(emb.vectors, case.labels, emb.vectors, case.labels, exclude_self=True))
        img = embed_images(case.stimuli, emb, num_images=case.num_images, responses=case.responses)
        c = [label_purity(emb.vectors, case.labels, project(st, img).vectors, lab) for st, lab in case.others]
        cross.append(float(np.nanmean(c)))
    pairs = [(embs[i].vectors, embs[i + 1].vectors) for i in range(len(embs) - 1)]
    return {
        "run": label + (" *" if is_default(kwargs) else ""),
        "epochs": float(np.mean([e.epochs_run for e in embs])),
        "seconds": float(np.mean(secs)),
        "purity": purity, "cross": cross,
        "jaccard": float(np.mean([knn_jaccard(a, b) for a, b in pairs])) if pairs else float("nan"),
        "cka": float(np.mean([linear_cka(a, b) for a, b in pairs])) if pairs else float("nan"),
        "j1": float(np.mean([objective(e.vectors, *eval_draw) / len(eval_draw[0]) for e in embs])),
    }


def spread(values) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


HEADER = ["run", "epochs run", "seconds", "5-NN purity (seeds min-max)", "cross-checkpoint purity",
          "seed 10-NN Jaccard", "seed CKA", "J1/pair"]


def cells(r: dict) -> list[str]:
    return [r["run"], f"{r['epochs']:.0f}", f"{r['seconds']:.2f}", spread(r["purity"]), spread(r["cross"]),
            f"{r['jaccard']:.3f}", f"{r['cka']:.3f}", f"{r['j1']:.4f}"]


def print_table(title: str, rows: list[dict], markdown: bool) -> None:
    print(f"\n{title}\n")
    body = [cells(r) for r in rows]
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for b in body:
            print("| " + " | ".join(b) + " |")
        return
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1056,4224", help="neurons of the planted sets (concepts: 1 per ~21 neurons)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--own", type=int, default=4, help="stimuli a neuron takes from its concept's group")
    ap.add_argument("--quick", action="store_true", help="five runs per set")
    ap.add_argument("--workspace", action="append", default=[], help="also measure a workspace's base stimuli")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cases = [planted_case(int(n), max(2, round(int(n) * 200 / 4224)), own=args.own) for n in args.sizes.split(",") if n]
    cases += [workspace_case(p) for p in args.workspace]
    seeds = list(range(args.seeds))
    print(f"defaults (conceptevo.config.EmbeddingConfig): {DEFAULT}")
    for case in cases:
        eval_draw = sample_epoch(case.stimuli.indices, 3, rng=12345)
        rows = []
        for label, kwargs in runs(args.quick):
            rows.append(measure(case, label, kwargs, seeds, eval_draw))
            if not args.markdown:
                print(" | ".join(cells(rows[-1])), flush=True)
        print_table(case.name, rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
