"""Data-parallel passes on torch.distributed with two CPU processes (gloo): identical to one process.

Stimuli, importance and reversion counts from two ranks equal one process's;
ranks that disagree stop; a rank that dies makes the other stop with an error
and write nothing (gloo reports a peer that exited at once: "Connection closed
by peer").
"""
import datetime
import json
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conceptevo import find_stimuli
from conceptevo.importance import evolution_importance
from conceptevo.importance.reversion import evaluate_reversion, reversion_counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conftest():
    """The tests' conftest, imported in a spawned rank too (it sets torch's thread count on import)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import conftest

    return conftest


def make():
    from conceptevo import build_model

    TensorImages = conftest().TensorImages

    torch.manual_seed(3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(61, 1, 12, 12, generator=g)
    x[30] = x[5]  # a tie across the two ranks' shards
    # a residual model with BatchNorm: its 0-d num_batches_tracked buffers go into the model hash too
    return build_model("resnet_like", in_channels=1, num_classes=4, width=4).eval(), TensorImages(x, np.arange(61) % 4)


def make_pair():
    """Two checkpoints (t, t') of a small residual model and the images; class 1 has 15 images, an odd number."""
    TinyRes = conftest().TinyRes
    _, data = make()
    torch.manual_seed(3)
    model_from = TinyRes().eval()
    torch.manual_seed(4)
    model_to = TinyRes().eval()
    with torch.no_grad():  # t' = t plus a step, so evolutions are small as between real checkpoints
        for p_to, p_from in zip(model_to.parameters(), model_from.parameters()):
            p_to.mul_(0.3).add_(p_from)
    return model_from, model_to, data


def importance_results(model_from, model_to, data) -> dict:
    """Everything the importance package computes on the class images, as arrays (and the images this rank ran)."""
    seen = []
    hook = model_from.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    imp = evolution_importance(model_from, model_to, data, 1, num_images=None, batch_size=4, progress=False)
    hook.remove()
    one = evolution_importance(model_from, model_to, data, 2, images=[6], batch_size=4, progress=False)  # fewer images than ranks
    rev = evaluate_reversion(model_from, model_to, data, data, 1, num_images=11, repeats=2, batch_size=4,
                             num_test_images=None, progress=False)
    masks = {n: np.eye(c, dtype=bool)[:3] for n, c in zip(imp.layers, imp.channels)}
    ok1, rev1, n1 = reversion_counts(model_from, model_to, data, [9], masks, batch_size=4)
    return dict(scores=imp.scores, sens=imp.sensitivities, idx=imp.image_indices, pos=imp.positions,
                one_scores=one.scores, one_sens=one.sensitivities, changes=rev.changes, clean=rev.clean,
                counts=rev.num_images, ok1=ok1, rev1=rev1, n1=n1, seen=sum(seen))


def worker(rank, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    conftest()
    torch.set_num_threads(1)  # two ranks on a 2-core machine: more threads each spin against the other rank
    # a short timeout: a rank that hangs instead of dying cannot hold CI for the default 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    try:
        try:
            if mode == "importance":
                np.savez(os.path.join(out_dir, f"r{rank}.npz"), **importance_results(*make_pair()))
                return
            if mode == "study":
                run_dying_study(rank, out_dir)
                return
            model, data = make()
            if mode == "mismatch" and rank == 1:
                with torch.no_grad():
                    next(model.parameters()).add_(1.0)
            if mode == "die" and rank == 1:
                die_on_forward(model, 3)
            s = find_stimuli(model, data, k=6, batch_size=8, progress=False)
            np.savez(os.path.join(out_dir, f"r{rank}.npz"), i=s.indices, v=s.values, p=s.positions, m=s.mean, sd=s.std)
        except Exception as e:  # report the message to the parent
            with open(os.path.join(out_dir, f"err{rank}.txt"), "w") as f:
                f.write(f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


def die_on_forward(model, n: int):
    """Make this process exit abruptly (no clean-up, as a crash or an out-of-memory kill) in the n-th forward."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == n:
            os._exit(3)

    model.register_forward_pre_hook(hook)


def run(tmp_path, mode):
    mp.start_processes(worker, args=(free_port(), str(tmp_path), mode), nprocs=2, start_method="spawn")


def run_with_death(tmp_path, mode, limit_s=90):
    """Both ranks in their own process; rank 1 dies. Returns the exit codes and how long rank 0 took.

    Not ``mp.start_processes``: it terminates the surviving rank as soon as one
    exits with an error, before the survivor can report how it stopped.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, str(tmp_path), mode)) for r in range(2)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(max(1.0, limit_s - (time.perf_counter() - t0)))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {limit_s} s"
        return [p.exitcode for p in procs], time.perf_counter() - t0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


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


def test_importance_and_reversion_two_processes_equal_one(tmp_path):
    run(tmp_path, "importance")
    ref = importance_results(*make_pair())
    assert ref["pos"].size == 15 and ref["sens"].shape[0] == 15  # shards of 8 and 7 images
    assert (ref["scores"] > 0).any() and (ref["scores"] < 1).any()
    for r in (0, 1):
        assert not (tmp_path / f"err{r}.txt").exists(), (tmp_path / f"err{r}.txt").read_text()
        got = np.load(tmp_path / f"r{r}.npz")
        assert int(got["seen"]) == (8, 7)[r] and ref["seen"] == 15  # the class's images were shared: shards of 8 and 7
        np.testing.assert_array_equal(got["idx"], ref["idx"])
        np.testing.assert_array_equal(got["pos"], ref["pos"])
        np.testing.assert_array_equal(got["scores"], ref["scores"])
        np.testing.assert_allclose(got["sens"], ref["sens"], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(got["one_scores"], ref["one_scores"])
        np.testing.assert_allclose(got["one_sens"], ref["one_sens"], rtol=1e-5, atol=1e-7)
        for key in ("changes", "clean", "counts", "ok1", "rev1", "n1"):  # counts of hits: exactly equal
            np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_a_dying_rank_stops_the_other(tmp_path):
    codes, took = run_with_death(tmp_path, "die")
    assert codes == [0, 3], codes  # rank 0 caught the failure and reported it; rank 1 died
    err = (tmp_path / "err0.txt").read_text()
    assert err.startswith("ConceptEvoError") and "collective operation failed" in err and "another rank probably died" in err
    assert "pair.cc" not in err  # gloo's source location is dropped from the message
    assert not (tmp_path / "r0.npz").exists() and not (tmp_path / "r1.npz").exists()
    assert took < 60  # gloo reports a peer that exited at once, not at the 20 s timeout


# ------------------------------------------------------------ the pipeline: a rank dies in the stimuli stage
def run_dying_study(rank, out_dir):
    """``run_study`` on two ranks over fabricated checkpoints; rank 1 dies in its second stimuli batch."""
    from conceptevo import pipeline
    from conceptevo.config import DataConfig, EmbeddingConfig, ModelConfig, StimuliConfig, StudyConfig

    if rank == 1:
        load = pipeline.load_model

        def load_and_die(*args, **kwargs):
            model = load(*args, **kwargs)
            die_on_forward(model, 2)
            return model

        pipeline.load_model = load_and_die
    config = StudyConfig(out=os.path.join(out_dir, "ws"), data=DataConfig(kind="synthetic", pool=40, options={"n": 60, "size": 28}),
                         models=[ModelConfig(name="vgg", arch="vgg_like", checkpoints=os.path.join(out_dir, "ck"), options={"width": 4},
                                             allow_chance=True)],  # untrained checkpoints
                         stimuli=StimuliConfig(k=3, batch_size=8), embedding=EmbeddingConfig(dim=4, epochs=5)).validate()
    pipeline.run_study(config, progress=False)


def test_a_rank_dying_in_a_study_leaves_nothing_finished(tmp_path):
    from conceptevo import build_model
    from conceptevo.models.checkpoints import save_checkpoint

    for tag in ("e0", "e1"):
        torch.manual_seed(len(tag) + int(tag[1]))
        save_checkpoint(tmp_path / "ck" / f"{tag}.pt", build_model("vgg_like", in_channels=3, num_classes=10, width=4))
    codes, _ = run_with_death(tmp_path, "study")
    assert codes == [0, 3], codes
    assert "another rank probably died" in (tmp_path / "err0.txt").read_text()
    manifest = json.loads((tmp_path / "ws" / "manifest.json").read_text())
    assert manifest["models"]["vgg"]["checkpoints"]  # the plan was recorded ...
    assert not manifest["stages"]  # ... but no stage as finished
    assert not list((tmp_path / "ws").rglob("*.npy"))
