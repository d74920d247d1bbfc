"""GPU benchmark: images/s of the stimuli pass against a bare forward pass (generated inputs).

Run on a machine with a CUDA GPU and torchvision:  python bench/bench_gpu.py
(default: VGG16 at 224x224; ``--arch inception_v3 --size 299`` for the paper's other model).
For each precision mode it times, interleaved and best of 3: a bare forward pass, the stimuli pass
merging inside each layer's hook (``merge="layer"``), merging once per batch with PyTorch's max/argmax,
and the GPU default: merging once per batch with the fused Triton max/argmax
(conceptevo/stimuli/_fused.py). ``--profile`` adds the GPU time per kernel of one pass of each.
Also checks that the GPU's stimuli match the CPU's on a small pool (stated tolerance).
Target (issue 6): stimuli pass >= 0.9x the images/s of a bare forward pass.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


class GeneratedImages(torch.utils.data.Dataset):
    """Deterministic random images made on the device, a whole batch at a time."""

    def __init__(self, n, size=224, device="cuda", seed=0):
        self.n, self.size, self.device, self.seed = n, size, device, seed
        self.targets = np.zeros(n, dtype=np.int64)
        self.classes = ["x"]

    def __len__(self):
        return self.n

    def images_tensor(self, idx):
        g = torch.Generator(device=self.device).manual_seed(self.seed + int(idx[0]))
        return torch.rand(len(idx), 3, self.size, self.size, device=self.device, generator=g)

    def __getitem__(self, i):
        return self.images_tensor([i])[0], 0, i


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def bare(model, ds, bs, amp, cl, dev):
    from conceptevo.data.loader import iter_batches

    dt = torch.bfloat16 if amp else None
    with torch.inference_mode():
        for images, _, _ in iter_batches(ds, bs):
            if cl:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(torch.device(dev).type, dtype=dt, enabled=amp):
                model(images)
    sync(dev)


def stimuli(model, ds, bs, dev, amp, cl, merge, fused):
    from conceptevo import find_stimuli
    from conceptevo.stimuli import _fused

    before = _fused._disabled
    _fused._disabled = before or not fused
    try:
        find_stimuli(model, ds, k=10, batch_size=bs, device=dev, progress=False, amp=amp, channels_last=cl, merge=merge)
        sync(dev)
    finally:
        _fused._disabled = before


def build(arch):
    """A torchvision model by name (randomly initialised), or a conceptevo zoo model (for a CPU smoke run)."""
    try:
        import torchvision

        if hasattr(torchvision.models, arch):
            kw = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
            return getattr(torchvision.models, arch)(weights=None, **kw)
    except ImportError:
        pass
    from conceptevo import build_model

    return build_model(arch, in_channels=3, num_classes=10)


def profile(run, dev):
    """Self time of one pass per kernel (per operator on a CPU): total and the ten largest, in microseconds."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cuda = torch.device(dev).type == "cuda"
    with prof(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as p:
        run()
    rows = [(e.key, e.self_device_time_total if cuda else e.self_cpu_time_total, e.count) for e in p.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    return sum(r[1] for r in rows), rows[:10]


def main():
    from conceptevo import find_stimuli

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--skip-check", action="store_true", help="skip the CPU-vs-GPU agreement check")
    p.add_argument("--profile", action="store_true", help="print the GPU time per kernel of one pass of each kind")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    dev = a.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    try:
        import torchvision
        tv = torchvision.__version__
    except ImportError:
        tv = "absent"
    print(f"device: {name}  torch {torch.__version__}  torchvision {tv}")
    model = build(a.arch).to(dev).eval()
    layers = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    ds = GeneratedImages(a.images, size=a.size, device=dev)
    warm = GeneratedImages(a.batch_size * 2, size=a.size, device=dev)
    rows = []
    for amp, cl in [(False, False), (True, False), (True, True)]:
        mode = ("bf16 autocast" if amp else "fp32/tf32") + (" + channels_last" if cl else "")
        if cl:
            model.to(memory_format=torch.channels_last)
        runs = {"bare": lambda d: bare(model, d, a.batch_size, amp, cl, dev)}
        for key, merge, fused in (("layer", "layer", False), ("batch-torch", "batch", False), ("batch", "batch", True)):
            runs[key] = lambda d, m=merge, f=fused: stimuli(model, d, a.batch_size, dev, amp, cl, m, f)
        for fn in runs.values():
            fn(warm)
        best, peak = {key: float("inf") for key in runs}, {}
        for _ in range(3):
            for key, fn in runs.items():
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter(); fn(ds); best[key] = min(best[key], time.perf_counter() - t)
                peak[key] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
        rows.append((mode, a.images / best["bare"], best["bare"] / best["layer"], best["bare"] / best["batch-torch"],
                     a.images / best["batch"], best["bare"] / best["batch"], peak["batch"]))
        if a.profile:
            small = GeneratedImages(a.batch_size * 4, size=a.size, device=dev)
            for key, fn in runs.items():
                total, top = profile(lambda: fn(small), dev)
                print(f"\n[{mode}] {key}: GPU time {total / 1e3:.1f} ms for {len(small)} images; top kernels:")
                for name, t, n in top:
                    print(f"  {t / 1e3:9.2f} ms  {n:6d}x  {name[:90]}")
    print(f"\n{a.arch} at {a.size}x{a.size} ({layers} Conv2d layers hooked), {a.images} generated images, batch {a.batch_size}, "
          "best of 3, interleaved")
    print("ratios = stimuli img/s / bare img/s; layer = merge per layer, batch-torch = merge per batch with PyTorch's "
          "max/argmax, batch = the GPU default (merge per batch, fused Triton max/argmax)")
    print(f"{'mode':<32}{'bare img/s':>11}{'layer':>7}{'batch-torch':>12}{'batch img/s':>12}{'batch':>7}{'peak GiB':>9}")
    for r in rows:
        print(f"{r[0]:<32}{r[1]:>11.0f}{r[2]:>7.3f}{r[3]:>12.3f}{r[4]:>12.0f}{r[5]:>7.3f}{r[6]:>9.1f}")
    print("target: ratio >= 0.90")
    if a.skip_check or dev != "cuda":
        return

    # CPU vs GPU agreement on a small pool (fp32 on the GPU, TF32 off, so differences are float rounding only)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    small = build("vgg11").eval()
    pool = GeneratedImages(384, size=64, device="cpu", seed=7)
    cpu = find_stimuli(small, pool, k=10, batch_size=128, progress=False)
    small = small.to(dev)
    for merge in ("layer", "batch"):
        gpu = find_stimuli(small, pool, k=10, batch_size=128, device=dev, progress=False, merge=merge)
        same_sets = np.mean([set(a) == set(b) for a, b in zip(cpu.indices, gpu.indices)])
        same_order = float((cpu.indices == gpu.indices).all(axis=1).mean())
        same_pos = float((cpu.positions == gpu.positions).mean())
        rel = np.abs(cpu.values - gpu.values) / np.maximum(np.abs(cpu.values), 1e-6)
        print(f"CPU vs GPU merge={merge} (vgg11, 384 images 64x64, fp32, TF32 off): identical top-10 sets {same_sets:.4f}, "
              f"identical order {same_order:.4f}, same argmax {same_pos:.4f}, max relative strength difference {rel.max():.2e}")


if __name__ == "__main__":
    main()
