"""Checkpoints as people have them for transformers: save_pretrained folders, shards, step folders, safetensors.

The transformers tests build tiny models (random weights, a few KB) and save
them with ``save_pretrained``; they are skipped without ``transformers``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from torch import nn

from conceptevo.errors import CheckpointError, ConceptEvoError
from conceptevo.layers import resolve_layers
from conceptevo.models import build_model, list_checkpoints, load_checkpoint, validate_checkpoints
from conceptevo.models.checkpoints import checkpoint_hash
from conceptevo.models.zoo import default_units

safetensors_torch = pytest.importorskip("safetensors.torch")

STEPS = (0, 1, 512)  # "step512" must sort after "step1" by the parsed step, and "step1" after "step0"


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every weight moved by a seeded amount: a stand-in for a later training step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _hooked(model: nn.Module, layer: str, *inputs):
    got = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: got.setdefault("a", o.detach().clone()))
    with torch.no_grad():
        out = model(*inputs)
    h.remove()
    out = out.logits if hasattr(out, "logits") else out
    return out, got["a"]


# ---------------------------------------------------------------- conceptevo's own folders (no transformers)

def test_conceptevo_arch_folders_as_one_run_without_trust(tmp_path):
    """Folders with config.json {"conceptevo_arch": ...} + model.safetensors: built from the zoo, ordered by step."""
    kwargs = {"in_channels": 1, "num_classes": 10, "width": 4}
    truth = {}
    for i, step in enumerate(STEPS):
        net = _perturbed(build_model("vgg_like", seed=0, **kwargs), seed=i).eval()
        folder = tmp_path / "run" / f"step{step}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"conceptevo_arch": "vgg_like", **kwargs}))
        safetensors_torch.save_file(net.state_dict(), str(folder / "model.safetensors"))
        truth[f"step{step}"] = net
    cks = list_checkpoints(tmp_path / "run")
    assert [(c.tag, c.step) for c in cks] == [(f"step{s}", s) for s in STEPS]
    x = torch.randn(3, 1, 28, 28)
    for c in cks:
        model = build_model(f"hf:{tmp_path / 'run'}", in_channels=3, num_classes=7)  # the saved config wins over defaults
        assert type(model).__name__ == "VGGLike" and model.features[0].in_channels == 1
        load_checkpoint(c.path, model)  # safetensors: no trust needed
        with torch.no_grad():
            assert torch.equal(model.eval()(x), truth[c.tag](x))
    validate_checkpoints([c.path for c in cks], lambda: build_model(f"hf:{tmp_path / 'run'}"), name="run")
    # a list of step folders keeps its order
    listed = list_checkpoints([tmp_path / "run" / "step512", tmp_path / "run" / "step0"])
    assert [(c.tag, c.step) for c in listed] == [("step512", 512), ("step0", 0)]
    # one step folder given alone is one checkpoint
    assert [c.tag for c in list_checkpoints(tmp_path / "run" / "step1")] == ["step1"]
    # the content hash covers the weights: distinct per step, stable
    hashes = [checkpoint_hash(c.path) for c in cks]
    assert len(set(hashes)) == 3 and hashes == [checkpoint_hash(c.path) for c in cks]


def test_plain_safetensors_file_and_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.mid = nn.Linear(6, 6)
            self.out = nn.Linear(6, 11, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(torch.relu(self.mid(self.emb(t))))

    torch.manual_seed(0)
    a = Tied()
    safetensors_torch.save_model(a, str(tmp_path / "tied.safetensors"))  # keeps one copy of the shared tensor
    saved = safetensors_torch.load_file(str(tmp_path / "tied.safetensors"))
    assert len(saved) == len(a.state_dict()) - 1
    torch.manual_seed(1)
    b = load_checkpoint(tmp_path / "tied.safetensors", Tied())
    t = torch.arange(11)[None]
    assert torch.equal(a(t), b(t)) and b.out.weight is b.emb.weight


def test_folder_errors_name_the_problem(tmp_path):
    net = build_model("vgg_like", width=4, seed=0)
    only_config = tmp_path / "step3"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"conceptevo_arch": "vgg_like", "width": 4}))
    with pytest.raises(CheckpointError, match="config.json but no model weights.*model.safetensors"):
        load_checkpoint(only_config, net)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="folder without a saved model"):
        load_checkpoint(empty, net)
    with pytest.raises(CheckpointError, match="no checkpoint files .* or model folders"):
        list_checkpoints(empty)
    # a shard index naming a shard that is not there
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps({"conceptevo_arch": "vgg_like", "width": 4}))
    sd = net.state_dict()
    keys = sorted(sd)
    half = len(keys) // 2
    safetensors_torch.save_file({k: sd[k] for k in keys[:half]}, str(sharded / "model-00001-of-00002.safetensors"))
    safetensors_torch.save_file({k: sd[k] for k in keys[half:]}, str(sharded / "model-00002-of-00002.safetensors"))
    wm = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors") for i, k in enumerate(keys)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(sharded, build_model("vgg_like", width=4, seed=5)).eval()(x), net.eval()(x))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names 1 shard file\(s\) missing .*model-00002-of-00002.safetensors"):
        load_checkpoint(sharded, net)
    # the architecture mismatch message of any checkpoint
    ok = tmp_path / "ok"
    ok.mkdir()
    safetensors_torch.save_file(sd, str(ok / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit the architecture VGGLike.*other shape"):
        load_checkpoint(ok, build_model("vgg_like", width=8))
    with pytest.raises(ConceptEvoError, match="no config.json"):
        build_model(f"hf:{empty}")


def test_transformers_missing_names_the_extra(monkeypatch):
    from conceptevo.models.hf import import_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(ConceptEvoError, match=r"install the 'transformers' extra: pip install 'conceptevo\[transformers\]'"):
        import_transformers()


# ---------------------------------------------------------------- Hugging Face save_pretrained folders

@pytest.fixture(scope="module")
def tf():
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    tf = pytest.importorskip("transformers")
    tf.utils.logging.disable_progress_bar()
    return tf


def _neox(tf, hidden=16):
    cfg = tf.GPTNeoXConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=32)
    return tf.GPTNeoXForCausalLM(cfg).eval()


def test_save_pretrained_steps_load_as_one_run(tf, tmp_path):
    """A tiny GPT-NeoX saved at three steps (one of them sharded): each loads to the in-memory model's outputs."""
    torch.manual_seed(0)
    model = _neox(tf)
    truth = {}
    for i, step in enumerate(STEPS):
        _perturbed(model, seed=i)
        shard = {"max_shard_size": "4KB"} if step == 1 else {}
        model.save_pretrained(str(tmp_path / "run" / f"step{step}"), **shard)
        truth[f"step{step}"] = {k: v.clone() for k, v in model.state_dict().items()}
    assert (tmp_path / "run" / "step1" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "run" / "step1").glob("model-*.safetensors"))) > 1
    cks = list_checkpoints(tmp_path / "run")
    assert [(c.tag, c.step) for c in cks] == [(f"step{s}", s) for s in STEPS]
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = _neox(tf)
    layer = "gpt_neox.layers.1.mlp.act"
    assert layer in dict(reference.named_modules())
    for c in cks:
        reference.load_state_dict(truth[c.tag])
        built = build_model(f"hf:{tmp_path / 'run'}")
        assert type(built).__name__ == "GPTNeoXForCausalLM"
        load_checkpoint(c.path, built)
        want, want_act = _hooked(reference, layer, tokens)
        got, got_act = _hooked(built, layer, tokens)
        assert isinstance(got, torch.Tensor)  # logits=True: a plain tensor
        assert torch.equal(got, want) and torch.equal(got_act, want_act)
        assert got_act.shape == (2, 9, 32)  # [B, T, C]: the MLP hidden units, one value per token
    validate_checkpoints([c.path for c in cks], lambda: build_model(f"hf:{tmp_path / 'run'}"), name="neox")
    # the default units of a known family: the MLP hidden units of every block
    assert resolve_layers(built, default_units(built)) == ["gpt_neox.layers.0.mlp.act", "gpt_neox.layers.1.mlp.act"]
    # without logits=True the transformers output object comes back
    raw = build_model(f"hf:{tmp_path / 'run' / 'step0'}", logits=False)
    assert hasattr(raw(tokens), "logits")


def test_vit_folder_and_pytorch_model_bin(tf, tmp_path):
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=24, num_labels=10)
    vit = tf.ViTForImageClassification(cfg).eval()
    vit.save_pretrained(str(tmp_path / "vit"))
    # the same weights as a pickle-format pytorch_model.bin folder, and as .bin shards with their index
    saved = safetensors_torch.load_file(str(tmp_path / "vit" / "model.safetensors"))
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "vit" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(saved, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "binsh").mkdir()
    shutil.copy(tmp_path / "vit" / "config.json", tmp_path / "binsh" / "config.json")
    keys = sorted(saved)
    wm = {}
    for j, part in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-0000{j + 1}-of-00002.bin"
        torch.save({k: saved[k] for k in part}, tmp_path / "binsh" / name)
        wm.update({k: name for k in part})
    (tmp_path / "binsh" / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    x = torch.randn(3, 1, 28, 28)
    layer = next(n for n, _ in vit.named_modules() if n.endswith("layers.0.mlp.activation_fn") or n.endswith("layer.0.intermediate.intermediate_act_fn"))
    want, want_act = _hooked(vit, layer, x)
    for folder in ("vit", "bin", "binsh"):
        built = build_model(f"hf:{tmp_path / folder}", in_channels=1, num_classes=10)
        load_checkpoint(tmp_path / folder, built)
        got, got_act = _hooked(built, layer, x)
        assert torch.equal(got, want) and torch.equal(got_act, want_act), folder
        assert got_act.shape == (3, 50, 24)  # 49 patch tokens + the class token
        assert layer in resolve_layers(built, default_units(built))
    # a missing .bin shard
    (tmp_path / "binsh" / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="missing .*pytorch_model-00002-of-00002.bin"):
        load_checkpoint(tmp_path / "binsh", build_model(f"hf:{tmp_path / 'vit'}"))


def test_transformers_architecture_mismatch(tf, tmp_path):
    torch.manual_seed(0)
    _neox(tf, hidden=16).save_pretrained(str(tmp_path / "small"))
    _neox(tf, hidden=24).save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(CheckpointError, match="does not fit the architecture GPTNeoXForCausalLM"):
        load_checkpoint(tmp_path / "wide", build_model(f"hf:{tmp_path / 'small'}"))
    with pytest.raises(CheckpointError, match="2 of 2 checkpoints of neox cannot be used"):
        validate_checkpoints([tmp_path / "wide", tmp_path / "wide"], lambda: build_model(f"hf:{tmp_path / 'small'}"),
                             name="neox")
    (tmp_path / "small" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="config.json but no model weights"):
        load_checkpoint(tmp_path / "small", build_model(f"hf:{tmp_path / 'small'}"))
