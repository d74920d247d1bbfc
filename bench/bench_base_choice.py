"""How the choice of base checkpoint changes the space, on data with known concepts (``conceptevo choose-base``).

Trains two architectures (the built-in VGG-like and ResNet-like, width 8) for
3 epochs on ConceptShapes (generated images whose concepts -- shape, colour,
texture, size, position, background -- are known), with checkpoints through
training; runs the ordinary pipeline over all of them; then builds the space on
each candidate base checkpoint (an early, a middle and the last checkpoint of
each model) and measures it with :func:`conceptevo.basechoice.choose_base`:
concept purity of other checkpoints' neurons, units covered, agreement with
the other bases and between two seeds. ``--workspace`` measures an existing
study instead (e.g. the demo's; Fashion-MNIST has class labels only).

Run: ``python bench/bench_base_choice.py --out /tmp/basechoice`` (``--markdown`` for docs).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from conceptevo.basechoice import choose_base  # noqa: E402
from conceptevo.config import BaseConfig, DataConfig, LayoutConfig, ModelConfig, StimuliConfig, StudyConfig  # noqa: E402
from conceptevo.data import open_dataset  # noqa: E402
from conceptevo.models import build_model  # noqa: E402
from conceptevo.models.train import TrainConfig, train  # noqa: E402
from conceptevo.pipeline import run_study  # noqa: E402
from conceptevo.workspace import Workspace  # noqa: E402


def shapes_study(root: Path, width: int, epochs: float, n: int, pool: int):
    data = DataConfig(kind="synthetic", pool=pool, options={"n": n, "size": 32})
    tr = open_dataset("synthetic", split="train", n=n, size=32)
    te = open_dataset("synthetic", split="test", n=2000, size=32)
    models = []
    for name, arch in (("vgg", "vgg_like"), ("resnet", "resnet_like")):
        d = root / "runs" / name
        if not (d / "checkpoints.json").exists():
            tc = TrainConfig(epochs=epochs, lr=0.05, seed=0, first_epoch_checkpoints=4)
            train(build_model(arch, in_channels=3, num_classes=10, width=width, seed=0), tr, te, d, tc, progress=False)
        models.append(ModelConfig(name, arch, str(d), {"width": width}))
    config = StudyConfig(out=str(root / "study"), data=data, models=models, base=BaseConfig(model="vgg"),
                         stimuli=StimuliConfig(k=10), layout=LayoutConfig(method="pca")).validate()
    return run_study(config, progress=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="basechoice-out")
    ap.add_argument("--workspace", default=None, help="measure this study instead of training one")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    if args.workspace:
        ws = Workspace(args.workspace)
    else:
        ws = shapes_study(Path(args.out), args.width, args.epochs, args.images, args.pool)
    cands = []
    for m in ws.models:
        tags = ws.tags(m)
        for t in dict.fromkeys([tags[1 if len(tags) > 2 else 0], tags[len(tags) // 2], tags[-1]]):
            cands.append(f"{m}:{t}")
    study_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    choice = choose_base(ws, candidates=cands)
    built = "" if args.workspace else f"training and study {study_s:.0f} s, "
    print(f"study {ws.path}: {sum(len(ws.tags(m)) for m in ws.models)} checkpoints, {choice.queries} query neurons "
          f"({choice.concepts}); {built}choose-base {time.perf_counter() - t0:.0f} s\n")
    print(choice.markdown() if args.markdown else choice.table())
    print(f"\nrecommended base: {choice.recommended}")
    for r in choice.reasons:
        print(f"  - {r}")
    print("\nagreement between bases (10-NN Jaccard):")
    names = [c.name for c in choice.candidates]
    for n, row in zip(names, choice.agreement_matrix):
        print(f"  {n:<16} " + " ".join(f"{v:.3f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
