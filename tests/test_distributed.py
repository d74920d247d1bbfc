"""Data-parallel stimuli on torch.distributed with two CPU processes (gloo): identical to one process."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conceptevo import find_stimuli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make():
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import TensorImages

    from conceptevo import build_model

    torch.manual_seed(3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(61, 1, 12, 12, generator=g)
    x[30] = x[5]  # a tie across the two ranks' shards
    # a residual model with BatchNorm: its 0-d num_batches_tracked buffers go into the model hash too
    return build_model("resnet_like", in_channels=1, num_classes=4, width=4).eval(), TensorImages(x, np.arange(61) % 4)


def worker(rank, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, data = make()
        if mode == "mismatch" and rank == 1:
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        try:
            s = find_stimuli(model, data, k=6, batch_size=8, progress=False)
            np.savez(os.path.join(out_dir, f"r{rank}.npz"), i=s.indices, v=s.values, p=s.positions, m=s.mean, sd=s.std)
        except Exception as e:  # report the message to the parent
            with open(os.path.join(out_dir, f"err{rank}.txt"), "w") as f:
                f.write(str(e))
    finally:
        dist.destroy_process_group()


def run(tmp_path, mode):
    mp.start_processes(worker, args=(free_port(), str(tmp_path), mode), nprocs=2, start_method="spawn")


def test_two_processes_equal_one(tmp_path):
    run(tmp_path, "same")
    model, data = make()
    ref = find_stimuli(model, data, k=6, batch_size=8, progress=False)
    for r in (0, 1):
        got = np.load(tmp_path / f"r{r}.npz")
        np.testing.assert_array_equal(got["i"], ref.indices)
        # strengths agree to float rounding: a batch's composition can change a convolution's summation order
        np.testing.assert_allclose(got["v"], ref.values, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(got["p"], ref.positions)
        np.testing.assert_allclose(got["m"], ref.mean, rtol=1e-5)
        np.testing.assert_allclose(got["sd"], ref.std, rtol=1e-4, atol=1e-6)


def test_ranks_with_different_models_stop(tmp_path):
    run(tmp_path, "mismatch")
    for r in (0, 1):
        assert "different model" in (tmp_path / f"err{r}.txt").read_text()
        assert not (tmp_path / f"r{r}.npz").exists()
