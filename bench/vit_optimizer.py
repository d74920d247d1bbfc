"""Which optimiser trains the demo's ViT: train/test top-1 at each checkpoint, per variant and seed.

Trains ``vit_tiny`` alone, at the demo's sizes (``--quick``: the quick demo's), with the demo's data,
checkpoint schedule and seeds, once per optimiser variant; the variants of one seed run back to back
(their order rotated from seed to seed) so that a busy machine slows them alike. Prints one row per
variant, seed and checkpoint, then per variant the mean and range over seeds of the last checkpoint's
top-1 and of the training time. The measured choice is docs/transformers.md, "Training the ViT".

A variant is ``demo`` (the demo's ViT training, ``DemoSettings.train_config``) or an optimiser name, which
trains with that optimiser's defaults at batch 128, with optional overrides of
:class:`~conceptevo.models.train.TrainConfig` fields, e.g. ``adamw``, ``adamw:lr=0.002``, ``adamw:warmup=0``,
``sgd:lr=0.1,batch_size=32``.

Usage::

    python bench/vit_optimizer.py --seeds 0 1 2                            # full demo sizes
    python bench/vit_optimizer.py --quick --variants sgd adamw adamw:lr=0.003
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from conceptevo.data import open_dataset  # noqa: E402
from conceptevo.demo import DemoSettings, demo_data  # noqa: E402
from conceptevo.errors import ConceptEvoError  # noqa: E402
from conceptevo.models import build_model  # noqa: E402
from conceptevo.models.train import train  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """``adamw:lr=0.002`` -> ``("adamw:lr=0.002", {"optimizer": "adamw", "lr": 0.002, "batch_size": 128, ...})``: the
    optimiser's defaults at batch 128 (the CNNs'), with the overrides; ``demo``: the demo's own ViT settings."""
    if text == "demo":
        return text, {}
    name, _, rest = text.partition(":")
    changes: dict = {"optimizer": name, "lr": None, "weight_decay": None, "warmup": None, "batch_size": 128}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in ("lr", "weight_decay", "warmup", "momentum", "batch_size"):
            raise ConceptEvoError(f"variant {text!r}: overrides are lr=, weight_decay=, warmup=, momentum=, batch_size=; "
                                  f"got {item!r}")
        changes[key] = int(value) if key == "batch_size" else float(value)
    return text, changes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["sgd", "adamw", "demo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="the quick demo's sizes (1 epoch of 4,000 images, a smaller ViT)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    data = demo_data()
    train_set = open_dataset(data.kind, data.path, split="train", **data.options)
    test_set = open_dataset(data.kind, data.path, split="test", **data.options)
    variants = [parse_variant(v) for v in args.variants]
    options = settings.options("vit_tiny")
    print(f"data {data.kind}; ViT {options}; {settings.epochs} epochs of {settings.train_images} images; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'variant':<24} {'seed':>4} {'checkpoint':>10} {'train top-1':>11} {'test top-1':>10}")
    last: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in variants}
    tmp = Path(tempfile.mkdtemp(prefix="vit-optimizer-"))
    try:
        for i, seed in enumerate(args.seeds):
            order = variants[i % len(variants):] + variants[: i % len(variants)]
            for name, changes in order:
                model = build_model("vit_tiny", in_channels=int(train_set[0][0].shape[0]),
                                    num_classes=len(train_set.classes), seed=seed, **options)
                tc = settings.train_config("vit_tiny", seed=seed, **changes)
                t0 = time.perf_counter()
                cks = train(model, train_set, test_set, tmp / f"{seed}-{len(last[name])}-{name.replace(':', '_')}", tc,
                            progress=False)
                seconds = time.perf_counter() - t0
                for c in cks:
                    print(f"{name:<24} {seed:>4} {c.tag:>10} {c.metrics['train_top1']:>11.3f} {c.metrics['test_top1']:>10.3f}")
                last[name].append((cks[-1].metrics["train_top1"], cks[-1].metrics["test_top1"], seconds))
                sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nlast checkpoint, mean [min, max] over seeds {args.seeds}")
    print(f"{'variant':<24} {'train top-1':>22} {'test top-1':>22} {'train seconds':>16}")
    for name, rows in last.items():
        cols = []
        for j in range(3):
            vals = [r[j] for r in rows]
            fmt = ".0f" if j == 2 else ".3f"
            cols.append(f"{statistics.mean(vals):{fmt}} [{min(vals):{fmt}}, {max(vals):{fmt}}]")
        print(f"{name:<24} {cols[0]:>22} {cols[1]:>22} {cols[2]:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
