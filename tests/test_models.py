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
    from conftest import bright_top_half

    ds = bright_top_half(512)
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


# ---------------------------------------------------------------- your own model: package.module:function
FACTORIES = '''
import torch
from torch import nn

class Gray(nn.Module):                      # a class without in_channels: 1-channel input fixed
    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.fc = nn.Linear(width, num_classes)
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

def anything(**kwargs):                     # takes every argument
    seen.update(kwargs)
    return Gray(kwargs["num_classes"], kwargs.get("width", 4))

def needs_depth(depth, num_classes=10):
    return Gray(num_classes)

def not_a_model(num_classes=10):
    return "a string"

class Factories:
    @staticmethod
    def small(num_classes=10):
        return Gray(num_classes, 2)

seen = {}
instance = Gray()
'''


@pytest.fixture
def factories(tmp_path):
    name = f"userfactories_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    yield name, str(tmp_path)
    import sys

    sys.modules.pop(name, None)


def test_factory_gets_only_the_arguments_it_takes(factories):
    import sys

    name, folder = factories
    m = build_model(f"{name}:Gray", in_channels=1, num_classes=3, import_path=[folder], width=5)
    assert type(m).__name__ == "Gray" and m.fc.out_features == 3 and m.conv.out_channels == 5
    assert folder not in sys.path  # searched during the import only
    build_model(f"{name}:anything", in_channels=1, num_classes=4, import_path=folder, extra=7)
    assert sys.modules[name].seen == {"in_channels": 1, "num_classes": 4, "extra": 7}
    assert build_model(f"{name}:Factories.small", num_classes=2, import_path=[folder]).conv.out_channels == 2


def test_factory_errors_name_the_problem(factories, tmp_path):
    name, folder = factories
    cases = {
        f"{name}:Gray": ("takes no option 'depth'; its parameters are num_classes, width", {"depth": 3}),
        f"{name}:needs_depth": ("needs 'depth', which conceptevo cannot supply; give it in options", {}),
        f"{name}:not_a_model": ("returned a str, not a torch.nn.Module", {}),
        f"{name}:instance": ("is a model instance, not a function or class", {}),
        f"{name}:seen": ("is a dict, not a function or class", {}),
        f"{name}:Grey": ("has no 'Grey'. Did you mean 'Gray'", {}),
        f"{name}.py:Gray": (f"give the module's import name, not a file, e.g. '{name}:Gray'", {}),
        "nosuchmodule_xyz:Net": (f"no module 'nosuchmodule_xyz' in {folder} (searched first) and the Python path; "
                                 f"put nosuchmodule_xyz.py in {folder}, set import_path", {}),
    }
    for arch, (message, options) in cases.items():
        with pytest.raises(ConceptEvoError) as e:
            build_model(arch, import_path=[folder], **options)
        assert message in str(e.value) and "\n" not in str(e.value), (arch, str(e.value))
    (tmp_path / "broken_dep_mod.py").write_text("import not_installed_pkg_xyz\n")
    with pytest.raises(ConceptEvoError, match="it imports 'not_installed_pkg_xyz', which is not installed"):
        build_model("broken_dep_mod:Net", import_path=[folder])


def test_config_folder_is_searched_for_the_model_module(tmp_path):
    from conceptevo.config import load_config

    (tmp_path / "src").mkdir()
    (tmp_path / "c.toml").write_text(
        '[study]\nout = "s"\n'
        '[[models]]\nname = "a"\narch = "mynet:Net"\ncheckpoints = "ck"\nprefix = "model."\nkey = "state_dict"\n'
        '[[models]]\nname = "b"\narch = "vgg_like"\ncheckpoints = "ck"\n'
        '[[models]]\nname = "c"\narch = "mynet:Net"\ncheckpoints = "ck"\nimport_path = ["src", "/abs"]\n')
    a, b, c = load_config(tmp_path / "c.toml").models
    assert a.import_path == [str(tmp_path)] and b.import_path is None and c.import_path == [str(tmp_path / "src"), "/abs"]
    assert a.loading() == {"prefix": "model.", "key": "state_dict", "import_path": [str(tmp_path)]} and b.loading() == {}
    (tmp_path / "c.toml").write_text('[study]\nout = "s"\n[[models]]\nname = "a"\narch = "m:f"\ncheckpoints = "ck"\nprefix = 1\n')
    with pytest.raises(ConceptEvoError, match="prefix must be a string"):
        load_config(tmp_path / "c.toml")


def test_safetensors_suffix_in_any_case_and_tar(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    src = build_model("resnet_like", width=4, seed=1)
    save_file(src.state_dict(), str(tmp_path / "A.SafeTensors"))
    torch.save({"model_state_dict": src.state_dict(), "epoch": 2}, tmp_path / "checkpoint.pth.tar")
    assert [(c.tag, c.epoch) for c in list_checkpoints(tmp_path)] == [("A", None), ("checkpoint", None)]
    for c in list_checkpoints(tmp_path):
        dst = load_checkpoint(c.path, build_model("resnet_like", width=4))
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_checkpoints_may_name_one_file(tmp_path):
    """`checkpoints = "ckpts/last.pt"` (one file, not a list) lists that file, not 'folder does not exist'."""
    (tmp_path / "ckpt_epoch4.pt").write_bytes(b"x")
    assert [(c.tag, c.epoch) for c in list_checkpoints(tmp_path / "ckpt_epoch4.pt")] == [("ckpt_epoch4", 4)]
    assert [c.tag for c in list_checkpoints(str(tmp_path / "ckpt_epoch4.pt"))] == ["ckpt_epoch4"]
    with pytest.raises(CheckpointError, match="does not exist"):
        list_checkpoints(tmp_path / "ckpt_epoch5.pt")
