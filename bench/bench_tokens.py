"""Stimuli pass over token-shaped units against a bare forward pass of the same inputs (CPU).

Targets: issue 15, a ViT's stimuli pass <= 1.15x a bare eval forward over the same images at the same
batch size (as for CNNs, bench_stimuli.py); issue 16, the same for a language model over the same
windows. Units are every block's MLP hidden units (``[B, tokens, hidden]``, channels last):

* ``vit_tiny``: conceptevo's built-in ViT (28x28 images, 50 tokens, 4 blocks of width 64, MLP 128);
* ``vit_small``: the same ViT class on 32x32 images (65 tokens, width 96, 3 heads, MLP 384, 4 blocks);
* ``lm_tiny``: the text demo's model (2 layers, d_model 64, MLP 256, context 64; 65 tokens in the vocabulary);
* ``neox``: a GPT-NeoX (Pythia's architecture) built from a ``transformers`` config with random weights
  (``--neox-layers``, ``--neox-width``, ``--context``, ``--vocab``; MLP 4x the width as in Pythia).

Weights are untrained and inputs random (images from the synthetic set, token ids uniform): the pass's
cost does not depend on either. The machine is shared, so every repeat runs the bare forward and the
pass back to back, in alternating order, and the ratio of each pair is kept: the report gives the
median pair ratio and the spread (min-max) of wall time, and the same for process CPU time (user +
sys), which other processes' load disturbs less. ``--parts`` splits the pass's cost: the forward with
hooks that do nothing, and with hooks that only take the max over tokens. ``--memory`` adds the peak memory of each (process
RSS growth, in a fresh subprocess) per token; ``--disk`` the bytes of the saved stimuli.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from conceptevo.units import strength

LAYERS = {"vit_tiny": ["blocks.*.mlp.act"], "vit_small": ["blocks.*.mlp.act"], "lm_tiny": ["blocks.*.mlp.act"],
          "neox": ["gpt_neox.layers.*.mlp.act"]}


def build(a):
    """``(model, dataset, tokens per item, description)`` for ``a.model``."""
    torch.manual_seed(0)
    if a.model in ("vit_tiny", "vit_small"):
        from conceptevo.data import open_dataset
        from conceptevo.models.vit import ViT

        size = 28 if a.model == "vit_tiny" else 32
        ds = open_dataset("synthetic", split="train", n=a.items, size=size)
        kw = {} if a.model == "vit_tiny" else dict(dim=96, heads=3, depth=4, mlp=384)
        model = ViT(int(ds[0][0].shape[0]), 10, image_size=size, **kw).eval()
        return model, ds, 1 + (size // 4) ** 2, f"{a.model}, {size}x{size} images"
    from conceptevo.data.text import TextWindows

    rng = np.random.default_rng(0)
    if a.model == "lm_tiny":
        from conceptevo.models.lm import lm_tiny
        from conceptevo.models.train_lm import DEMO_DEFAULTS

        ctx, vocab = DEMO_DEFAULTS["context"], 65
        model = lm_tiny(vocab, d_model=DEMO_DEFAULTS["d_model"], n_layers=DEMO_DEFAULTS["n_layers"],
                        n_heads=DEMO_DEFAULTS["n_heads"], context=ctx)
        desc = f"lm_tiny (the text demo's: {DEMO_DEFAULTS['n_layers']} layers, d_model {DEMO_DEFAULTS['d_model']}, context {ctx})"
    else:
        from conceptevo.models.lm import gpt_neox_tiny

        ctx, vocab, w = a.context, a.vocab, a.neox_width
        model = gpt_neox_tiny(vocab, hidden_size=w, num_hidden_layers=a.neox_layers, num_attention_heads=a.neox_heads,
                              intermediate_size=4 * w, context=ctx)
        params = sum(p.numel() for p in model.parameters())
        desc = (f"GPT-NeoX from a config, random weights: {a.neox_layers} layers, width {w}, MLP {4 * w}, "
                f"{a.neox_heads} heads, context {ctx}, vocabulary {vocab}, {params / 1e6:.1f}M parameters")
    tokens = rng.integers(0, vocab, size=a.items * ctx + 1)
    return model.eval(), TextWindows(tokens, context=ctx), ctx, f"{desc}, windows of {ctx} random tokens"


def bare_pass(model, ds, batch_size):
    from conceptevo.data.loader import iter_batches

    with torch.inference_mode():
        for x, _, _ in iter_batches(ds, batch_size):
            model(x)


def stimuli_pass(model, ds, a, merge="layer"):
    from conceptevo import find_stimuli

    return find_stimuli(model, ds, k=a.k, layers=LAYERS[a.model], batch_size=a.batch_size, progress=False, merge=merge)


def hooked_pass(model, ds, a, fn):
    """The bare forward with the pass's hooks calling ``fn(name, output)`` (for --parts)."""
    from conceptevo.data.loader import iter_batches
    from conceptevo.hooks import capture
    from conceptevo.layers import resolve_layers

    with torch.inference_mode(), capture(model, resolve_layers(model, LAYERS[a.model]), fn) as outs:
        for x, _, _ in iter_batches(ds, a.batch_size):
            outs.clear()
            model(x)


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(a, which: str) -> None:
    """In a fresh process: peak RSS during one ``which`` pass minus the RSS just before it (Linux: the peak
    is reset through /proc/self/clear_refs after a small warm-up of both passes)."""
    model, ds, _, _ = build(a)
    from conceptevo.data import Subset

    warm = type(ds)(ds.tokens[: 2 * ds.context + 1], context=ds.context) if getattr(ds, "token_windows", False) else Subset(ds, [0, 1])
    bare_pass(model, warm, 2)
    stimuli_pass(model, warm, argparse.Namespace(**{**vars(a), "batch_size": 2, "k": 1}))
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    bare_pass(model, ds, a.batch_size) if which == "bare" else stimuli_pass(model, ds, a)
    print(json.dumps({"growth_kb": _status_kb("VmHWM") - before}))


def child_args(a) -> list[str]:
    out = []
    for key, value in vars(a).items():
        if key in ("memory", "disk", "memory_child", "parts") or value is None:
            continue
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=tuple(LAYERS), default="vit_tiny")
    p.add_argument("--items", "--images", type=int, default=2000, help="images or windows in the pool")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--merge", choices=("layer", "batch", "both"), default="layer",
                   help="the pass's merge mode: per layer (the CPU default), per batch (the GPU default), or both")
    p.add_argument("--context", type=int, default=256, help="neox: window length")
    p.add_argument("--vocab", type=int, default=50304, help="neox: vocabulary size (Pythia's is 50304)")
    p.add_argument("--neox-layers", type=int, default=4)
    p.add_argument("--neox-width", type=int, default=256)
    p.add_argument("--neox-heads", type=int, default=8)
    p.add_argument("--parts", action="store_true",
                   help="also time the forward with the pass's hooks doing nothing, and doing only the max over tokens")
    p.add_argument("--memory", action="store_true", help="also peak RSS growth of each pass, per token")
    p.add_argument("--disk", action="store_true", help="also the bytes of the saved stimuli")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        memory_child(a, a.memory_child)
        return
    model, ds, tokens, desc = build(a)
    merges = ("layer", "batch") if a.merge == "both" else (a.merge,)
    runs = {"bare": lambda: bare_pass(model, ds, a.batch_size)}
    for m in merges:
        runs[m] = lambda m=m: stimuli_pass(model, ds, a, m)
    if a.parts:
        runs["hooks only"] = lambda: hooked_pass(model, ds, a, lambda name, out: True)
        runs["hooks + max over tokens"] = lambda: hooked_pass(model, ds, a, lambda name, out: strength(out, -1))
    for fn in runs.values():  # warm-up (and numba's compilation, cached on disk after the first run)
        fn()
    times = {key: [] for key in runs}
    for r in range(a.repeats):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[key].append(timed(runs[key]))
    stim = runs[merges[0]]()
    n, total_tokens = len(ds), len(ds) * tokens
    print(f"stimuli pass vs bare forward: {desc}; {len(stim)} units in {len(stim.layers)} layers of "
          f"[B, {tokens}, {stim.layers[0].channels}]; {n} items ({total_tokens:,} tokens), batch {a.batch_size}, "
          f"k {a.k}, {torch.get_num_threads()} threads; {a.repeats} repeats, bare and pass back to back in "
          f"alternating order")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    for j, what in ((0, "wall"), (1, "CPU")):
        bare = [t[j] for t in times["bare"]]
        line = f"  {what:4s}: bare median {med(bare):.3f} s ({1e3 * med(bare) / total_tokens:.4f} ms/token)"
        for m in list(runs)[1:]:
            ratios = [s[j] / b[j] for s, b in zip(times[m], times["bare"])]
            what = f"pass merging per {m}" if m in merges else m
            line += (f"; {what} median {med([t[j] for t in times[m]]):.3f} s, ratio median "
                     f"{med(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
        print(line)
    print("  target <= 1.15 (the CPU default merges per layer)")
    if a.memory:
        growth = {}
        for which in ("bare", "pass"):
            out = subprocess.run([sys.executable, __file__, *child_args(a), "--memory-child", which],
                                 capture_output=True, text=True, check=True).stdout
            growth[which] = json.loads(out.strip().splitlines()[-1])["growth_kb"] * 1024
        per_batch = a.batch_size * tokens
        print(f"  peak RSS growth (fresh process, batch of {per_batch:,} tokens): bare {growth['bare'] / 2**20:.1f} MiB "
              f"({growth['bare'] / per_batch / 1024:.1f} KiB/token), pass {growth['pass'] / 2**20:.1f} MiB "
              f"({growth['pass'] / per_batch / 1024:.1f} KiB/token)")
    if a.disk:
        with tempfile.TemporaryDirectory() as d:
            stim.save(d)
            sizes = {f.name: f.stat().st_size for f in Path(d).iterdir()}
        arrays = sum(v for name, v in sizes.items() if name.endswith(".npy"))
        print(f"  saved stimuli: {sum(sizes.values()):,} bytes for {len(stim)} units x k {a.k} "
              f"({arrays / (len(stim) * a.k):.1f} bytes per entry in the .npy arrays, incl. mean/std; "
              f"neurons.json {sizes.get('neurons.json', 0):,} bytes): " + ", ".join(f"{k} {v:,}" for k, v in sorted(sizes.items())))


if __name__ == "__main__":
    main()
