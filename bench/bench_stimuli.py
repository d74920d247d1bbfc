"""Stimuli pass against a bare forward pass, and its peak memory against the pool size.

Targets (issue 2): wall time <= 1.15x a bare eval forward over the same images at
the same batch size; peak memory for 60,000 images within 10% of 6,000.
Both sides are measured in this one run, interleaved, and the best of the
repeats is kept (this machine is noisy; compare ratios, not absolute times).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def dataset(n: int):
    from conceptevo.data import find_fashion_mnist, open_dataset, Subset

    if find_fashion_mnist():
        ds = open_dataset("fashion-mnist", split="train")
    else:
        ds = open_dataset("synthetic", split="train", n=max(n, 6000), size=28, channels=1)
    return Subset(ds, list(range(min(n, len(ds))))) if n < len(ds) else ds


def bare_pass(model, ds, batch_size):
    from conceptevo.data.loader import iter_batches

    with torch.inference_mode():
        for images, _, _ in iter_batches(ds, batch_size):
            model(images)


def time_ratio(n: int, batch_size: int, repeats: int, arch: str):
    from conceptevo import build_model, find_stimuli

    torch.manual_seed(0)
    ds = dataset(n)
    model = build_model(arch, in_channels=int(ds[0][0].shape[0]), num_classes=10).eval()
    bare_pass(model, dataset(512), batch_size)  # warm-up
    runs = {"bare": lambda: bare_pass(model, ds, batch_size)}
    for merge in ("layer", "batch"):
        runs[merge] = lambda m=merge: find_stimuli(model, ds, k=10, batch_size=batch_size, progress=False, merge=m)
    best = {key: float("inf") for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            t = time.perf_counter(); fn(); best[key] = min(best[key], time.perf_counter() - t)
    return best


def memory_child(n: int, batch_size: int, arch: str) -> None:
    """Run in a subprocess: peak RSS growth during one stimuli pass over n images."""
    from conceptevo import build_model, find_stimuli

    torch.manual_seed(0)
    ds = dataset(n)
    model = build_model(arch, in_channels=int(ds[0][0].shape[0]), num_classes=10).eval()
    find_stimuli(model, dataset(batch_size * 2), k=10, batch_size=batch_size, progress=False)  # warm-up allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    find_stimuli(model, ds, k=10, batch_size=batch_size, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": len(ds), "peak_kb": after, "growth_kb": after - before}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", default="vgg_like")
    p.add_argument("--memory-child", type=int, default=None)
    a = p.parse_args()
    if a.memory_child:
        memory_child(a.memory_child, a.batch_size, a.arch)
        return
    t = time_ratio(a.images, a.batch_size, a.repeats, a.arch)
    print(f"stimuli pass vs bare forward ({a.arch}, {a.images} images, batch {a.batch_size}, best of {a.repeats}, interleaved):")
    print(f"  bare forward {t['bare']:.2f} s   stimuli pass merging per layer (the CPU default) {t['layer']:.2f} s, "
          f"ratio {t['layer'] / t['bare']:.3f}  (target <= 1.15)")
    print(f"  stimuli pass merging per batch (the GPU default) {t['batch']:.2f} s, ratio {t['batch'] / t['bare']:.3f}")
    mem = {}
    for n in (6000, 60000):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--batch-size", str(a.batch_size), "--arch", a.arch],
                             capture_output=True, text=True, check=True).stdout
        mem[n] = json.loads(out.strip().splitlines()[-1])
    g6, g60 = mem[6000]["growth_kb"], mem[60000]["growth_kb"]
    p6, p60 = mem[6000]["peak_kb"], mem[60000]["peak_kb"]
    print("peak memory of one stimuli pass (process RSS):")
    print(f"  6,000 images: peak {p6 / 1024:.0f} MiB (pass adds {g6 / 1024:.1f} MiB)   "
          f"{mem[60000]['n']:,} images: peak {p60 / 1024:.0f} MiB (pass adds {g60 / 1024:.1f} MiB)")
    print(f"  peak ratio {p60 / p6:.3f} (target <= 1.10; the dataset array itself, 47 MiB for 60,000 28x28 images, is included)")


if __name__ == "__main__":
    main()
