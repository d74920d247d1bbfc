"""Token-shaped units ([B, T, C], channels last) through stimuli, importance and reversion, against brute force.

The model is tests/tokennet.py's TinyViT (a Conv stem cutting patch tokens, a class token, two
blocks with an MLP ``Linear -> GELU -> Linear``). Its units are the GELU outputs and a Linear's:
one value per token, so a unit's strength is its max over tokens and its position the token index.
Every result is checked against a loop over single images and single units.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conceptevo import find_stimuli
from conceptevo.config import StimuliConfig, StudyConfig
from conceptevo.errors import ConceptEvoError
from conceptevo.hooks import capture, eval_mode
from conceptevo.importance import evolution_importance
from conceptevo.importance.reversion import reversion_counts, revert
from conceptevo.layers import channel_axes, channel_axis_of, layer_infos
from conceptevo.stimuli import _strength, top_responses
from conceptevo.alignment.cka import layer_responses
from conceptevo.units import LayerInfo
from tokennet import TinyViT

pytestmark = pytest.mark.usefixtures("one_thread_module")

LAYERS = ["blocks.0.mlp.act", "blocks.1.mlp.fc1", "blocks.1.mlp.act"]  # in module order, as results list them
NUM_CLASSES = 6
T, HIDDEN = 17, 12  # 1 class token + (16 / 4)^2 patches


class Images(torch.utils.data.Dataset):
    """36 random images; image 3 is bright and repeated at 20 and 31, so strengths tie across images."""

    def __init__(self, n: int = 36, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 16, 16, generator=g)  # float32, as batches come; models cast them
        self.images[3] *= 3
        self.images[20] = self.images[3]
        self.images[31] = self.images[3]
        self.targets = np.arange(n) % NUM_CLASSES
        self.classes = [f"c{i}" for i in range(NUM_CLASSES)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i]), i


def vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TinyViT(NUM_CLASSES).double().eval()


def evolved(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    other = vit(0)
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other


def per_image_outputs(model, data, layers):
    """layer -> [n, T, C]: each image through the model on its own."""
    rows = {n: [] for n in layers}
    with torch.no_grad():
        for i in range(len(data)):
            with capture(model, layers, lambda n, o: o.detach().clone()) as acts:
                model(data[i][0].unsqueeze(0).to(next(model.parameters()).dtype))
            for n in layers:
                rows[n].append(acts[n][0])
    return {n: torch.stack(v).numpy() for n, v in rows.items()}


def brute_stimuli(acts: np.ndarray, k: int):
    """Per unit: the k best images (ties to the lower index), their strengths and token positions, by loops."""
    n, _, c = acts.shape
    idx, val, pos = np.zeros((c, k), np.int64), np.zeros((c, k)), np.zeros((c, k), np.int64)
    for u in range(c):
        strengths = []
        for i in range(n):
            tokens = acts[i, :, u]
            best = 0
            for t in range(len(tokens)):
                if tokens[t] > tokens[best]:
                    best = t
            strengths.append((-tokens[best], i, best))
        strengths.sort()  # by strength descending, then by image index
        for r, (v, i, t) in enumerate(strengths[:k]):
            idx[u, r], val[u, r], pos[u, r] = i, -v, t
    return idx, val, pos


# ---------------------------------------------------------------- the channel-axis rule
def test_channel_axis_rule():
    conv1d, gelu, lin = nn.Conv1d(2, 3, 1), nn.GELU(), nn.Linear(2, 3)
    assert channel_axis_of(nn.Conv2d(1, 2, 1), 4) == 1 and channel_axis_of(nn.BatchNorm1d(3), 3) == 1
    assert channel_axis_of(conv1d, 3) == 1                      # [B, C, L]
    assert channel_axis_of(lin, 3) == -1 and channel_axis_of(nn.LayerNorm(3), 3) == -1
    assert channel_axis_of(nn.Embedding(5, 3), 3) == -1
    assert channel_axis_of(gelu, 3) == -1 and channel_axis_of(gelu, 4) == 1  # by dims: tokens, maps
    assert channel_axis_of(lin, 2) == 1 and channel_axis_of(gelu, 2, -1) == 1  # [B, C]: nothing to choose
    assert channel_axis_of(gelu, 3, 1) == 1                     # explicit wins
    axes = channel_axes(["a.act", "b.act", "b.fc"], {"*.act": 1, "b.act": -1})
    assert axes == {"a.act": 1, "b.act": -1, "b.fc": None}      # exact name before globs
    assert channel_axes(["a.act"], {"c.*": 1}) == {"a.act": None}  # another model's layers: logged, ignored
    with pytest.raises(ConceptEvoError, match="1 \\(channels first"):
        channel_axes(["a.act"], {"a.act": 2})


def test_layer_infos_record_the_axis():
    model = vit(1)
    infos = layer_infos(model, LAYERS + ["stem"], torch.zeros(2, 3, 16, 16, dtype=torch.float64))
    assert infos[0] == LayerInfo("blocks.0.mlp.act", HIDDEN, (T,), -1)
    assert infos[1].channel_axis == -1 and infos[3] == LayerInfo("stem", 8, (4, 4), 1)
    assert infos[0].to_json()["channel_axis"] == -1 and LayerInfo.from_json(infos[0].to_json()) == infos[0]
    # an override turns the GELU output into 17 channels measured at 12 positions
    (forced,) = layer_infos(model, ["blocks.0.mlp.act"], torch.zeros(1, 3, 16, 16, dtype=torch.float64),
                            channel_axis={"blocks.*.act": 1})
    assert forced == LayerInfo("blocks.0.mlp.act", T, (HIDDEN,), 1)


def test_config_channel_axis(tmp_path):
    from conceptevo.config import _build, load_config

    (tmp_path / "study.toml").write_text(
        '[study]\nout = "s"\n[data]\nkind = "synthetic"\n[[models]]\nname = "v"\narch = "vgg_like"\ncheckpoints = "c"\n'
        '[stimuli]\nk = 3\nchannel_axis = {"blocks.*.mlp.act" = -1, "enc.relu" = 1}\n')
    assert load_config(tmp_path / "study.toml").stimuli.channel_axis == {"blocks.*.mlp.act": -1, "enc.relu": 1}

    sc = _build(StimuliConfig, {"k": 3, "channel_axis": {"blocks.*.mlp.act": -1}}, "[stimuli]")
    sc.validate()
    assert sc.channel_axis == {"blocks.*.mlp.act": -1}
    with pytest.raises(ConceptEvoError, match="stimuli.channel_axis\\['x'\\] must be 1"):
        StimuliConfig(channel_axis={"x": 0}).validate()
    with pytest.raises(ConceptEvoError, match="channel_axis"):
        _build(StimuliConfig, {"channel_axis": "last"}, "[stimuli]")


# ---------------------------------------------------------------- stimuli
@pytest.mark.parametrize("merge", ["layer", "batch"])
def test_stimuli_equal_a_loop_over_images_and_units(merge):
    data, model, k = Images(), vit(1), 5
    acts = per_image_outputs(model, data, LAYERS)
    stim = find_stimuli(model, data, k=k, layers=LAYERS, batch_size=1, merge=merge, progress=False)
    assert [i.channel_axis for i in stim.layers] == [-1, -1, -1]
    assert [i.spatial for i in stim.layers] == [(T,)] * 3
    rows = 0
    ties = 0
    for info in stim.layers:
        idx, val, pos = brute_stimuli(acts[info.name], k)
        sl = slice(rows, rows + info.channels)
        np.testing.assert_array_equal(stim.indices[sl], idx)
        np.testing.assert_array_equal(stim.positions[sl], pos)
        np.testing.assert_allclose(stim.values[sl], val, rtol=1e-6)
        ties += int(sum(len({3, 20, 31} & set(r)) > 1 for r in idx))
        rows += info.channels
    assert ties > 0, "the repeated bright image should tie in some unit's top-k"
    # larger batches merge the same sets (strengths equal up to rounding across batch sizes)
    other = find_stimuli(model, data, k=k, layers=LAYERS, batch_size=7, merge=merge, progress=False)
    np.testing.assert_array_equal(np.sort(other.indices, 1), np.sort(stim.indices, 1))
    np.testing.assert_allclose(other.values, stim.values, rtol=1e-9)


def test_fused_path_takes_tokens_as_maps(monkeypatch):
    """On CUDA the per-batch merge reduces channel-last tokens with the fused kernel through the as_maps view."""
    from conceptevo.stimuli import _fused

    seen = []

    def fake(maps):
        seen.append(maps)
        return maps.flatten(2).max(dim=2)

    monkeypatch.setattr(_fused, "try_max_argmax", fake)
    out = torch.randn(4, T, HIDDEN)
    v, p = _strength(out, LayerInfo.from_output("x", (T, HIDDEN), -1))
    assert seen and seen[0].shape == (4, HIDDEN, T, 1) and seen[0].data_ptr() == out.data_ptr()
    rv, rp = out.max(dim=1)
    assert torch.equal(v, rv) and torch.equal(p, rp)


def test_responses_and_cka_reduce_over_tokens():
    data, model = Images(), vit(1).float()  # layer_responses feeds float32 images
    acts = per_image_outputs(model, data, LAYERS)
    resp = layer_responses(model, data, layers=LAYERS, batch_size=9)
    for n in LAYERS:
        np.testing.assert_allclose(resp[n], acts[n].max(axis=1), rtol=1e-5, atol=1e-6)
    stim = find_stimuli(model, data, k=3, layers=LAYERS, batch_size=9, progress=False)
    top = top_responses(model, data, stim, top=4, batch_size=9, progress=False)
    z = (np.concatenate([acts[n].max(axis=1) for n in LAYERS], axis=1) - stim.mean) / np.maximum(stim.std, 1e-6)
    np.testing.assert_array_equal(np.sort(top, 1), np.sort(np.argsort(-z, axis=1)[:, :4], 1))


# ---------------------------------------------------------------- importance
def brute_sensitivities(m_from, m_to, data, positions, class_index, layers):
    """Per image, per layer its own gradient (through an added zero perturbation); per unit, Eq 5 summed over tokens."""
    rows = []
    for p in positions:
        x = data[int(p)][0].unsqueeze(0).double()
        row = []
        for layer in layers:
            held = {}

            def add_delta(_m, _i, out):
                held["z"] = out.detach().clone()
                held["delta"] = torch.zeros_like(out, requires_grad=True)
                return out + held["delta"]

            h = dict(m_from.named_modules())[layer].register_forward_hook(add_delta)
            try:
                (g,) = torch.autograd.grad(m_from(x)[0, class_index], held["delta"])
            finally:
                h.remove()
            with torch.no_grad(), capture(m_to, [layer], lambda n, o: o.detach().clone()) as acts:
                m_to(x)
            z_to = acts[layer]
            for u in range(g.shape[-1]):
                row.append(sum(float(g[0, t, u] * (z_to[0, t, u] - held["z"][0, t, u])) for t in range(g.shape[1])))
        rows.append(row)
    return np.array(rows)


def test_importance_equals_brute_force():
    data = Images()
    m_from = vit(1)
    m_to = evolved(m_from, 7)
    imp = evolution_importance(m_from, m_to, data, class_index=2, layers=LAYERS, num_images=5, batch_size=2,
                               progress=False)
    assert imp.channels == [HIDDEN] * 3
    ref = brute_sensitivities(m_from, m_to, data, imp.positions, 2, LAYERS)
    np.testing.assert_allclose(imp.sensitivities, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
    assert np.abs(ref).max() > 0


# ---------------------------------------------------------------- reversion
def reverted_by_hand(m_from, m_to, x, layer, units):
    """model_to's logits with each of ``units``' whole token maps at ``layer`` taken from model_from, one at a time."""
    with torch.no_grad(), capture(m_from, [layer], lambda n, o: o.detach().clone()) as src:
        m_from(x)

    def hook(_m, _i, out):
        out = out.clone()
        for u in units:
            for t in range(out.shape[1]):
                out[:, t, u] = src[layer][:, t, u]
        return out

    h = dict(m_to.named_modules())[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return m_to(x)
    finally:
        h.remove()


def test_revert_replaces_whole_token_maps():
    data = Images()
    m_from = vit(1)
    m_to = evolved(m_from, 7, scale=1.0)
    x = data.images[:8].double()
    for layer in LAYERS:
        for units in ([0], [3, 5, 11]):
            with torch.no_grad(), revert(m_to, layer, units, m_from):
                got = m_to(x)
            torch.testing.assert_close(got, reverted_by_hand(m_from, m_to, x, layer, units), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, m_to(x).detach())


def test_reversion_counts_equal_a_loop_over_units():
    data = Images()
    m_from = vit(1)
    m_to = evolved(m_from, 7, scale=1.5)
    pos = np.arange(0, 36, 2)
    rng = np.random.default_rng(0)
    masks = {n: np.vstack([np.eye(HIDDEN, dtype=bool)[[0, 4, 9]], rng.random(HIDDEN) < 0.5]) for n in LAYERS}
    with eval_mode(m_from, m_to):
        clean, rev, n = reversion_counts(m_from, m_to, data, pos, masks, batch_size=5)
        _, rev_direct, _ = reversion_counts(m_from, m_to, data, pos, masks, batch_size=5, fork=False)
    x, y = data.images[pos].double(), torch.as_tensor(data.targets[pos])
    for li, layer in enumerate(LAYERS):
        for v, row in enumerate(masks[layer]):
            top = reverted_by_hand(m_from, m_to, x, layer, np.flatnonzero(row).tolist()).topk(5, dim=1).indices
            expect = [int((top[:, 0] == y).sum()), int((top == y[:, None]).any(1).sum())]
            assert rev[li, v].tolist() == expect and rev_direct[li, v].tolist() == expect, (layer, v)
    assert n == len(pos)
    assert (rev[:, :, 0] != clean[0]).any(), "some reversion should change the top-1 count, or the test shows nothing"


# ---------------------------------------------------------------- a mixed study
def _train_and_save(model: nn.Module, data, folder, steps=(2, 5)) -> None:
    """Raw state_dicts after a few SGD steps, as model_e1.pth, model_e2.pth."""
    folder.mkdir()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.stack([data[i][0] for i in range(48)])
    y = torch.tensor([data[i][1] for i in range(48)])
    done = 0
    for e, total in enumerate(steps, start=1):
        for _ in range(total - done):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        done = total
        torch.save(model.state_dict(), folder / f"model_e{e}.pth")


def test_mixed_study_cnn_and_transformer(tmp_path, caplog):
    """run_study with a CNN and the small ViT (own module, arch "tokennet:..."), one layer glob for both."""
    import logging
    from pathlib import Path

    from conceptevo.config import DataConfig, EmbeddingConfig, LayoutConfig, ModelConfig
    from conceptevo.data import open_dataset
    from conceptevo.pipeline import run_study, study_pool
    from tokennet import TinyCNN

    here = str(Path(__file__).parent)
    data = open_dataset("synthetic", split="train", n=160, size=16)
    torch.manual_seed(0)
    _train_and_save(TinyCNN(), data, tmp_path / "cnn")
    torch.manual_seed(0)
    _train_and_save(TinyViT(), data, tmp_path / "vit")
    models = [ModelConfig(name=n, arch=f"tokennet:{a}", checkpoints=str(tmp_path / n), import_path=[here], allow_chance=True)
              for n, a in (("cnn", "TinyCNN"), ("vit", "TinyViT"))]
    config = StudyConfig(out=str(tmp_path / "study"), data=DataConfig(kind="synthetic", pool=120, options={"n": 160, "size": 16}),
                         models=models, stimuli=StimuliConfig(k=3, layers=["*.act"], channel_axis={"blocks.*.mlp.act": -1}),
                         embedding=EmbeddingConfig(dim=4, epochs=20), layout=LayoutConfig(method="pca")).validate()
    with caplog.at_level(logging.INFO, logger="conceptevo"):
        ws = run_study(config, progress=False, allow_chance=True)
    for m, axis, layers, spatial in (("cnn", 1, ["conv1.act", "conv2.act"], [(16, 16), (8, 8)]),
                                     ("vit", -1, ["blocks.0.mlp.act", "blocks.1.mlp.act"], [(T,), (T,)])):
        for tag in ws.tags(m):
            stim = ws.stimuli(m, tag)
            assert [i.name for i in stim.layers] == layers and [i.channel_axis for i in stim.layers] == [axis] * 2
            assert [i.spatial for i in stim.layers] == spatial
            for info, sl in zip(stim.layers, stim.layer_slices().values()):
                pos = np.asarray(stim.positions[sl])
                assert pos.min() >= 0 and pos.max() < info.num_positions
            xy = ws.layout(m, tag)
            assert len(xy) == len(stim) and np.isfinite(xy).all()
    # the ViT's stimuli equal a direct find_stimuli of its last checkpoint on the same pool
    vit = TinyViT()
    vit.load_state_dict(torch.load(tmp_path / "vit" / "model_e2.pth"))
    direct = find_stimuli(vit.eval(), study_pool(config.data), k=3, layers=["*.act"], progress=False)
    np.testing.assert_array_equal(np.asarray(ws.stimuli("vit", "model_e2").indices), direct.indices)
    np.testing.assert_array_equal(np.asarray(ws.stimuli("vit", "model_e2").positions), direct.positions)
    assert ws.config["stimuli"]["channel_axis"] == {"blocks.*.mlp.act": -1}
    assert "channel_axis 'blocks.*.mlp.act' matches none of the layers conv1.act, conv2.act" in caplog.text
    # token units' example patches are whole stimulus images with the argmax token's patch marked
    boxes = np.load(ws.path / "patches" / "vit" / "model_e2" / "boxes.npy")
    assert (boxes == np.array([0, 0, 16, 16])).all()
    marks = np.load(ws.path / "patches" / "vit" / "model_e2" / "marks.npy")
    pos = np.asarray(ws.stimuli("vit", "model_e2").positions)
    for n, j in np.ndindex(pos.shape):  # 1 class token + a 4x4 grid of 4-pixel patches, by hand
        r, c = divmod(int(pos[n, j]) - 1, 4)
        want = [0, 0, 16, 16] if pos[n, j] == 0 else [4 * r, 4 * c, 4 * r + 4, 4 * c + 4]
        assert marks[n, j].tolist() == want
    assert not (ws.path / "patches" / "cnn" / "model_e2" / "marks.npy").exists()
    from conceptevo.patches import PatchStore
    from conceptevo.patches.sheets import crop_patches

    store = PatchStore(ws)
    shown = store.patches("vit", "model_e2", 0)
    rows = np.searchsorted(store.image_indices, np.asarray(ws.stimuli("vit", "model_e2").indices[:1]))
    plain = crop_patches(np.load(ws.path / "patches" / "images" / "pixels.npy"), rows, boxes[:1], shown.shape[1])[0]
    assert (shown != plain).any(axis=(1, 2, 3)).all()  # every patch carries its mark
    assert (np.load(ws.path / "patches" / "cnn" / "model_e2" / "boxes.npy")[:, :, 2] < 16).any()  # conv: real crops
