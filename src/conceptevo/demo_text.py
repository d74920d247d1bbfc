"""The text demo: two small language models (two seeds) trained on Shakespeare, their units in one space.

``conceptevo demo --text`` trains :func:`~conceptevo.models.lm.lm_tiny` twice
(seeds 0 and 1) with :data:`~conceptevo.models.train_lm.DEMO_DEFAULTS` (21
checkpoints: step 0, log-spaced early steps, then every 200 steps), runs the
study on windows of the same corpus (a unit's stimuli are its top-k windows,
shown as contexts around the argmax character) and writes the space per
checkpoint and one unit's top contexts per checkpoint. ``--quick`` trains on
the generated corpus (:func:`~conceptevo.data.text.generated_text`) for a few
steps: a smoke test under a minute. Without the ``shakespeare`` package the
full demo says how to install it.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from .config import DataConfig, EmbeddingConfig, LayoutConfig, ModelConfig, StimuliConfig, StudyConfig
from .models.train_lm import DEMO_DEFAULTS, LOG_SPACED_UNTIL, train_text
from .pipeline import run_study

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TextDemoSettings:
    corpus: str = "shakespeare"
    seeds: tuple = (0, 1)
    steps: int = DEMO_DEFAULTS["steps"]
    every: int = DEMO_DEFAULTS["every"]
    log_until: int = LOG_SPACED_UNTIL  # log-spaced checkpoints 1, 2, 4, ... 512, then every `every` steps: 21 in all
    context: int = DEMO_DEFAULTS["context"]
    d_model: int = DEMO_DEFAULTS["d_model"]
    n_layers: int = DEMO_DEFAULTS["n_layers"]
    n_heads: int = DEMO_DEFAULTS["n_heads"]
    pool: int = 3000               # windows in the stimulus pool
    k: int = 20                    # contexts per unit (common max-activating-context viewers show about 20)
    epochs: int = 100              # neuron-embedding epochs
    layout: str = "pca"

    @classmethod
    def quick(cls) -> "TextDemoSettings":
        return cls(corpus="generated", steps=40, every=20, log_until=4, context=32, d_model=32, n_heads=2,
                   pool=300, k=10, epochs=20)


def run_text_demo(out: str | Path = "demo-text-out", quick: bool = False, progress: bool = True):
    """Train the two models (unless their runs are complete in ``out/runs``), run the study; return the workspace."""
    from .data.text import shakespeare_files

    s = TextDemoSettings.quick() if quick else TextDemoSettings()
    if s.corpus == "shakespeare":
        shakespeare_files()  # a clear error with the install command when the package is missing
    torch.set_num_threads(1)  # measured faster than two threads on a loaded 2-core machine (models/train_lm.py)
    out = Path(out)
    runs = []
    for seed in s.seeds:
        run = out / "runs" / f"seed{seed}"
        if not (run / f"step{s.steps}").is_dir():
            t0 = time.perf_counter()
            train_text(run, corpus=s.corpus, seed=seed, context=s.context, d_model=s.d_model, n_layers=s.n_layers,
                       n_heads=s.n_heads, steps=s.steps, every=s.every, log_until=s.log_until)
            log.info("trained seed %d in %.0f s", seed, time.perf_counter() - t0)
        runs.append(run)
    opts = {"d_model": s.d_model, "n_layers": s.n_layers, "n_heads": s.n_heads}
    config = StudyConfig(
        out=str(out / "workspace"),
        data=DataConfig(kind="text", corpus=s.corpus, context=s.context, pool=s.pool, seed=0),
        models=[ModelConfig(name=f"seed{seed}", arch="lm_tiny", checkpoints=str(run), options=opts)
                for seed, run in zip(s.seeds, runs)],
        stimuli=StimuliConfig(k=s.k, layers=["blocks.*.mlp.act"]),
        embedding=dataclasses.replace(EmbeddingConfig(), epochs=s.epochs),
        layout=dataclasses.replace(LayoutConfig(), method=s.layout),
    ).validate()
    return run_study(config, progress=progress)


__all__ = ["TextDemoSettings", "run_text_demo"]
