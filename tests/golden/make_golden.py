"""Build the golden study's checkpoints (once) and its expected outputs (whenever the outputs change on purpose).

    python tests/golden/make_golden.py            # write expected.npz from the committed checkpoints
    python tests/golden/make_golden.py --ckpts    # retrain the tiny checkpoints too (changes every figure)

The checkpoints are committed so that the expected outputs depend on conceptevo's code alone, not on
training. Rewrite expected.npz only for a change of output that is intended, and say why in the commit.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CKPTS = HERE / "ckpts"
EXPECTED = HERE / "expected.npz"
MODELS = (("vgg", "vgg_like"), ("res", "resnet_like"))


def train_checkpoints() -> None:
    import torch

    from conceptevo import build_model
    from conceptevo.data import open_dataset
    from conceptevo.models.train import TrainConfig, train

    torch.manual_seed(0)
    tr = open_dataset("synthetic", split="train", n=600, size=28)
    te = open_dataset("synthetic", split="test", n=600, size=28)
    shutil.rmtree(CKPTS, ignore_errors=True)
    for name, arch in MODELS:
        m = build_model(arch, in_channels=3, num_classes=10, width=4)
        train(m, tr, te, CKPTS / name, TrainConfig(epochs=1, batch_size=64, first_epoch_checkpoints=2,
                                                   eval_images=200, bn_images=200), progress=False)


def study_config(out):
    from conceptevo.config import (BaseConfig, DataConfig, EmbeddingConfig, LayoutConfig, ModelConfig,
                                   StimuliConfig, StudyConfig)

    models = [ModelConfig(name=n, arch=a, checkpoints=str(CKPTS / n), options={"width": 4}, allow_chance=True)
              for n, a in MODELS]
    return StudyConfig(out=str(out), data=DataConfig(kind="synthetic", pool=300, options={"n": 600, "size": 28}),
                       models=models, base=BaseConfig(model="vgg"), stimuli=StimuliConfig(k=5),
                       embedding=EmbeddingConfig(dim=8, epochs=60), layout=LayoutConfig(method="pca")).validate()


def outputs(out) -> dict[str, np.ndarray]:
    """Every array the study produces, by a stable name."""
    from conceptevo import Workspace
    from conceptevo.pipeline import run_study

    run_study(study_config(out), progress=False)
    ws = Workspace(out)
    res: dict[str, np.ndarray] = {}
    emb = ws.neuron_embedding()
    res["neurons/ids"] = np.asarray(emb.neuron_ids).astype(str)
    res["neurons/vectors"] = np.asarray(emb.vectors)
    img = ws.image_embedding()
    res["images/vectors"] = np.asarray(img.vectors)
    for m in ws.models:
        for t in ws.tags(m):
            s = ws.stimuli(m, t, mmap=False)
            res[f"{m}/{t}/ids"] = np.asarray(s.neuron_ids).astype(str)
            res[f"{m}/{t}/indices"] = np.asarray(s.indices)
            res[f"{m}/{t}/values"] = np.asarray(s.values)
            res[f"{m}/{t}/positions"] = np.asarray(s.positions)
            res[f"{m}/{t}/projection"] = np.asarray(ws.projection(m, t).vectors)
            res[f"{m}/{t}/layout"] = np.asarray(ws.layout(m, t))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpts", action="store_true", help="retrain the committed checkpoints first")
    a = ap.parse_args(argv)
    if a.ckpts or not CKPTS.exists():
        train_checkpoints()
    with tempfile.TemporaryDirectory() as d:
        res = outputs(Path(d) / "study")
    np.savez_compressed(EXPECTED, **res)
    print(f"wrote {EXPECTED} ({len(res)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
