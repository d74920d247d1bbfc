"""The training optimiser: SGD (the CNNs') or AdamW (the ViT's), its defaults, validation, record, and use."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conceptevo.cli import build_parser, main
from conceptevo.demo import MODELS, DemoSettings
from conceptevo.errors import ConceptEvoError
from conceptevo.models import build_model, list_checkpoints, load_checkpoint
from conceptevo.models.train import (OPTIMIZER_DEFAULTS, TrainConfig, decay_groups, default_optimizer, lr_factor,
                                     make_optimizer, train)


def test_defaults_follow_the_optimizer_and_sgd_keeps_the_old_ones():
    sgd = TrainConfig()
    assert (sgd.optimizer, sgd.lr, sgd.weight_decay, sgd.warmup, sgd.momentum) == ("sgd", 0.05, 5e-4, 0.0, 0.9)
    adamw = TrainConfig(optimizer="adamw")
    assert (adamw.lr, adamw.weight_decay, adamw.warmup) == (1e-3, 0.05, 0.05)
    mine = TrainConfig(optimizer="adamw", lr=3e-3, weight_decay=0.0, warmup=0.0)  # explicit values are kept
    assert (mine.lr, mine.weight_decay, mine.warmup) == (3e-3, 0.0, 0.0)
    assert default_optimizer("vit_tiny") == "adamw"
    assert {default_optimizer(a) for a in ("vgg_like", "vgg_like_nodropout", "resnet_like", "tv:resnet18")} == {"sgd"}


@pytest.mark.parametrize("bad, match", [
    (dict(optimizer="adam"), "optimizer must be one of sgd, adamw, got 'adam'. Did you mean 'adamw'"),
    (dict(optimizer=None), "optimizer must be one of"),
    (dict(optimizer="adamw", warmup=1.0), r"warmup .* must be in \[0, 1\)"),
    (dict(warmup=-0.1), "warmup"),
    (dict(weight_decay=-1e-4), "weight_decay must be a number >= 0"),
    (dict(optimizer="adamw", lr=0), "lr must be positive"),
])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ConceptEvoError, match=match):
        TrainConfig(**bad).validate()


def test_lr_factor_is_the_old_cosine_without_warmup_and_ramps_with_it():
    total = 37
    old = [0.5 * (1 + math.cos(math.pi * min(s, total) / total)) for s in range(total + 3)]
    assert [lr_factor(s, total) for s in range(total + 3)] == old  # bit for bit: the CNNs train exactly as before
    ramp = [lr_factor(s, 100, warmup=5) for s in range(101)]
    assert ramp[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert ramp[5] == 1.0 and ramp[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(ramp[4:], ramp[5:]))  # then only down


def test_adamw_decays_weight_matrices_only():
    vit = build_model("vit_tiny", dim=16, depth=1, heads=2, mlp=16, seed=0)
    opt = make_optimizer(vit, TrainConfig(optimizer="adamw"))
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(vit.parameters()))
    sgd = make_optimizer(vit, TrainConfig())
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["weight_decay"] == 5e-4
    assert len(decay_groups(nn.Linear(3, 2), 0.1)[0]["params"]) == 1


def _one_step(tmp_path, optimizer):
    """Train a small ViT for exactly one step on one full batch; return the start model, the trained one and the data."""
    from conftest import TensorImages

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28, generator=g), np.arange(16) % 3
    ds = TensorImages(x, y)
    start = build_model("vit_tiny", num_classes=3, dim=16, depth=1, heads=2, mlp=16, seed=0)
    model = copy.deepcopy(start)
    cfg = TrainConfig(optimizer=optimizer, epochs=1, batch_size=16, every_steps=1, eval_images=16)
    cks = train(model, ds, ds, tmp_path / optimizer, cfg, progress=False)
    assert [c.step for c in cks] == [1]
    return start, load_checkpoint(cks[0].path, copy.deepcopy(start)), ds


def _by_hand(start, ds, opt_cls, **kw):
    """The same step taken here with ``opt_cls``: the known answer train() must reproduce."""
    model = copy.deepcopy(start).train()
    groups = decay_groups(model, kw.pop("weight_decay")) if opt_cls is torch.optim.AdamW else model.parameters()
    opt = opt_cls(groups, **kw)
    nn.CrossEntropyLoss()(model(ds.images), torch.as_tensor(ds.targets)).backward()
    opt.step()
    return model


def test_train_takes_the_adamw_step_and_records_it(tmp_path):
    start, trained, ds = _one_step(tmp_path, "adamw")
    want = _by_hand(start, ds, torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    sgd_like = _by_hand(start, ds, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    got, exp, other = trained.state_dict(), want.state_dict(), sgd_like.state_dict()
    for k in got:
        torch.testing.assert_close(got[k], exp[k], atol=2e-6, rtol=0, msg=k)
    # the two optimisers' first steps are told apart by far more than that tolerance
    assert max(float((got[k] - other[k]).abs().max()) for k in got) > 1e-4
    index = json.loads((tmp_path / "adamw" / "checkpoints.json").read_text())
    assert {k: index["config"][k] for k in ("optimizer", "lr", "weight_decay", "warmup")} == {
        "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup": 0.05}


def test_train_takes_the_sgd_step(tmp_path):
    start, trained, ds = _one_step(tmp_path, "sgd")
    want = _by_hand(start, ds, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(v, want.state_dict()[k], atol=2e-6, rtol=0, msg=k)
    assert json.loads((tmp_path / "sgd" / "checkpoints.json").read_text())["config"]["optimizer"] == "sgd"


def test_cli_train_parses_validates_and_defaults_by_architecture(tmp_path, capsys, monkeypatch):
    p = build_parser()
    a = p.parse_args(["train", "--out", "x", "--optimizer", "adamw", "--lr", "0.002", "--weight-decay", "0.1", "--warmup", "0.1"])
    assert (a.optimizer, a.lr, a.weight_decay, a.warmup) == ("adamw", 0.002, 0.1, 0.1)
    d = p.parse_args(["train", "--out", "x"])
    assert (d.optimizer, d.lr, d.weight_decay, d.warmup) == (None, None, None, None)  # filled in per architecture
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--out", "x", "--optimizer", "adam"])
    assert "invalid choice: 'adam'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "w"), "--optimizer", "adamw", "--warmup", "2"]) == 2
    assert "warmup" in capsys.readouterr().err

    seen = {}

    def fake_train(model, train_set, test_set, out, config, **kw):  # records the config: the training is tested above
        seen[type(model).__name__] = config
        return []

    monkeypatch.setattr("conceptevo.models.train.train", fake_train)
    common = ["--data", "synthetic", "--epochs", "1", "--no-progress"]
    main(["train", "--arch", "vit_tiny", "--out", str(tmp_path / "v"), *common])
    main(["train", "--arch", "resnet_like", "--out", str(tmp_path / "r"), *common])
    main(["train", "--arch", "vit_tiny", "--optimizer", "sgd", "--lr", "0.1", "--out", str(tmp_path / "s"), *common])
    assert (seen["ViT"].optimizer, seen["ViT"].lr) == ("sgd", 0.1)  # the last ViT run: the user's choice wins
    assert seen["ResNetLike"].optimizer == "sgd" and seen["ResNetLike"].lr == 0.05


def test_demo_trains_the_cnns_with_sgd_and_the_vit_with_adamw():
    for settings in (DemoSettings(), DemoSettings.quick()):
        for _, arch in MODELS:
            tc = settings.train_config(arch, seed=2)
            assert tc.seed == 2 and tc.epochs == settings.epochs and tc.train_images == settings.train_images
            if arch == "vit_tiny":  # AdamW, smaller batches, a higher peak rate; its other settings AdamW's defaults
                assert (tc.optimizer, tc.batch_size, tc.lr) == ("adamw", 32, 0.005)
                assert (tc.weight_decay, tc.warmup) == (OPTIMIZER_DEFAULTS["adamw"]["weight_decay"], OPTIMIZER_DEFAULTS["adamw"]["warmup"])
            else:  # the CNNs exactly as before the optimiser option
                assert (tc.optimizer, tc.batch_size, tc.lr, tc.weight_decay, tc.warmup, tc.momentum) == ("sgd", 128, 0.05, 5e-4, 0.0, 0.9)
    assert DemoSettings().train_config("vgg_like", optimizer="adamw").optimizer == "adamw"
