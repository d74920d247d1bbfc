import os
import pickle

import numpy as np
import pytest
import torch

from conceptevo import ConceptEvoError, build_model, list_checkpoints, load_checkpoint
from conceptevo.errors import CheckpointError
from conceptevo.layers import resolve_layers
from conceptevo.models.checkpoints import save_checkpoint
from conceptevo.models.train import TrainConfig, train


@pytest.mark.parametrize("arch", ["vgg_like", "vgg_like_nodropout", "resnet_like"])
@pytest.mark.parametrize("size", [28, 32])
def test_builtin_architectures(arch, size):
    m = build_model(arch, in_channels=3, num_classes=7)
    assert m(torch.rand(2, 3, size, size)).shape == (2, 7)
    assert len(resolve_layers(m)) >= 7


def test_vgg_like_without_batchnorm():
    plain = build_model("vgg_like", in_channels=1, num_classes=10, width=4, batchnorm=False, seed=0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    normed = build_model("vgg_like", in_channels=1, num_classes=10, width=4, seed=0)
    assert resolve_layers(plain) == resolve_layers(normed)   # same conv layers, same names: same neurons
    assert plain(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_seeded_build_is_the_same_in_every_process():
    """torch seeds its global generator differently in each process, so training runs (demo, `conceptevo
    train`) build their models with a seed: same weights in every process, global random state untouched."""
    import subprocess
    import sys

    code = ("import torch; from conceptevo import build_model; "
            "m = build_model('resnet_like', width=4, seed=3); "
            "print(float(sum(p.double().abs().sum() for p in m.parameters() if p.requires_grad).detach()))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(runs) == 1, runs
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = build_model("vgg_like", width=4, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model("vgg_like", width=4, seed=3)
    c = build_model("vgg_like", width=4, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.state_dict()["features.0.weight"], c.state_dict()["features.0.weight"])


def test_unknown_architecture_suggests():
    with pytest.raises(ConceptEvoError, match="vgg_like"):
        build_model("vgg_lik")


def test_torchvision_by_name_or_clear_error():
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(ConceptEvoError, match="torchvision"):
            build_model("tv:vgg16", in_channels=3)
        return
    m = build_model("tv:resnet18", in_channels=3, num_classes=5)
    assert m(torch.rand(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model_state_dict", "model"])
def test_checkpoint_layouts(tmp_path, layout):
    src = build_model("resnet_like")
    sd = src.state_dict()
    obj = sd if layout == "bare" else {layout: sd, "epoch": 3}
    torch.save(obj, tmp_path / "c.pt")
    dst = load_checkpoint(tmp_path / "c.pt", build_model("resnet_like"))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k])


def test_checkpoint_that_does_not_fit(tmp_path):
    save_checkpoint(tmp_path / "c.pt", build_model("vgg_like"))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "c.pt", build_model("resnet_like"))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    torch.save({"state_dict": {"w": Evil()}}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="trust-checkpoint"):
            load_checkpoint(tmp_path / name, build_model("vgg_like"))
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c.pt", build_model("vgg_like"))
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "t.pt", build_model("vgg_like"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", build_model("vgg_like"))


def test_list_checkpoints_natural_order(tmp_path):
    for name in ["epoch-10.pt", "epoch-2.pt", "epoch-1.pt", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [c.tag for c in list_checkpoints(tmp_path)] == ["epoch-1", "epoch-2", "epoch-10"]
    with pytest.raises(CheckpointError):
        list_checkpoints(tmp_path / "nope")


def test_train_saves_checkpoints_with_accuracy(tmp_path):
    from conftest import TensorImages

    g = torch.Generator().manual_seed(0)
    y = np.arange(512) % 2
    x = torch.rand(512, 1, 28, 28, generator=g) * 0.2
    x[y == 1, :, :14] += 0.8  # class 1: bright top half
    ds = TensorImages(x, y)
    m = build_model("vgg_like", num_classes=2, width=4)
    cks = train(m, ds, ds, tmp_path, TrainConfig(epochs=4, lr=0.05, batch_size=32, first_epoch_checkpoints=2, eval_images=128), progress=False)
    assert [c.tag for c in cks] == ["e0.5", "e1", "e2", "e3", "e4"]
    assert cks[-1].metrics["train_top1"] > 0.8
    assert all(0 <= c.metrics["test_top5"] <= 1 for c in cks)
    listed = list_checkpoints(tmp_path)
    assert [c.tag for c in listed] == ["e0.5", "e1", "e2", "e3", "e4"] and listed[-1].metrics == cks[-1].metrics
    load_checkpoint(listed[0].path, build_model("vgg_like", num_classes=2, width=4))
    with pytest.raises(ConceptEvoError, match="lr"):
        TrainConfig(lr=0).validate()
