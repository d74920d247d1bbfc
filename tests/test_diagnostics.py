"""Diagnostics: entropy estimator, distance moved, collapse, milestones, diagnose, and the live monitor."""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from conceptevo.diagnostics import (ALL, ConceptMonitor, collapse, diagnose, differential_entropy, distance_moved,
                                    diversity_by_layer, gaussian_entropy, mean_entropy, milestone_speed,
                                    monitor_from_workspace)
from conceptevo.embedding import NeuronEmbedding
from conceptevo.errors import ConceptEvoError
from conceptevo.stimuli import Stimuli
from conceptevo.workspace import Workspace



# ------------------------------------------------------------------------------------------------
# entropy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.05, 1.0, 7.0])
def test_knn_entropy_matches_gaussian_closed_form(sigma):
    x = np.random.default_rng(1).normal(3.0, sigma, size=4000)
    assert differential_entropy(x) == pytest.approx(gaussian_entropy(sigma), abs=0.05)


@pytest.mark.parametrize("method,tol", [("vasicek", 0.05), ("gaussian", 0.03)])
def test_other_estimators_match_gaussian_closed_form(method, tol):
    x = np.random.default_rng(2).normal(0.0, 2.0, size=4000)
    assert differential_entropy(x, method=method) == pytest.approx(gaussian_entropy(2.0), abs=tol)


def test_knn_entropy_small_sample_is_nearly_unbiased():
    rng = np.random.default_rng(3)
    est = [differential_entropy(rng.normal(0, 1, 32)) for _ in range(300)]
    assert np.mean(est) == pytest.approx(gaussian_entropy(1.0), abs=0.08)


def test_mean_entropy_averages_dimensions():
    rng = np.random.default_rng(4)
    sig = np.array([0.5, 1.0, 2.0])
    v = rng.normal(size=(5000, 3)) * sig
    assert mean_entropy(v) == pytest.approx(np.mean([gaussian_entropy(s) for s in sig]), abs=0.05)


def test_entropy_is_scale_equivariant():
    x = np.random.default_rng(5).uniform(size=300)
    assert differential_entropy(10 * x + 4) == pytest.approx(differential_entropy(x) + math.log(10), abs=1e-9)


def test_entropy_ties_lower_it_but_stay_finite():
    rng = np.random.default_rng(6)
    x = rng.normal(size=64)
    tied = x.copy()
    tied[:16] = tied[0]  # a clump of identical neurons
    h, ht = differential_entropy(x), differential_entropy(tied)
    assert np.isfinite(ht) and ht < h - 0.2
    assert differential_entropy(np.ones(20)) == -np.inf
    assert np.isnan(differential_entropy(np.ones(3)))  # fewer than k + 1 values


def test_entropy_bad_parameters():
    with pytest.raises(ConceptEvoError, match="method"):
        differential_entropy(np.arange(10.0), method="kde")
    with pytest.raises(ConceptEvoError, match="k "):
        differential_entropy(np.arange(10.0), k=0)
    with pytest.raises(ConceptEvoError, match="neurons, dim"):
        mean_entropy(np.arange(10.0))


def test_diversity_by_layer_keys():
    ids = [f"a:{i}" for i in range(10)] + [f"b:{i}" for i in range(10)]
    v = np.random.default_rng(7).normal(size=(20, 4))
    d = diversity_by_layer(ids, v)
    assert list(d) == [ALL, "a", "b"] and all(np.isfinite(list(d.values())))


# ------------------------------------------------------------------------------------------------
# distance moved
# ------------------------------------------------------------------------------------------------
def _emb(ids, v):
    return NeuronEmbedding(ids, np.asarray(v, dtype=np.float32))


def test_distance_moved_is_zero_between_identical_checkpoints():
    ids = [f"f.0:{i}" for i in range(6)] + [f"f.3:{i}" for i in range(4)]
    v = np.random.default_rng(8).normal(size=(10, 5))
    mv = distance_moved(_emb(ids, v), _emb(ids, v.copy()))
    assert mv.mean == 0.0 and np.all(mv.distances == 0.0)
    assert mv.by_layer == {ALL: 0.0, "f.0": 0.0, "f.3": 0.0}


def test_distance_moved_matches_neurons_by_id():
    ids = ["l:0", "l:1", "l:2"]
    a = np.array([[0.0, 0], [1, 0], [0, 1]])
    b = np.array([[0.0, 2], [0, 0], [1, 0]])  # rows in another order: l:2, l:0, l:1
    mv = distance_moved(_emb(ids, a), _emb(["l:2", "l:0", "l:1", "l:9"], np.r_[b, [[5.0, 5]]]))
    assert mv.neuron_ids == ids
    np.testing.assert_allclose(mv.distances, [0.0, 0.0, 1.0])


def test_distance_moved_bad_input():
    with pytest.raises(ConceptEvoError, match="share no neuron"):
        distance_moved(_emb(["a:0"], [[0.0]]), _emb(["b:0"], [[0.0]]))
    with pytest.raises(ConceptEvoError, match="dimensions"):
        distance_moved(_emb(["a:0"], [[0.0]]), _emb(["a:0"], [[0.0, 1.0]]))


# ------------------------------------------------------------------------------------------------
# collapse
# ------------------------------------------------------------------------------------------------
def test_collapse_counts_neurons_sharing_stimuli_with_many_others():
    rng = np.random.default_rng(9)
    k = 10
    idx = [rng.choice(1000, k, replace=False) for _ in range(20)]
    same = np.arange(k)                      # dead / "background" neurons: the same k images
    for i in range(8):                       # 8 of layer a's 12 neurons
        idx[i] = rng.permutation(same)
    idx[8] = np.r_[same[:7], 500, 501, 502]  # shares 7 of 10 (Jaccard 0.54) with the clump
    ids = [f"a:{i}" for i in range(12)] + [f"b:{i}" for i in range(8)]
    stim = Stimuli.from_arrays(ids, np.stack(idx), np.zeros((20, k)))
    c = collapse(stim)
    assert c.by_layer["a"] == pytest.approx(9 / 12)
    assert c.by_layer["b"] == 0.0
    assert c.share == pytest.approx(9 / 20)
    assert c.collapsed[:9].all() and not c.collapsed[9:].any()
    assert collapse(stim, jaccard=0.9).by_layer["a"] == pytest.approx(8 / 12)
    with pytest.raises(ConceptEvoError, match="jaccard"):
        collapse(stim, jaccard=0)


# ------------------------------------------------------------------------------------------------
# workspace level: milestones, diagnose, CLI
# ------------------------------------------------------------------------------------------------
def test_milestone_speed_and_its_errors(fabricated_study):
    ws = Workspace(fabricated_study)
    speeds = milestone_speed(ws, "vgg", (0.25, 0.5, 0.75))
    assert [(s["from"], s["to"]) for s in speeds] == [("e0.5", "e1"), ("e1", "e2")]
    expect = np.linalg.norm(ws.projection("vgg", "e1").vectors - ws.projection("vgg", "e0.5").vectors, axis=1).mean()
    assert speeds[0]["mean"] == pytest.approx(expect, rel=1e-5)
    assert speeds[1]["per_epoch"] == pytest.approx(speeds[1]["mean"] / 1.0)
    with pytest.raises(ConceptEvoError, match="no checkpoint has train_top1 near 0.99"):
        milestone_speed(ws, "vgg", (0.5, 0.99), tolerance=0.1)


def test_one_checkpoint_where_two_are_needed(fabricated_copy):
    ws = Workspace(fabricated_copy)
    ws.manifest["models"]["vgg"]["checkpoints"] = ws.manifest["models"]["vgg"]["checkpoints"][-1:]
    ws._flush()
    with pytest.raises(ConceptEvoError, match="only 1 checkpoint"):
        milestone_speed(ws, "vgg")
    with pytest.raises(ConceptEvoError, match="only 1 checkpoint"):
        diagnose(ws, milestones=(0.25, 0.5), write=False)
    d = diagnose(ws, write=False)  # default milestones: a note, not an error
    assert any("one checkpoint" in n for n in d.notes)


def test_diagnose_writes_metrics_and_plots(tmp_path, fabricated_copy):
    from conceptevo.io import read_json

    path = fabricated_copy
    d = diagnose(path)
    assert set(d.checkpoints) == {"vgg", "resnet"}
    first, second = d.checkpoints["vgg"][:2]
    assert first.moved == {} and second.moved[ALL] > 0
    assert np.isfinite(second.diversity[ALL]) and 0 <= second.collapse[ALL] <= 1
    names = {p.rsplit("/", 1)[-1] for p in d.files}
    assert {"metrics.json", "metrics.csv", "diversity.png", "speed.png", "collapse.png"} <= names
    data = read_json(path / "diagnostics" / "metrics.json")
    assert len(data["checkpoints"]["vgg"]) == 3 and len(data["milestones"]) == 4
    assert "distance moved between accuracy milestones" in d.table()


def test_cli_commands_registered(tmp_path, fabricated_copy, capsys):
    from conceptevo.cli import build_parser

    path = fabricated_copy
    p = build_parser()
    args = p.parse_args(["diagnose", str(path), "--out", str(tmp_path / "d")])
    assert args.fn(args) == 0
    assert "diversity" in capsys.readouterr().out
    args = p.parse_args(["diagnose", str(path), "--milestones", "0.5,0.999", "--tolerance", "0.05"])
    with pytest.raises(ConceptEvoError, match="near 0.999"):
        args.fn(args)


# ------------------------------------------------------------------------------------------------
# the monitor
# ------------------------------------------------------------------------------------------------
# A small, seeded run on generated data: a VGG-style net (12/24/48 neurons, BatchNorm) learns the
# colour of ConceptShapes images (6 classes, chance 1/6) with SGD at lr 0.02. The base space is built
# from another seed's model. From step 60 the diverging run multiplies its learning rate by 1.1 every
# step (lr 0.02 -> ~16 by step 130): far too high. Checks every 5 steps on a 300-image probe.
# Over seeds 2-5 of this set-up the first warning came 20-35 steps before chance accuracy in three
# runs and 15 steps after it in one (seed 4); healthy runs never warned (docs/results-discoveries.md).
STEPS, SPLIT, EVERY, LR = 130, 60, 5, 0.02
CHANCE = 1 / 6


def _net(seed, classes=6, w=12):
    torch.manual_seed(seed)

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes))


def _colour_shapes(n=600):
    from conceptevo.data import ConceptShapes

    data = ConceptShapes(n=n, size=28, seed=0)
    data.targets = data.concepts["colour"].astype(np.int64)
    data.classes = list(data.concept_names["colour"])
    return data


def _batch(data, step, size=32):
    """The training batch of a step (1-based): a fresh seeded permutation each epoch; stateless."""
    per_epoch = -(-len(data) // size)
    epoch, j = divmod(step - 1, per_epoch)
    idx = np.random.default_rng([0, epoch]).permutation(len(data))[j * size:(j + 1) * size]
    return data.images_tensor(idx), torch.as_tensor(data.targets[idx])


def _train(model, data, steps, lr, monitor=None, start=0, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(start + 1, steps + 1):
        x, y = _batch(data, step)
        for g in opt.param_groups:
            g["lr"] = lr(step - 1)
        model.train()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor is not None and step % EVERY == 0:
            monitor.check(model, epoch=step * 32 / len(data), step=step)
    return model, opt


@pytest.fixture(scope="module")
def monitored_runs():
    from conceptevo.data import Subset
    from conceptevo.embedding import embed_images, embed_neurons
    from conceptevo.stimuli import find_stimuli, top_responses

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a deterministic trajectory: the thresholds below were checked with one thread
    data = _colour_shapes()
    probe = Subset(data, np.arange(300))
    base, _ = _train(_net(100), data, 120, lambda s: LR)
    stim = find_stimuli(base, probe, k=10, progress=False, num_images=len(data))
    emb = embed_neurons(stim, dim=30, epochs=200, progress=False)
    resp = top_responses(base, probe, stim, top=10, progress=False, num_images=len(data))
    space = embed_images(stim, emb, num_images=len(data), responses=resp)
    # both runs share their first SPLIT steps (same seed, same lr); then they part
    shared = ConceptMonitor(probe, space, k=10)
    model, opt = _train(_net(3), data, SPLIT, lambda s: LR, shared)
    runs = {}
    for name, lr in (("healthy", lambda s: LR), ("diverging", lambda s: LR * 1.1 ** (s - SPLIT))):
        m, o, mon = copy.deepcopy((model, opt, shared)) if name == "healthy" else (model, opt, shared)
        _train(m, data, STEPS, lr, mon, start=SPLIT, opt=o)
        runs[name] = mon
    torch.set_num_threads(threads)
    return runs, probe, space


def test_monitor_fires_on_diverging_run_before_accuracy_reaches_chance(monitored_runs):
    runs, _, _ = monitored_runs
    mon = runs["diverging"]
    acc = mon.series("probe_top1")
    assert acc.max() > 0.9  # it had learned
    first = mon.first_warning()
    assert first is not None, mon.summary()
    assert first.kind in ("diversity", "collapse") and first.layers
    at_chance = [r.check for r in mon.records if r.step > SPLIT and r.probe_top1 <= CHANCE + 0.03]
    assert at_chance, "the run was meant to diverge to chance accuracy"
    assert first.check < at_chance[0], mon.summary()
    assert mon.records[first.check].probe_top1 > CHANCE + 0.1
    assert first.step > SPLIT  # nothing fired while the run was still healthy


def test_monitor_stays_quiet_on_healthy_run(monitored_runs):
    runs, _, _ = monitored_runs
    mon = runs["healthy"]
    assert mon.series("probe_top1")[-1] > 0.9
    assert not mon.fired, mon.summary()
    assert len(mon.records) == STEPS // EVERY


def test_monitor_records_and_saves(monitored_runs, tmp_path):
    from conceptevo.io import read_json

    runs, _, _ = monitored_runs
    mon = runs["diverging"]
    r = mon.records[3]
    assert set(r.diversity) == {ALL, "0", "4", "8"} and set(r.collapse) == {ALL, "0", "4", "8"}
    assert r.moved[ALL] > 0
    saved = read_json(mon.save(tmp_path / "monitor.json"))
    assert len(saved["records"]) == len(mon.records) and saved["warnings"][0]["layers"]
    assert "WARNING" in mon.summary()


def test_monitor_warning_is_logged_and_names_layers(monitored_runs, caplog):
    _, probe, space = monitored_runs
    mon = ConceptMonitor(probe, space, k=10)
    seen = []
    mon.on_warning = seen.append
    model = _net(5)
    with caplog.at_level(logging.WARNING, logger="conceptevo.diagnostics.monitor"):
        mon.check(model, epoch=1)
        with torch.no_grad():
            model[0].weight.fill_(float("nan"))
        rec = mon.check(model, epoch=2)
    assert not rec.finite
    assert seen and seen[0].kind == "nonfinite" and seen[0].layers == ["0"]
    assert "non-finite" in caplog.text and "0" in caplog.text


def test_monitor_in_conceptevo_trainer(monitored_runs, tmp_path):
    from conceptevo.models.train import TrainConfig, train

    _, probe, space = monitored_runs
    data = _colour_shapes()
    test = _colour_shapes(200)
    mon = ConceptMonitor(probe, space, k=10, epochs=[0.5, 1.0])
    cfg = TrainConfig(epochs=1, lr=LR, batch_size=64, every_steps=2, eval_images=100, bn_images=64)
    cks = train(_net(3), data, test, tmp_path / "run", cfg, progress=False, callbacks=[mon])
    assert len(cks) == 5
    assert [r.epoch for r in mon.records] == [1.0]  # only the chosen epochs are checked
    assert mon.records[0].metrics["train_top1"] == cks[-1].metrics["train_top1"]


def test_monitor_bad_input(monitored_runs):
    from conceptevo.data import Subset

    _, probe, space = monitored_runs
    small = Subset(probe.base, np.arange(50))
    with pytest.raises(ConceptEvoError, match="too few for k=10"):
        ConceptMonitor(small, space, k=10)
    outside = Subset(probe.base, np.arange(300, 450))  # images the base space gave no vector
    with pytest.raises(ConceptEvoError, match="no vector in the base space"):
        ConceptMonitor(outside, space, k=10)
    with pytest.raises(ConceptEvoError, match="collapse_share"):
        ConceptMonitor(probe, space, collapse_share=1.5)


def _quiet_lightning(test):
    """Silence Lightning's own noise, none of it the monitor's: a torch-2.13 deprecation inside lightning,
    the few-dataloader-workers hint (only where there are more than 2 CPU cores), and the note on the
    module kept in eval mode on purpose."""
    for message in (r"`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
                    "The '?train_dataloader'? does not have many workers",
                    r"Found 1 module\(s\) in eval mode at the start of training"):
        test = pytest.mark.filterwarnings(f"ignore:{message}")(test)
    return test


def _lightning_fit(probe, space, max_epochs, stop_on_warning=False, nan_after_epoch=None):
    """Train a small LightningModule (the monitor's `_net`, 4 batches of 32 an epoch, CPU, one thread)
    with the monitor as a callback; returns (monitor, module, modes): `modes` holds, at each training
    step, which of the model's modules were in training mode. Its first BatchNorm is frozen (kept in
    eval mode, as when fine-tuning), which Lightning respects."""
    pl = pytest.importorskip("lightning.pytorch")

    data = _colour_shapes()
    x, y = _batch(data, 1, size=128)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    modes = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net(3)
            self.net[1].eval()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            modes.append([m.training for m in self.modules()])
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.log("loss", loss)
            self.log("epoch_loss", loss, on_step=False, on_epoch=True)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.current_epoch + 1 == nan_after_epoch and batch_idx == 3:  # training blows up
                with torch.no_grad():
                    self.net[4].weight.fill_(float("nan"))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    mon = ConceptMonitor(probe, space, k=10)
    module = Module()
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[mon.as_lightning_callback(stop_on_warning=stop_on_warning)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, loader)
    finally:
        torch.set_num_threads(threads)
    return mon, module, modes


@_quiet_lightning
def test_monitor_as_lightning_callback(monitored_runs):
    """The monitor as a Lightning callback measures the model once at the end of each training epoch."""
    _, probe, space = monitored_runs
    mon, module, modes = _lightning_fit(probe, space, max_epochs=3)
    assert [r.epoch for r in mon.records] == [1.0, 2.0, 3.0]  # 1-based epochs
    assert [r.step for r in mon.records] == [4, 8, 12]
    assert [r.check for r in mon.records] == [0, 1, 2]
    layers = {ALL, "net.0", "net.4", "net.8"}  # every Conv2d of the LightningModule
    for r in mon.records:
        assert r.finite and set(r.diversity) == layers and set(r.collapse) == layers
        assert all(np.isfinite(v) for v in r.diversity.values())
        assert all(0 <= v <= 1 for v in r.collapse.values())
        assert 0 <= r.probe_top1 <= 1
        assert np.isfinite(r.metrics["loss"]) and np.isfinite(r.metrics["epoch_loss"])  # the trainer's metrics, as floats
    assert mon.records[0].moved == {}
    assert all(set(r.moved) == layers and r.moved[ALL] > 0 for r in mon.records[1:])
    assert not mon.fired, mon.summary()
    # the measuring left every module in the mode it was in (training, but for the frozen BatchNorm)
    frozen = [m is module.net[1] for m in module.modules()]
    assert len(modes) == 12 and all(mode == [not f for f in frozen] for mode in modes)
    # it measured the model as trained at that point: the last check is a check of the final model
    again = ConceptMonitor(probe, space, k=10).check(module, epoch=3.0)
    assert again.diversity == pytest.approx(mon.records[-1].diversity)
    assert again.probe_top1 == mon.records[-1].probe_top1


@_quiet_lightning
def test_lightning_callback_stops_on_warning(monitored_runs):
    """With stop_on_warning the trainer stops after the epoch that warned (here: weights gone NaN)."""
    _, probe, space = monitored_runs
    mon, _, modes = _lightning_fit(probe, space, max_epochs=4, stop_on_warning=True, nan_after_epoch=2)
    assert [r.finite for r in mon.records] == [True, False]  # it stopped after the epoch that warned
    assert len(modes) == 8
    w = mon.first_warning()
    assert w.kind == "nonfinite" and w.layers == ["net.4"] and w.epoch == 2.0


def test_lightning_callback_is_picklable(monitored_runs):
    """Spawn-based strategies (ddp_spawn, ddp_notebook) pickle the trainer's callbacks."""
    import pickle

    pytest.importorskip("lightning.pytorch")
    from conceptevo.diagnostics import monitor as monitor_module

    _, probe, space = monitored_runs
    cb = ConceptMonitor(probe, space, k=10).as_lightning_callback(stop_on_warning=True)
    assert isinstance(cb, monitor_module.ConceptMonitorCallback)
    back = pickle.loads(pickle.dumps(cb))
    assert type(back) is type(cb) and back.stop_on_warning and back.monitor.k == 10


def test_lightning_callback_needs_lightning(monitored_runs, monkeypatch):
    """Without Lightning, asking for the callback is a clear error (Lightning is imported only then)."""
    import sys

    from conceptevo.diagnostics import monitor as monitor_module

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    monkeypatch.setattr(monitor_module, "_LIGHTNING_CLASS", None)  # as if never built
    _, probe, space = monitored_runs
    with pytest.raises(ConceptEvoError, match="pip install lightning"):
        ConceptMonitor(probe, space, k=10).as_lightning_callback()
    with pytest.raises(ConceptEvoError, match="pip install lightning"):
        monitor_module.ConceptMonitorCallback


def test_monitor_from_workspace(fabricated_study):
    from conceptevo.models import build_model

    path = fabricated_study
    mon = monitor_from_workspace(path, probe_size=100, k=5)
    assert len(mon.probe) == 100
    model = build_model("vgg_like", in_channels=3, num_classes=10, width=4)
    rec = mon.check(model, epoch=1)
    assert rec.finite and np.isfinite(rec.diversity[ALL])
    with pytest.raises(ConceptEvoError, match="too few for k=20"):
        monitor_from_workspace(path, probe_size=100, k=20)
