"""Scaling of the stimuli pass over processes (torch.distributed, gloo, CPU).

Compares, in one run: one process with one thread; two processes with one
thread each (the pool sharded, top-k merged exactly); one process with two
threads. Targets (issue 6): 2 procs x 1 thread >= 1.6x the throughput of
1 proc x 1 thread, and never slower than 1 proc x 2 threads.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def pool(n):
    from conceptevo.data import Subset, find_fashion_mnist, open_dataset

    ds = open_dataset("fashion-mnist") if find_fashion_mnist() else open_dataset("synthetic", n=n, size=28, channels=1)
    return Subset(ds, np.arange(min(n, len(ds))))


def model():
    from conceptevo import build_model

    torch.manual_seed(0)
    return build_model("vgg_like", in_channels=1, num_classes=10).eval()


def one(n, threads, batch):
    from conceptevo import find_stimuli

    torch.set_num_threads(threads)
    m, ds = model(), pool(n)
    find_stimuli(m, pool(batch), k=10, batch_size=batch, progress=False)
    t = time.perf_counter()
    s = find_stimuli(m, ds, k=10, batch_size=batch, progress=False)
    return time.perf_counter() - t, s


def worker(rank, port, n, batch, q):
    from conceptevo import find_stimuli

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    m, ds = model(), pool(n)
    find_stimuli(m, pool(2 * batch), k=10, batch_size=batch, progress=False)  # warm-up (also collective)
    dist.barrier()
    t = time.perf_counter()
    s = find_stimuli(m, ds, k=10, batch_size=batch, progress=False)
    dist.barrier()
    el = time.perf_counter() - t
    if rank == 0:
        q.put((el, s.indices))
    dist.destroy_process_group()


def two(n, batch):
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, n, batch, q)) for r in range(2)]
    for p in procs:
        p.start()
    el, idx = q.get(timeout=1800)
    for p in procs:
        p.join()
    return el, idx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    r11, r12, r21 = [], [], []
    for _ in range(a.repeats):
        t11, s = one(a.images, 1, a.batch_size); r11.append(t11)
        t12, _ = one(a.images, 2, a.batch_size); r12.append(t12)
        t21, idx = two(a.images, a.batch_size); r21.append(t21)
        assert np.array_equal(idx, s.indices), "two processes must give the same stimuli as one"
    t11, t12, t21 = min(r11), min(r12), min(r21)
    print(f"stimuli pass, vgg_like, {a.images} images, batch {a.batch_size}, best of {a.repeats} (cores: {os.cpu_count()})")
    print(f"  1 process  x 1 thread : {t11:6.2f} s   {a.images / t11:7.0f} img/s   1.00x")
    print(f"  1 process  x 2 threads: {t12:6.2f} s   {a.images / t12:7.0f} img/s   {t11 / t12:.2f}x")
    print(f"  2 processes x 1 thread: {t21:6.2f} s   {a.images / t21:7.0f} img/s   {t11 / t21:.2f}x  (target >= 1.6x, and >= the 2-thread run)")
    print("  stimuli identical between 1 and 2 processes: yes")


if __name__ == "__main__":
    main()
