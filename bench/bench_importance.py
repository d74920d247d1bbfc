"""Benchmark: importance of concept evolutions (Eqs 5-7) and the reversion evaluation.

On a VGG-like CNN for 1x28x28 inputs (8 convs: 32,32,64,64,128,128,256,256
channels, with pooling) and 128 random images, measured side by side in one run:

(a) reference: one forward + backward of the images through model_from, plus
    one forward through model_to;
(b) ``evolution_importance`` over all 8 conv layers (target: <= 3x (a));
(c) a per-image, per-layer, per-neuron loop (for every image, layer and neuron,
    its own forward and backward through model_from plus a forward through
    model_to). It is far too slow to run whole, so a few neurons of every layer
    are timed on a few images and the full cost is extrapolated
    (sum over layers of time-per-neuron x channels x images; target: >= 100x (b));
(d) the reversion evaluation for one class (128 train + 128 test images,
    4 bins + random per layer), with the per-layer batch fork on and off.

Usage: python bench/bench_importance.py [--device cuda] [--images 128] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from conceptevo.importance import evaluate_reversion, evolution_importance, reversion_counts
from conceptevo.importance._common import eval_mode
from conceptevo.importance.reversion import _bin_masks
from conceptevo.layers import resolve_layers

CLASSES = 10


def vgg_like() -> nn.Sequential:
    layers, c_in = [], 1
    for i, c in enumerate([32, 32, 64, 64, 128, 128, 256, 256]):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i in (1, 3, 5):
            layers.append(nn.MaxPool2d(2))
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, CLASSES))


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 28, 28, generator=g)
        self.targets = (np.arange(n) % CLASSES).astype(np.int64)
        self.classes = [str(i) for i in range(CLASSES)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i]), int(i)

    def images_tensor(self, idx):  # batch access, as conceptevo's array-backed datasets offer
        return self.images[torch.as_tensor(np.asarray(idx), dtype=torch.int64)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 3) -> float:
    """Best of ``repeat`` wall times (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def reference_pass(m_from, m_to, x, c):
    with eval_mode(m_from, m_to):
        m_from.zero_grad(set_to_none=True)
        m_from(x)[:, c].sum().backward()
        with torch.no_grad():
            m_to(x)


def per_neuron_unit(m_from, m_to, x1, c, layer, neuron):
    """Eq 5 for one image and one neuron, with its own forward/backward (the naive loop's body)."""
    module_from = dict(m_from.named_modules())[layer]
    module_to = dict(m_to.named_modules())[layer]
    held = {}
    h1 = module_from.register_forward_hook(lambda m, i, o: held.__setitem__("z", o) or o.clone())
    h2 = module_to.register_forward_hook(lambda m, i, o: held.__setitem__("zt", o.clone()))
    try:
        logit = m_from(x1)[0, c]
        (g,) = torch.autograd.grad(logit, held["z"])
        with torch.no_grad():
            m_to(x1)
    finally:
        h1.remove()
        h2.remove()
    return float((g[0, neuron] * (held["zt"][0, neuron] - held["z"][0, neuron].detach())).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--loop-images", type=int, default=2, help="images timed in the per-neuron loop baseline")
    ap.add_argument("--loop-neurons", type=int, default=4, help="neurons per layer timed in the loop baseline")
    ap.add_argument("--repeats", type=int, default=1, help="reversion repeats to time (the paper uses 5)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    m_from = vgg_like().to(device)
    m_to = copy.deepcopy(m_from)
    with torch.no_grad():
        for p in m_to.parameters():
            p.add_(0.05 * torch.randn_like(p))
    layers = resolve_layers(m_from)
    n_neurons = sum(dict(m_from.named_modules())[n].out_channels for n in layers)
    c = 0
    train = RandomImages(args.images * CLASSES, seed=0)
    test = RandomImages(args.images * CLASSES, seed=1)
    pos = np.flatnonzero(train.targets == c)[: args.images]
    x = train.images[pos].to(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}); "
          f"VGG-like, {len(layers)} conv layers, {n_neurons} neurons, {len(pos)} images, batch {args.batch_size}")

    t_ref = timed(lambda: reference_pass(m_from, m_to, x, c), device)
    t_imp = timed(lambda: evolution_importance(m_from, m_to, train, c, images=pos, batch_size=args.batch_size,
                                               device=device, progress=False), device)

    # (c) naive loop on a slice, extrapolated
    per_layer = []
    with eval_mode(m_from, m_to):
        for li, layer in enumerate(layers):
            channels = dict(m_from.named_modules())[layer].out_channels
            k = min(args.loop_neurons, channels)
            per_neuron_unit(m_from, m_to, x[:1], c, layer, 0)  # warm-up
            sync(device)
            t = time.perf_counter()
            for i in range(args.loop_images):
                for n in range(k):
                    per_neuron_unit(m_from, m_to, x[i : i + 1], c, layer, n)
            sync(device)
            per_layer.append(((time.perf_counter() - t) / (args.loop_images * k), channels))
    t_loop = sum(t * ch for t, ch in per_layer) * len(pos)
    timed_units = args.loop_images * sum(min(args.loop_neurons, ch) for _, ch in per_layer)

    # (d) reversion: counts with the fork on/off, then the whole evaluation for one class
    imp = evolution_importance(m_from, m_to, train, c, images=pos, batch_size=args.batch_size, device=device, progress=False)
    if device.type != "cpu":  # the accelerator's sensitivities against a float64 CPU run
        ref = evolution_importance(copy.deepcopy(m_from).cpu().double(), copy.deepcopy(m_to).cpu().double(), train, c,
                                   images=pos, batch_size=args.batch_size, progress=False)
        err = np.abs(imp.sensitivities - ref.sensitivities).max() / np.abs(ref.sensitivities).max()
        agree = (np.sign(imp.sensitivities) == np.sign(ref.sensitivities)).mean()
        print(f"check: {device} vs float64 CPU sensitivities, max error {err:.2e} of the largest; signs agree on {agree:.4%}")
    sl = imp.layer_slices()
    rng = np.random.default_rng(0)
    masks = {n: _bin_masks(imp.scores[sl[n]], 4, rng) for n in layers}
    with eval_mode(m_from, m_to):
        t_fork = timed(lambda: reversion_counts(m_from, m_to, train, pos, masks, args.batch_size, device), device, repeat=1)
        t_direct = timed(lambda: reversion_counts(m_from, m_to, train, pos, masks, args.batch_size, device, fork=False),
                         device, repeat=1)
        # a residual model: inside its blocks the batch is copied where it enters the block
        from conceptevo import build_model

        torch.manual_seed(1)
        r_from = build_model("resnet_like", in_channels=int(x.shape[1]), num_classes=CLASSES).to(device).eval()
        r_to = copy.deepcopy(r_from)
        with torch.no_grad():
            for p in r_to.parameters():
                p.add_(0.05 * torch.randn_like(p))
        r_mods = dict(r_to.named_modules())
        r_masks = {n: _bin_masks(rng.random(r_mods[n].out_channels).astype(np.float32), 4, rng) for n in resolve_layers(r_to)}
        t_rfork = timed(lambda: reversion_counts(r_from, r_to, train, pos, r_masks, args.batch_size, device), device, repeat=1)
        t_rdirect = timed(lambda: reversion_counts(r_from, r_to, train, pos, r_masks, args.batch_size, device, fork=False),
                          device, repeat=1)
    sync(device)
    t0 = time.perf_counter()
    evaluate_reversion(m_from, m_to, train, test, c, num_images=args.images, repeats=args.repeats, batch_size=args.batch_size,
                       device=device, num_test_images=args.images, progress=False)
    sync(device)
    t_eval = time.perf_counter() - t0

    rows = [
        ("(a) reference: fwd+bwd model_from + fwd model_to", t_ref, "1.00x"),
        ("(b) evolution_importance, all conv layers", t_imp, f"{t_imp / t_ref:.2f}x of (a)  [target <= 3x]"),
        (f"(c) per-image/layer/neuron loop (extrapolated from {timed_units} timed units)", t_loop,
         f"{t_loop / t_imp:,.0f}x slower than (b)  [target >= 100x]"),
        ("(d1) reversion counts, 128 imgs x 8 layers x 5 bins, fork", t_fork, f"{t_direct / t_fork:.2f}x faster than per-bin"),
        ("(d2) reversion counts, same, one forward per bin", t_direct, ""),
        (f"(d4) same on ResNet-like ({len(r_masks)} convs), fork or copy at the block", t_rfork,
         f"{t_rdirect / t_rfork:.2f}x faster than per-bin"),
        ("(d5) same on ResNet-like, one forward per bin", t_rdirect, ""),
        (f"(d3) evaluate_reversion, one class, {args.repeats} repeat(s), train+test", t_eval,
         f"~{t_eval * 5 / args.repeats:.2f} s for 5 repeats"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'step':<{w}}  {'seconds':>10}  ratio")
    for name, t, ratio in rows:
        print(f"{name:<{w}}  {t:>10.4f}  {ratio}")


if __name__ == "__main__":
    main()
