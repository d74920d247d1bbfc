"""Benchmark of the embedding stage at VGG16 scale, on synthetic stimuli.

Stimuli: 4,224 neurons in 13 layers of 64..512 channels (VGG16's convolutions),
k = 10, a 50,000-image pool. Co-activation structure: every neuron belongs to
one of ``--concepts`` latent concepts, each owning a group of 100 images; a
neuron takes 8 of its stimuli from its concept's group (popular images more
often, 1/rank weights) and 2 from the whole pool.

Measures
1. one epoch of Algorithm 1: the plain-Python per-pair reference against the
   numba kernel (both including the epoch's random draws, same seed, same
   draws), their ratio, and J1 of both after the same epochs on one fixed
   evaluation draw;
2. a full default ``embed_neurons`` run, and how often a neuron's 10 nearest
   neighbours share its latent concept (bench_fidelity.py goes further);
3. ``embed_images`` to the least-squares optimum, against an independent
   direct solve (sparse LU of A A^T) and against ``method="gd"`` for a fixed
   number of steps;
4. the fidelity of the base neurons' projection.

Run: ``.venv/bin/python bench/bench_embedding.py`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import types

import numpy as np
import scipy.sparse.linalg as spla

from conceptevo.embedding import (embed_images, embed_neurons, embed_neurons_reference, objective, sample_epoch,
                                  stimulus_matrix)
from conceptevo.embedding.neurons import _draw, _sgd_epoch, _sgd_epoch_python
from conceptevo.embedding.pairs import _ImageGroups, stimulus_memberships
from conceptevo.projection import fidelity, holdout_fidelity, project

VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def synthetic_stimuli(channels=VGG16_CHANNELS, k=10, pool=50_000, concepts=150, group=100, own=8, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(channels)
    ids = [f"features.{layer}:{c}" for layer, ch in enumerate(channels) for c in range(ch)]
    groups = rng.permutation(pool)[: concepts * group].reshape(concepts, group)
    concept = rng.integers(0, concepts, n)
    indices = planted_indices(concept, groups, k, pool, own, rng)
    stimuli = types.SimpleNamespace(neuron_ids=ids, indices=indices, values=np.zeros((n, k), np.float32),
                                    num_images=pool)
    image_concept = np.full(pool, -1)
    image_concept[groups] = np.arange(concepts)[:, None]
    return stimuli, concept, image_concept


def planted_indices(concept, groups, k, pool, own, rng):
    """Stimuli ``[N, k]``: ``own`` images from the neuron's concept group (popular ones more often), the rest from the pool."""
    group = groups.shape[1]
    weights = 1.0 / np.arange(1, group + 1)
    weights /= weights.sum()
    indices = np.empty((len(concept), k), np.int64)
    for i, c in enumerate(concept):
        chosen = list(rng.choice(groups[c], own, replace=False, p=weights))
        while len(chosen) < k:
            x = int(rng.integers(pool))
            if x not in chosen:
                chosen.append(x)
        indices[i] = chosen
    return indices


def synthetic_responses(stimuli, concept, image_concept, top=10, seed=3):
    """Stand-in for ``top_responses``: an image of concept c excites random neurons of c; others, any neurons."""
    rng = np.random.default_rng(seed)
    n = len(stimuli.neuron_ids)
    members = [np.flatnonzero(concept == c) for c in range(concept.max() + 1)]
    out = rng.integers(0, n, size=(len(image_concept), top))
    for x in np.flatnonzero(image_concept >= 0):
        pool = members[image_concept[x]]
        if pool.size:
            out[x] = rng.choice(pool, top, replace=pool.size < top)
    return out


def knn_concept_purity(vectors, concept, k=10):
    v = vectors.astype(np.float64)
    sq = (v * v).sum(1)
    hits = 0
    for s in range(0, len(v), 1024):
        d = sq[None, :] - 2 * v[s:s + 1024] @ v.T
        d[np.arange(d.shape[0]), np.arange(s, s + d.shape[0])] = np.inf
        nn = np.argpartition(d, k, axis=1)[:, :k]
        hits += int((concept[nn] == concept[s:s + 1024, None]).sum())
    return hits / (len(v) * k)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def row(table, name, value, note=""):
    table.append((name, value, note))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", type=int, default=150)
    ap.add_argument("--python-epochs", type=int, default=2,
                    help="full epochs of the Python reference for the J1 comparison (0: skip)")
    ap.add_argument("--python-pairs", type=int, default=3000,
                    help="pairs of one epoch timed in Python, extrapolated to the whole epoch")
    ap.add_argument("--gd-steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = []

    stimuli, concept, image_concept = synthetic_stimuli(concepts=args.concepts, seed=args.seed)
    n = len(stimuli.neuron_ids)
    groups = _ImageGroups(*stimulus_memberships(stimuli.indices))
    draws = _draw(groups, n, 3, np.random.default_rng(1))
    num_pairs = len(draws[0])
    row(table, "neurons / pairs per epoch", f"{n} / {num_pairs}", "k=10, 50,000-image pool")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    row(table, "CPU cores / load average", f"{os.cpu_count()} / {load:.1f}", "timings are single-threaded")

    # ---- 1. per-epoch time, Python reference vs numba kernel (same draws) -------------------
    init = np.random.default_rng(0).uniform(-0.5, 0.5, size=(n, 30)).astype(np.float32)
    _sgd_epoch(init.copy(), *[d[:10] for d in draws], 0.05)  # compile / load from cache
    rng = np.random.default_rng(2)

    def numba_epoch():
        v = init.copy()
        _sgd_epoch(v, *_draw(groups, n, 3, rng), 0.05)

    t_numba = best_of(numba_epoch, 20)
    m = min(args.python_pairs, num_pairs)

    def python_part():
        v = init.copy()
        d = _draw(groups, n, 3, rng)
        _sgd_epoch_python(v, *[x[:m] for x in d[:4]], 0.05)

    t_part = best_of(python_part, 5)
    t_python = t_part * num_pairs / m
    row(table, "epoch time, Python per-pair (s)", f"{t_python:.3f}",
        (f"best of 5 on {m} of {num_pairs} pairs, extrapolated" if m < num_pairs else "full epoch, best of 5"))
    row(table, "epoch time, numba kernel (s)", f"{t_numba:.4f}", "incl. the epoch's draws; best of 20")
    row(table, "speed-up numba / Python", f"{t_python / t_numba:.0f}x", "target >= 100x")

    # ---- J1 after the same epochs, both implementations -------------------------------------
    ev = sample_epoch(stimuli.indices, 3, rng=12345)
    j_init = objective(init, *ev) / len(ev[0])
    if args.python_epochs:
        e = args.python_epochs
        t = time.perf_counter()
        ref = embed_neurons_reference(stimuli, epochs=e, seed=args.seed)
        t_ref = time.perf_counter() - t
        fast = embed_neurons(stimuli, epochs=e, tol=0, seed=args.seed, progress=False)
        j_ref = objective(ref.vectors, *ev) / len(ev[0])
        j_fast = objective(fast.vectors, *ev) / len(ev[0])
        row(table, f"J1/pair after {e} epochs, Python", f"{j_ref:.5f}", f"{t_ref:.1f}s; init {j_init:.5f}")
        row(table, f"J1/pair after {e} epochs, numba", f"{j_fast:.5f}",
            f"max |dv| vs Python {np.abs(ref.vectors - fast.vectors).max():.1e}")

    # ---- 2. a default run ---------------------------------------------------------------------
    t = time.perf_counter()
    base = embed_neurons(stimuli, seed=args.seed, progress=False)
    t_full = time.perf_counter() - t
    row(table, "embed_neurons defaults: epochs run", f"{base.epochs_run}",
        f"{base.config['stop_reason']}; {t_full:.1f}s")
    row(table, "J1/pair, evaluation draw", f"{objective(base.vectors, *ev) / len(ev[0]):.5f}",
        f"init {j_init:.5f}")
    purity = knn_concept_purity(base.vectors, concept)
    row(table, "10-NN share latent concept", f"{purity:.3f}", f"chance {1 / args.concepts:.3f}")

    # ---- 3. image embedding -------------------------------------------------------------------
    embed_images(stimuli, base)  # warm-up (imports, allocations)
    t = time.perf_counter()
    img = embed_images(stimuli, base)
    t_img = time.perf_counter() - t
    row(table, "embed_images lstsq (s)", f"{t_img:.2f}", f"{img.info['iterations']} CGLS iterations; target < 5 s")
    row(table, "error per neuron, lstsq", f"{img.rmse:.2e}",
        f"relative {img.info['relative_error']:.1e}; {img.info['num_covered']} covered images for "
        f"{img.info['num_neurons']} neurons ({img.info['determined']}determined)")

    A, images, rows = stimulus_matrix(stimuli.indices)
    B = base.vectors[rows].astype(np.float64)
    t = time.perf_counter()
    lu = spla.splu((A @ A.T).tocsc(), permc_spec="MMD_AT_PLUS_A")
    W = A.T @ lu.solve(B)
    t_lu = time.perf_counter() - t
    rmse_lu = float(np.sqrt(np.mean(np.sum((A @ W - B) ** 2, axis=1))))
    row(table, "error per neuron, direct optimum (sparse LU)", f"{rmse_lu:.2e}",
        f"{t_lu:.2f}s; max |dW| vs lstsq {np.abs(W - img.vectors[images]).max():.1e}")
    t = time.perf_counter()
    gd = embed_images(stimuli, base, method="gd", max_iter=args.gd_steps, tol=0)
    row(table, f"error per neuron, gd, {args.gd_steps} steps (Eq 4)", f"{gd.rmse:.2e}", f"{time.perf_counter() - t:.2f}s")

    # ---- 4. projection ------------------------------------------------------------------------
    fid = fidelity(base, project(stimuli, img))
    row(table, "base projection distance", f"{fid['mean_distance']:.2e}",
        f"typical inter-neuron {fid['typical_distance']:.2f}; self-match {fid['self_match']:.3f}")
    t = time.perf_counter()
    responses = synthetic_responses(stimuli, concept, image_concept)
    hold = holdout_fidelity(stimuli, base, fraction=0.2, responses=responses)
    row(table, "held-out 20%: distance / typical", f"{hold['relative_mean']:.3f}",
        f"projected from images fitted without them; {time.perf_counter() - t:.1f}s")
    proj = hold["projected"]
    own = np.array([int(i) for i in map(base.index_of, proj.neuron_ids)])
    b = base.vectors.astype(np.float64)
    nearest = np.argmin((b * b).sum(1)[None, :] - 2 * proj.vectors.astype(np.float64) @ b.T, axis=1)
    row(table, "held-out 20%: nearest learned shares concept", f"{np.mean(concept[nearest] == concept[own]):.3f}",
        f"self-match {hold['self_match']:.3f} (~28 same-concept twins per neuron)")

    width = max(len(r[0]) for r in table)
    vw = max(len(r[1]) for r in table)
    print(f"{'measure':<{width}}  {'value':>{vw}}  note")
    print("-" * (width + vw + 40))
    for name, value, note in table:
        print(f"{name:<{width}}  {value:>{vw}}  {note}")


if __name__ == "__main__":
    main()
