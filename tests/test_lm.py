"""Language models: lm_tiny, GPT-NeoX from a config, the checkpoint schedule, training and model folders."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from conceptevo.data.text import TextWindows, encode_corpus, generated_text, load_tokenizer
from conceptevo.errors import CheckpointError, ConceptEvoError
from conceptevo.models.lm import TinyLM, gpt_neox_tiny, lm_logits, lm_loss, lm_tiny
from conceptevo.models.train_lm import checkpoint_steps, load_lm_folder, save_lm_folder, step_folders, train_lm
from conceptevo.models.zoo import build_model

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _windows(tmp_path, n_lines=600, context=32):
    f = tmp_path / "g.txt"
    f.write_text(generated_text(n_lines, seed=0), encoding="utf-8")
    tokens, tk = encode_corpus(f)
    return TextWindows(tokens, context, stride=context // 2, tokenizer=tk)


def test_checkpoint_steps():
    assert checkpoint_steps(0, 10) == [0]
    assert checkpoint_steps(5, 10) == [0, 1, 2, 4, 5]
    assert checkpoint_steps(100, 25) == [0, 1, 2, 4, 8, 16, 25, 32, 50, 64, 75, 100]
    pythia = checkpoint_steps(143000, 1000)
    assert len(pythia) == 154 and pythia[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert pythia[11:14] == [1000, 2000, 3000] and pythia[-1] == 143000
    assert checkpoint_steps(1030, 1000) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1030]
    assert checkpoint_steps(100, 30, log_until=4) == [0, 1, 2, 4, 30, 60, 90, 100]
    for bad in [(-1, 10), (10, 0), (10.0, 5), (True, 5)]:
        with pytest.raises(ConceptEvoError):
            checkpoint_steps(*bad)


def test_lm_tiny_is_causal_and_exposes_token_shaped_units():
    torch.manual_seed(0)
    m = lm_tiny(vocab_size=20, d_model=32, n_layers=2, n_heads=4, context=16).eval()
    ids = torch.randint(0, 20, (3, 16))
    seen = {}
    hooks = [m.get_submodule(f"blocks.{i}.mlp.act").register_forward_hook(
        lambda mod, inp, out, i=i: seen.__setitem__(i, out)) for i in range(2)]
    try:
        logits = m(ids)
    finally:
        for h in hooks:
            h.remove()
    assert logits.shape == (3, 16, 20)
    assert seen[0].shape == seen[1].shape == (3, 16, 128)  # [B, T, C]: hooks fire, no fused fast path
    # causal: changing token 10 leaves the logits of positions 0..9 as they were
    ids2 = ids.clone()
    ids2[:, 10] = (ids2[:, 10] + 1) % 20
    logits2 = m(ids2)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-6)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    with pytest.raises(ConceptEvoError, match="context"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ConceptEvoError, match="vocab_size"):
        lm_tiny()
    assert isinstance(build_model("lm_tiny", vocab_size=20, seed=1), TinyLM)


def test_lm_tiny_learns_generated_text(tmp_path):
    ds = _windows(tmp_path)
    torch.manual_seed(0)
    model = lm_tiny(ds.tokenizer.vocab_size, d_model=48, n_layers=2, n_heads=4, context=32)
    log = train_lm(model, ds, tmp_path / "run", steps=60, every=30, batch_size=16, lr=3e-3, seed=0)
    loss = log["loss"]
    assert len(loss) == 60
    assert loss[0] > np.log(ds.tokenizer.vocab_size) - 0.5  # starts near uniform
    assert np.mean(loss[-10:]) < 0.6 * np.mean(loss[:5])
    assert [s for s, _ in step_folders(tmp_path / "run")] == checkpoint_steps(60, 30) == log["checkpoints"]
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["loss"] == loss
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").chars == ds.tokenizer.chars
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary folders left
    # the last checkpoint is the trained model: identical logits after loading
    back = load_lm_folder(tmp_path / "run" / "step60")
    ids, targets = ds.batch([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(back(ids), model.eval()(ids))
        first = load_lm_folder(tmp_path / "run" / "step0")
        assert lm_loss(first, ids, targets) > lm_loss(back, ids, targets) + 0.5


def test_training_is_reproducible(tmp_path):
    ds = _windows(tmp_path, n_lines=100, context=16)
    runs = []
    for r in range(2):
        torch.manual_seed(3)
        m = lm_tiny(ds.tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, context=16)
        runs.append(train_lm(m, ds, tmp_path / f"r{r}", steps=5, every=5, batch_size=4, seed=7)["loss"])
    assert runs[0] == runs[1]


def test_model_folder_round_trip_and_damage(tmp_path):
    torch.manual_seed(0)
    m = lm_tiny(vocab_size=30, d_model=32, n_layers=2, n_heads=2, d_mlp=40, context=8).eval()
    folder = save_lm_folder(m, tmp_path / "step7")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["conceptevo_arch"] == "lm_tiny" and cfg["d_mlp"] == 40 and cfg["vocab_size"] == 30
    ids = torch.randint(0, 30, (2, 8))
    back = load_lm_folder(folder)
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))
    save_lm_folder(m, folder)  # replacing an existing folder works and leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step7"]
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_lm_folder(folder)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_lm_folder(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither"):
        load_lm_folder(tmp_path / "x")


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="needs the optional 'transformers' package")
def test_gpt_neox_tiny_saves_and_loads_offline(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = gpt_neox_tiny(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, context=16).eval()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    unit = m.get_submodule("gpt_neox.layers.1.mlp.act")
    seen = []
    h = unit.register_forward_hook(lambda mod, i, o: seen.append(o))
    ids = torch.randint(0, 40, (2, 16))
    try:
        with torch.no_grad():
            logits = lm_logits(m, ids)
    finally:
        h.remove()
    assert logits.shape == (2, 16, 40) and seen[0].shape == (2, 16, 128)
    # any network access would fail the test
    import socket
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    ds = TextWindows(torch.randint(0, 40, (400,)), 16)
    log = train_lm(m, ds, tmp_path / "neox", steps=4, every=2, batch_size=4)
    assert [s for s, _ in step_folders(tmp_path / "neox")] == [0, 1, 2, 4]
    f = tmp_path / "neox" / "step4"
    assert (f / "config.json").is_file() and (f / "model.safetensors").is_file()
    back = load_lm_folder(f)
    with torch.no_grad():
        assert torch.allclose(lm_logits(back, ids), lm_logits(m.eval(), ids), atol=1e-5)
    assert len(log["loss"]) == 4


def test_train_text_on_the_generated_corpus(tmp_path):
    from conceptevo.models.train_lm import train_text

    log = train_text(tmp_path / "run", corpus="generated", context=16, d_model=16, n_layers=1, n_heads=2,
                     steps=3, every=3, batch_size=4, seed=1)
    assert log["arch"] == "lm_tiny" and log["corpus"] == "generated" and log["checkpoints"] == [0, 1, 2, 3]
    m = load_lm_folder(tmp_path / "run" / "step3")
    assert m.hparams["d_model"] == 16 and m.hparams["context"] == 16
    with pytest.raises(ConceptEvoError, match="does not exist"):
        train_text(tmp_path / "r2", corpus=str(tmp_path / "nope"), steps=1)
