"""A researcher's own training run: their model module, their checkpoints saved the ways people save them.

The model is defined here (not built in) and reaches conceptevo the way a user's would: as
``arch = "ownnet:OwnResNet"``, a module next to the study config. Every checkpoint format gives
the same stimuli as the raw state_dict, or a one-line error that names the fix.
"""
from __future__ import annotations

import dataclasses
import inspect
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from conceptevo import find_stimuli
from conceptevo.config import load_config
from conceptevo.data import open_dataset
from conceptevo.errors import CheckpointError, ConceptEvoError
from conceptevo.models import build_model, list_checkpoints, load_checkpoint
from conceptevo.pipeline import run_study
from conceptevo.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread

CLASSES = 10


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class OwnResNet(nn.Module):
    """A user's small ResNet for RGB images: no in_channels argument (its signature is its own)."""

    def __init__(self, num_classes: int = 10, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def write_module(folder) -> None:
    """The model as the user's own file ``ownnet.py``."""
    src = "import torch\nfrom torch import nn\n\n\n" + "\n\n".join(
        textwrap.dedent(inspect.getsource(c)) for c in (Block, OwnResNet))
    (folder / "ownnet.py").write_text(src)


@pytest.fixture(scope="module")
def data():
    return open_dataset("synthetic", split="train", n=120, size=16)


def trained(data, seed: int, steps: int = 3, width: int = 4):
    """Weights after a few SGD steps of a plain training loop (BatchNorm statistics moved), and the optimiser."""
    torch.manual_seed(seed)
    model = OwnResNet(CLASSES, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.stack([data[i][0] for i in range(32)])
    y = torch.tensor([data[i][1] for i in range(32)])
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict(), opt.state_dict()


def save_as(fmt: str, folder, sd: dict, opt: dict, name: str | None = None):
    """Save ``sd`` the way ``fmt`` names; return the file."""
    from safetensors.torch import save_file

    defaults = {"raw": "model_e1.pth", "tutorial-pt": "tutorial.pt", "tutorial-tar": "checkpoint.pth.tar",
                "lightning": "epoch=0-step=10.ckpt", "dataparallel": "ckpt_000100.pt", "safetensors": "model_e1.safetensors",
                "tutorial-dataparallel": "model_e1.tar"}
    path = folder / (name or defaults[fmt])
    tutorial = lambda state: {"epoch": 1, "model_state_dict": state, "optimizer_state_dict": opt, "loss": 0.25}  # noqa: E731
    module = {f"module.{k}": v for k, v in sd.items()}
    if fmt == "raw":
        torch.save(sd, path)
    elif fmt in ("tutorial-pt", "tutorial-tar"):
        torch.save(tutorial(sd), path)
    elif fmt == "tutorial-dataparallel":
        torch.save(tutorial(module), path)
    elif fmt == "lightning":  # a LightningModule with self.model = OwnResNet() and a weighted loss
        state = {**{f"model.{k}": v for k, v in sd.items()}, "loss_fn.weight": torch.ones(CLASSES)}
        torch.save({"epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                    "loops": {}, "callbacks": {}, "optimizer_states": [opt], "lr_schedulers": [],
                    "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1}}, path)
    elif fmt == "dataparallel":
        torch.save(module, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def stimuli_of(model, data):
    return find_stimuli(model.eval(), data, k=3, progress=False)


def same_stimuli(a, b) -> bool:
    return np.array_equal(a.indices, b.indices) and np.allclose(a.values, b.values, rtol=1e-6, atol=1e-6)


FORMATS = ["raw", "tutorial-pt", "tutorial-tar", "lightning", "dataparallel", "safetensors", "tutorial-dataparallel"]


@pytest.fixture(scope="module")
def weights(data):
    return trained(data, seed=1)


@pytest.fixture(scope="module")
def reference(data, weights):
    model = OwnResNet(CLASSES)
    model.load_state_dict(weights[0])
    return stimuli_of(model, data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_raw_state_dicts_stimuli(tmp_path, fmt, data, weights, reference):
    pytest.importorskip("safetensors")
    write_module(tmp_path)
    path = save_as(fmt, tmp_path, *weights)
    model = build_model("ownnet:OwnResNet", in_channels=3, num_classes=CLASSES, import_path=[str(tmp_path)])
    assert type(model).__name__ == "OwnResNet"
    load_checkpoint(path, model)
    assert same_stimuli(stimuli_of(model, data), reference)


def test_a_real_lightning_checkpoint(tmp_path, data):
    """Lightning's own ModelCheckpoint files: 'epoch=0-step=N.ckpt', keys under the LightningModule's attribute."""
    pl = pytest.importorskip("lightning.pytorch")
    import logging
    import warnings

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters()
            self.model = OwnResNet(CLASSES)
            self.loss_fn = nn.CrossEntropyLoss(weight=torch.ones(CLASSES))

        def training_step(self, batch, _):
            x, y, _ = batch
            return self.loss_fn(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    lit = Lit()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(40)), batch_size=8)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path), accelerator="cpu",
                             callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_top_k=-1, save_last=True)])
        trainer.fit(lit, loader)
    cks = list_checkpoints(tmp_path / "ck")  # last.ckpt is Lightning's copy of the final one: left out
    assert [(c.tag, c.epoch, c.step) for c in cks] == [("epoch=0-step=5", 0, 5), ("epoch=1-step=10", 1, 10)]
    model = load_checkpoint(cks[-1].path, OwnResNet(CLASSES))
    assert same_stimuli(stimuli_of(model, data), stimuli_of(lit.model, data))


def test_checkpoint_names_give_tags_epochs_steps_and_order(tmp_path):
    def listed(names):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        for n in names:
            (folder / n).write_bytes(n.encode())  # distinct bytes: no file is a copy of another
        return [(c.tag, c.epoch, c.step) for c in list_checkpoints(folder)]

    assert listed(["epoch=1-step=20.ckpt", "epoch=0-step=10.ckpt", "epoch=0-step=5.ckpt", "epoch=10-step=110.ckpt"]) == [
        ("epoch=0-step=5", 0, 5), ("epoch=0-step=10", 0, 10), ("epoch=1-step=20", 1, 20), ("epoch=10-step=110", 10, 110)]
    assert listed(["ckpt_001000.pt", "ckpt_000100.pt", "ckpt_000200.pt"]) == [
        ("ckpt_000100", None, None), ("ckpt_000200", None, None), ("ckpt_001000", None, None)]
    assert listed(["model_e10.pth", "model_e2.pth", "model_e1.pth"]) == [
        ("model_e1", 1, None), ("model_e2", 2, None), ("model_e10", 10, None)]
    assert listed(["checkpoint_epoch_3.pth.tar", "checkpoint_epoch_12.pth.tar", "notes.txt", "model_best.pth.tar"]) == [
        ("checkpoint_epoch_3", 3, None), ("checkpoint_epoch_12", 12, None), ("model_best", None, None)]
    assert listed(["e0.25.pt", "e1.pt", "e0.5.pt", "s300.pt"][:3]) == [("e0.25", 0.25, None), ("e0.5", 0.5, None), ("e1", 1, None)]
    assert listed(["iter_300.pt", "iter_50.pt", "lr1e-3_iter_100.pt"]) == [
        ("iter_50", None, 50), ("lr1e-3_iter_100", None, 100), ("iter_300", None, 300)]
    with pytest.raises(CheckpointError, match="share the tag 'checkpoint'"):
        listed(["checkpoint.pth.tar", "checkpoint.pth"])


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_clear_errors_name_the_fix(tmp_path, data, weights):
    sd, opt = weights
    # the weights under an entry no one guesses: the error lists the entries and names the key option
    torch.save({"ema": {"params": sd}, "step": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "odd.pt", OwnResNet(CLASSES))
    assert "'ema', 'step'" in one_line(e) and "key = " in one_line(e)
    load_checkpoint(tmp_path / "odd.pt", OwnResNet(CLASSES), key="ema/params")
    with pytest.raises(CheckpointError, match="no entry 'ema/weights'"):
        load_checkpoint(tmp_path / "odd.pt", OwnResNet(CLASSES), key="ema/weights")
    # two copies of the network (Lightning module with an EMA copy): ambiguous, so ask for the prefix
    other = trained(data, seed=2)[0]
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in other.items()}, **{f"ema_model.{k}": v for k, v in sd.items()}}},
               tmp_path / "two.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "two.ckpt", OwnResNet(CLASSES))
    assert "several prefixes ('ema_model.', 'model.')" in one_line(e) and "prefix = 'ema_model.'" in one_line(e)
    m = load_checkpoint(tmp_path / "two.ckpt", OwnResNet(CLASSES), prefix="ema_model")
    assert torch.equal(m.state_dict()["conv1.weight"], sd["conv1.weight"])
    with pytest.raises(CheckpointError, match="no key .* starts with the prefix 'net.'; its keys start with 'ema_model.', 'model.'"):
        load_checkpoint(tmp_path / "two.ckpt", OwnResNet(CLASSES), prefix="net.")
    # another width, another number of classes, another architecture (behind a Lightning prefix)
    save_as("lightning", tmp_path, trained(data, seed=1, width=8)[0], opt, name="wide.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "wide.ckpt", OwnResNet(CLASSES))
    assert "conv1.weight [8, 3, 3, 3] vs model [4, 3, 3, 3]" in one_line(e) and "(width, ...)" in one_line(e)
    with pytest.raises(CheckpointError, match="a different number of classes \\(checkpoint 10, model 7\\)"):
        load_checkpoint(save_as("raw", tmp_path, sd, opt), OwnResNet(7))
    renamed = {k.replace("layer2", "stage2").replace("fc", "head"): v for k, v in sd.items()}
    save_as("lightning", tmp_path, renamed, opt, name="other.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "other.ckpt", OwnResNet(CLASSES))
    text = one_line(e)
    assert "after stripping the key prefix 'model.'" in text
    assert "of the model's keys missing (fc.bias, fc.weight, layer2.bn1.bias (+" in text
    assert "unexpected keys (head.bias, head.weight, stage2.bn1.bias (+" in text
    assert "likely cause: a different architecture" in text
    # a wrapper's prefix on every key: stripped where part of the keys fit under it, else named as a possible prefix
    torch.save({f"backbone.{k.replace('conv', 'c')}": v for k, v in sd.items()}, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match="after stripping the key prefix 'backbone.'.* unexpected keys \\(c1.weight"):
        load_checkpoint(tmp_path / "wrapped.pt", OwnResNet(CLASSES))
    renamed = {k.replace("conv", "c").replace("bn", "norm").replace("fc", "head").replace("shortcut", "down"): v
               for k, v in sd.items()}
    torch.save({f"backbone.{k}": v for k, v in renamed.items()}, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match="every key of the checkpoint starts with 'backbone.' and none of the model's"):
        load_checkpoint(tmp_path / "wrapped.pt", OwnResNet(CLASSES))
    # a truncated tutorial .tar
    good = save_as("tutorial-tar", tmp_path, sd, opt).read_bytes()
    (tmp_path / "cut.tar").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*re-save it"):
        load_checkpoint(tmp_path / "cut.tar", OwnResNet(CLASSES))


def write_config(folder, models: str, pool: int = 120) -> None:
    (folder / "study.toml").write_text(textwrap.dedent(f"""
        [study]
        out = "study"
        [data]
        kind = "synthetic"
        pool = {pool}
        options = {{n = 120, size = 16}}
        [stimuli]
        k = 3
        [embedding]
        dim = 4
        epochs = 20
        [layout]
        method = "pca"
    """) + textwrap.dedent(models))


def test_own_model_module_and_checkpoint_formats_through_run(tmp_path, data):
    """`conceptevo run` with arch = "ownnet:OwnResNet" next to the config, and three folders of the same run.

    The model is trained for a few steps only, so it sits near chance: the sanity check is overridden."""
    pytest.importorskip("safetensors")
    write_module(tmp_path)
    (w1, o1), (w2, o2) = trained(data, seed=3, steps=2), trained(data, seed=3, steps=6)
    for folder in ("raw", "lightning", "ema"):
        (tmp_path / folder).mkdir()
    save_as("raw", tmp_path / "raw", w1, o1, name="model_e1.pth")
    save_as("raw", tmp_path / "raw", w2, o2, name="model_e2.pth")
    save_as("lightning", tmp_path / "lightning", w1, o1, name="epoch=0-step=10.ckpt")
    save_as("lightning", tmp_path / "lightning", w2, o2, name="epoch=1-step=20.ckpt")
    (tmp_path / "lightning" / "last.ckpt").write_bytes((tmp_path / "lightning" / "epoch=1-step=20.ckpt").read_bytes())
    for tag, w in (("ckpt_000100", w1), ("ckpt_000200", w2)):  # EMA copy next to the trained one: the prefix says which
        torch.save({"state_dict": {**{f"model.{k}": v * 0 for k, v in w.items()}, **{f"ema.{k}": v for k, v in w.items()}}},
                   tmp_path / "ema" / f"{tag}.pt")
    write_config(tmp_path, """
        [[models]]
        name = "raw"
        arch = "ownnet:OwnResNet"
        checkpoints = "raw"
        [[models]]
        name = "lightning"
        arch = "ownnet:OwnResNet"
        checkpoints = "lightning"
        [[models]]
        name = "ema"
        arch = "ownnet:OwnResNet"
        checkpoints = "ema"
        prefix = "ema."
        key = "state_dict"
    """)
    config = load_config(tmp_path / "study.toml")
    assert config.models[0].import_path == [str(tmp_path)]
    ws = run_study(config, progress=False, allow_chance=True)
    assert ws.tags("raw") == ["model_e1", "model_e2"]
    assert ws.tags("lightning") == ["epoch=0-step=10", "epoch=1-step=20"]
    assert [(c.epoch, c.step) for c in ws.checkpoints("lightning")] == [(0, 10), (1, 20)]
    assert ws.manifest["models"]["ema"]["load"] == {"prefix": "ema.", "key": "state_dict", "import_path": [str(tmp_path)]}
    for raw, other in zip(ws.tags("raw"), ws.tags("lightning")):
        assert same_stimuli(ws.stimuli("raw", raw), ws.stimuli("lightning", other))
    for raw, other in zip(ws.tags("raw"), ws.tags("ema")):
        assert same_stimuli(ws.stimuli("raw", raw), ws.stimuli("ema", other))
    # another prefix reads other weights from the same files: their stimuli are computed again
    again = run_study(dataclasses.replace(config, models=[dataclasses.replace(m, prefix="model.") if m.name == "ema" else m
                                                            for m in config.models]), progress=False, allow_chance=True)
    assert not same_stimuli(again.stimuli("raw", "model_e1"), again.stimuli("ema", "ckpt_000100"))
    ws = run_study(config, progress=False, allow_chance=True)
    # later commands build the model the same way (module from the config's folder, the prefix), from the workspace
    from conceptevo.importance.commands import importance_command

    r = importance_command(ws.path, "ema", "ckpt_000100", "ckpt_000200", 1, top=2, images=8, progress=False, examples=2)
    assert r["csv"].exists()


def test_every_checkpoint_is_checked_before_the_first_heavy_pass(tmp_path, data):
    write_module(tmp_path)
    (tmp_path / "run").mkdir()
    sd, opt = trained(data, seed=4, steps=1)
    for i in (1, 2):
        save_as("tutorial-tar", tmp_path / "run", sd, opt, name=f"model_e{i}.pth.tar")
    good = (tmp_path / "run" / "model_e1.pth.tar").read_bytes()
    (tmp_path / "run" / "model_e3.pth.tar").write_bytes(good[: len(good) // 3])
    write_config(tmp_path, """
        [[models]]
        name = "mine"
        arch = "ownnet:OwnResNet"
        checkpoints = "run"
    """)
    with pytest.raises(CheckpointError) as e:
        run_study(load_config(tmp_path / "study.toml"), progress=False)
    assert one_line(e).startswith("1 of 3 checkpoints of model 'mine' cannot be used (checked before any heavy pass): "
                                  f"checkpoint {tmp_path / 'run' / 'model_e3.pth.tar'} is corrupt or truncated")
    stages = Workspace(tmp_path / "study").manifest["stages"]
    assert not [s for s in stages if s.startswith("stimuli/")], stages  # nothing computed for e1, e2


def test_factory_import_errors_name_the_folder_searched(tmp_path):
    write_config(tmp_path, """
        [[models]]
        name = "mine"
        arch = "mynet:Net"
        checkpoints = "run"
    """)
    (tmp_path / "run").mkdir()
    torch.save({}, tmp_path / "run" / "a.pt")
    with pytest.raises(ConceptEvoError) as e:
        run_study(load_config(tmp_path / "study.toml"), progress=False)
    assert f"no module 'mynet' in {tmp_path} (searched first) and the Python path; put mynet.py in {tmp_path}" in one_line(e)
