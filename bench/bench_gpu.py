"""GPU benchmark: images/s of the stimuli pass against a bare forward pass (VGG16, 224x224, generated inputs).

Run on a machine with a CUDA GPU and torchvision:  python bench/bench_gpu.py
Also checks that the GPU's stimuli match the CPU's on a small pool (stated tolerance).
Targets (issue 6): stimuli pass >= 0.9x the images/s of a bare forward pass.
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


def bare(model, ds, bs, amp, cl):
    from conceptevo.data.loader import iter_batches

    dt = torch.bfloat16 if amp else None
    with torch.inference_mode():
        for images, _, _ in iter_batches(ds, bs):
            if cl:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=dt, enabled=amp):
                model(images)
    torch.cuda.synchronize()


def main():
    import torchvision

    from conceptevo import find_stimuli

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--skip-check", action="store_true", help="skip the CPU-vs-GPU agreement check")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  torchvision {torchvision.__version__}")
    kw = {"aux_logits": False, "init_weights": False} if a.arch == "inception_v3" else {}
    model = getattr(torchvision.models, a.arch)(weights=None, **kw).to(dev).eval()
    ds = GeneratedImages(a.images, size=a.size, device=dev)
    rows = []
    for amp, cl in [(False, False), (True, False), (True, True)]:
        if cl:
            model.to(memory_format=torch.channels_last)
        bare(model, GeneratedImages(a.batch_size * 2, size=a.size, device=dev), a.batch_size, amp, cl)  # warm-up
        find_stimuli(model, GeneratedImages(a.batch_size * 2, size=a.size, device=dev), k=10, batch_size=a.batch_size, device=dev, progress=False, amp=amp, channels_last=cl)
        tb, ts = [], []
        for _ in range(3):
            t = time.perf_counter(); bare(model, ds, a.batch_size, amp, cl); tb.append(time.perf_counter() - t)
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            find_stimuli(model, ds, k=10, batch_size=a.batch_size, device=dev, progress=False, amp=amp, channels_last=cl)
            torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append((("bf16 autocast" if amp else "fp32/tf32") + (" + channels_last" if cl else ""),
                     a.images / min(tb), a.images / min(ts), min(tb) / min(ts), peak))
    print(f"\n{a.arch} at {a.size}x{a.size}, {a.images} generated images, batch {a.batch_size}, best of 3")
    print(f"{'mode':<32}{'bare img/s':>12}{'stimuli img/s':>15}{'ratio':>8}{'peak GiB':>10}")
    for r in rows:
        print(f"{r[0]:<32}{r[1]:>12.0f}{r[2]:>15.0f}{r[3]:>8.3f}{r[4]:>10.1f}")
    print("target: ratio >= 0.90")
    if a.skip_check:
        return

    # CPU vs GPU agreement on a small pool (fp32 on the GPU, TF32 off, so differences are float rounding only)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    small = torchvision.models.vgg11(weights=None).eval()
    pool = GeneratedImages(384, size=64, device="cpu", seed=7)
    cpu = find_stimuli(small, pool, k=10, batch_size=128, progress=False)
    gpu = find_stimuli(small.to(dev), GeneratedImages(384, size=64, device="cpu", seed=7), k=10, batch_size=128, device=dev, progress=False)
    same_sets = np.mean([set(a) == set(b) for a, b in zip(cpu.indices, gpu.indices)])
    same_order = float((cpu.indices == gpu.indices).all(axis=1).mean())
    rel = np.abs(cpu.values - gpu.values) / np.maximum(np.abs(cpu.values), 1e-6)
    print(f"\nCPU vs GPU (vgg11, 384 images 64x64, fp32, TF32 off): identical top-10 sets {same_sets:.4f}, "
          f"identical order {same_order:.4f}, max relative strength difference {rel.max():.2e}")


if __name__ == "__main__":
    main()
