"""The ViT beside the CNNs in the demo, over several seeds (docs/transformers.md, "The ViT beside the CNNs").

For each seed, runs the demo (``conceptevo.demo.run_demo``: the three CNNs with SGD, ``vit_tiny`` with
AdamW, the same data, checkpoints and study) with that seed into ``OUT/seedN`` (a finished run there is
reused), then measures every model from its first to its last checkpoint:

* units: the model's units in the study (default units: the CNNs' convolutions, the ViT's MLP units);
* train top-1 at the first and the last checkpoint (the workspace's checkpoint metrics);
* distance moved: mean over units of the distance between the unit's vector in the unified space at the
  first and at the last checkpoint (:func:`conceptevo.diagnostics.metrics.distance_moved`);
* moved per 0.1 of train top-1 gained: that distance divided by the gain in tenths;
* diversity (:func:`conceptevo.diagnostics.metrics.diversity`, k-NN differential entropy of the unit
  vectors) at the first and the last checkpoint, of ``--subset`` random units per model (mean of
  ``--draws`` draws; all units where a model has no more), so that the number of units does not decide it.

Prints one table per seed, then the mean ± sd over seeds (and [min, max]), and for the ViT against each
CNN and each measure whether the seeds' ranges are apart (a difference claimed) or overlap ("cannot
tell"). ``--json`` writes the per-seed numbers.

Usage::

    python bench/vit_vs_cnn.py --out /tmp/vit-vs-cnn --seeds 0 1 2           # the full demo's sizes
    python bench/vit_vs_cnn.py --out /tmp/vit-vs-cnn-quick --seeds 0 1 2 --quick
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from conceptevo.demo import MODELS, run_demo  # noqa: E402
from conceptevo.diagnostics.metrics import distance_moved, diversity  # noqa: E402
from conceptevo.workspace import Workspace  # noqa: E402

MEASURES = [("units", "units", "d"), ("acc_first", "train top-1 first", ".3f"), ("acc_last", "train top-1 last", ".3f"),
            ("moved", "distance moved first->last", ".2f"), ("moved_per_acc", "moved per 0.1 top-1 gained", ".2f"),
            ("div_first", "diversity first", ".2f"), ("div_last", "diversity last", ".2f"),
            ("div_change", "diversity change", "+.2f")]


def subset_diversity(vectors: np.ndarray, size: int, draws: int, seed: int) -> float:
    """Mean diversity of ``draws`` random subsets of ``size`` rows (all rows, once, when there are no more)."""
    if len(vectors) <= size:
        return diversity(vectors)
    rng = np.random.default_rng(seed)
    return float(np.mean([diversity(vectors[rng.choice(len(vectors), size, replace=False)]) for _ in range(draws)]))


def measure(ws: Workspace, subset: int | None, draws: int, seed: int) -> dict[str, dict]:
    """The measures of every model of one demo workspace, first checkpoint to last."""
    first_last = {m: (ws.tags(m)[0], ws.tags(m)[-1]) for m in ws.models}
    emb = {(m, t): ws.projection(m, t) for m, tags in first_last.items() for t in tags}
    size = subset or min(len(emb[(m, t1)].neuron_ids) for m, (_, t1) in first_last.items())
    out = {}
    for m, (t0, t1) in first_last.items():
        acc = {c.tag: c.metrics["train_top1"] for c in ws.checkpoints(m)}
        moved = distance_moved(emb[(m, t0)], emb[(m, t1)]).mean
        d0 = subset_diversity(np.asarray(emb[(m, t0)].vectors), size, draws, seed)
        d1 = subset_diversity(np.asarray(emb[(m, t1)].vectors), size, draws, seed)
        gain = acc[t1] - acc[t0]
        out[m] = {"units": len(emb[(m, t1)].neuron_ids), "from": t0, "to": t1, "acc_first": acc[t0], "acc_last": acc[t1],
                  "moved": moved, "moved_per_acc": moved / (gain / 0.1) if gain > 0 else float("nan"),
                  "div_first": d0, "div_last": d1, "div_change": d1 - d0, "diversity_units": min(size, len(emb[(m, t1)].neuron_ids))}
    return out


def table(rows: dict[str, dict], cell) -> str:
    head = "| model | " + " | ".join(label for _, label, _ in MEASURES) + " |"
    lines = [head, "|" + " --- |" * (len(MEASURES) + 1)]
    for m, rec in rows.items():
        lines.append(f"| {m} | " + " | ".join(cell(rec, key, fmt) for key, _, fmt in MEASURES) + " |")
    return "\n".join(lines)


def verdicts(per_seed: list[dict], vit: str = "vit") -> list[str]:
    """The ViT against each CNN, per measure: a difference only where every seed's ViT value lies beyond every
    seed's CNN value (the ranges over seeds are apart), else "cannot tell"."""
    out = []
    cnns = [m for m in per_seed[0] if m != vit]
    for key, label, _ in MEASURES[3:]:
        v = [s[vit][key] for s in per_seed]
        parts = []
        for c in cnns:
            w = [s[c][key] for s in per_seed]
            if min(v) > max(w):
                parts.append(f"higher than {c}'s")
            elif max(v) < min(w):
                parts.append(f"lower than {c}'s")
            else:
                parts.append(f"cannot tell from {c}'s")
        out.append(f"{label}, the ViT's: " + "; ".join(parts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the runs, one per seed (reused when finished)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="the quick demo's sizes")
    ap.add_argument("--subset", type=int, default=None, help="units per diversity subset (default: the smallest model's units)")
    ap.add_argument("--draws", type=int, default=20, help="random subsets per diversity")
    ap.add_argument("--json", default=None, help="write the per-seed measures here")
    args = ap.parse_args(argv)
    per_seed = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        ws = run_demo(Path(args.out) / f"seed{seed}", quick=args.quick, seed=seed, progress=False)
        rows = measure(ws, args.subset, args.draws, seed)
        per_seed.append(rows)
        any_rec = next(iter(rows.values()))
        print(f"\nseed {seed} ({time.perf_counter() - t0:.0f} s; {any_rec['from']} -> {any_rec['to']}, "
              f"diversity of {min(r['diversity_units'] for r in rows.values())}-unit subsets)")
        print(table(rows, lambda rec, key, fmt: format(rec[key], fmt)))
        sys.stdout.flush()

    def spread(rec_name):
        def cell(_, key, fmt):
            vals = [s[rec_name][key] for s in per_seed]
            if key == "units":
                return format(vals[0], fmt)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{format(statistics.mean(vals), fmt)} ± {sd:.2f} [{format(min(vals), fmt)}, {format(max(vals), fmt)}]"
        return cell

    names = [name for name, _ in MODELS if name in per_seed[0]]
    print(f"\nmean ± sd [min, max] over seeds {args.seeds}")
    head = "| model | " + " | ".join(label for _, label, _ in MEASURES) + " |"
    print(head + "\n|" + " --- |" * (len(MEASURES) + 1))
    for m in names:
        cell = spread(m)
        print(f"| {m} | " + " | ".join(cell(None, key, fmt) for key, _, fmt in MEASURES) + " |")
    print()
    print("\n".join(verdicts(per_seed)))
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "quick": args.quick, "runs": per_seed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
