"""PyTorch's fused transformer fast path: slow_path() makes every hook fire, explain_unfired() names the cause."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from conceptevo.models import build_model
from conceptevo.models.fastpath import explain_unfired, has_fast_path, slow_path


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0), 2,
                                             enable_nested_tensor=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x, mask=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=mask)[:, 0])


def _global_hook_calls(model, x, **kw):
    """The linear1 modules a process-wide forward hook saw run (such hooks do not take a layer off its fast path)."""
    targets = {m: n for n, m in model.named_modules() if n.endswith("linear1")}
    seen = []
    h = register_module_forward_hook(lambda m, i, o: seen.append(targets[m]) if m in targets else None)
    try:
        with torch.no_grad():
            out = model(x, **kw)
    finally:
        h.remove()
    return seen, out


def test_hooks_on_linear1_fire_in_eval_only_on_the_slow_path():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 5, 3)
    seen, fast = _global_hook_calls(net, x)
    assert seen == []  # the fused kernel ran: linear1 never called
    with slow_path(net):
        seen, slow = _global_hook_calls(net, x)
    assert seen == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-5)
    # restored on exit: the fast path again
    assert _global_hook_calls(net, x)[0] == [] and torch.backends.mha.get_fastpath_enabled()
    assert all(layer.activation_relu_or_gelu for layer in net.encoder.layers)


def test_slow_path_gives_plain_activations_with_a_padding_mask():
    """With a padding mask the encoder's fast path turns activations into nested tensors; the slow path keeps [B, T, C]."""
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 5, 3)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    got = {}
    h = net.encoder.layers[0].linear1.register_forward_hook(lambda m, i, o: got.__setitem__("a", o))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that nested tensors are a prototype
        net(x, mask)
    fast_nested = got["a"].is_nested
    with torch.no_grad(), slow_path(net):
        net(x, mask)
    h.remove()
    assert got["a"].shape == (2, 5, 16) and not got["a"].is_nested
    assert fast_nested  # the trap this guards against, as torch 2.13 has it


def test_slow_path_restores_the_switch_after_an_error():
    with pytest.raises(RuntimeError):
        with slow_path():
            assert not torch.backends.mha.get_fastpath_enabled()
            raise RuntimeError("boom")
    assert torch.backends.mha.get_fastpath_enabled()


def test_explain_unfired_names_the_fast_path_and_the_fix():
    net = Net()
    msg = explain_unfired(net, "encoder.layers.1.linear1")
    assert "TransformerEncoderLayer 'encoder.layers.1'" in msg and "slow_path" in msg and "set_fastpath_enabled(False)" in msg
    msg = explain_unfired(net, "encoder.layers.0.self_attn.out_proj")
    assert "never calls as a module" in msg and "'encoder.layers.0.self_attn'" in msg
    assert explain_unfired(net, "head") is None and explain_unfired(net, "no.such") is None
    # the claim about out_proj is true even on the slow path
    fired = []
    net.encoder.layers[0].self_attn.out_proj.register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad(), slow_path(net):
        net.train()(torch.randn(2, 5, 3))
    assert fired == []
    # a hand-written block (the built-in ViT) has nothing to explain and no fast path
    vit = build_model("vit_tiny", dim=16, depth=1, heads=2, mlp=8)
    assert not has_fast_path(vit) and has_fast_path(net)
    assert explain_unfired(vit, "blocks.0.mlp.act") is None


# ---------------------------------------------------------------- every pass runs on the slow path
class Images(torch.utils.data.Dataset):
    """Random 'images' of 6 tokens x 3 features (the Net above embeds tokens; no stem needed)."""

    def __init__(self, n: int = 20):
        self.x = torch.randn(n, 6, 3, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 4, i


class PaddedNet(Net):
    """Net whose forward always passes a padding mask (last token padded): in eval the encoder's fast path
    then hands linear1 nested tensors, even though a hook sits on linear1."""

    def forward(self, x, mask=None):
        mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        mask[:, -1] = True
        return super().forward(x, mask)


@pytest.mark.parametrize("cls", [Net, PaddedNet])
def test_stimuli_of_linear1_in_eval_equal_a_brute_force_on_the_slow_path(cls):
    from conceptevo import find_stimuli
    from conceptevo.hooks import layer_hooks

    torch.manual_seed(0)
    net = cls().eval()
    data = Images()
    layers = ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    with layer_hooks(net, layers) as outs:
        assert not torch.backends.mha.get_fastpath_enabled()  # inside every pass: the slow path
    assert torch.backends.mha.get_fastpath_enabled()
    # brute force: each image alone, plain hooks, the slow path by hand
    acts = {n: [] for n in layers}
    mods = dict(net.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, _n=n: acts[_n].append(o[0].detach().clone())) for n in layers]
    with torch.no_grad(), slow_path(net), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(data)):
            net(data[i][0].unsqueeze(0))
    for h in hs:
        h.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stim = find_stimuli(net, data, k=4, layers=layers, batch_size=8, progress=False)
    assert [i.channel_axis for i in stim.layers] == [-1, -1] and [i.spatial for i in stim.layers] == [(6,), (6,)]
    row = 0
    for n in layers:
        a = torch.stack(acts[n])                      # [images, tokens, units]
        best, where = a.max(dim=1)                    # [images, units]
        for u in range(a.shape[2]):
            order = sorted(range(len(data)), key=lambda i: (-float(best[i, u]), i))[:4]
            assert list(stim.indices[row]) == order
            assert list(stim.positions[row]) == [int(where[i, u]) for i in order]
            np.testing.assert_allclose(stim.values[row], [float(best[i, u]) for i in order], rtol=1e-5, atol=1e-6)
            row += 1


def test_a_layer_that_never_runs_names_the_cause():
    from conceptevo.errors import LayerNotFoundError
    from conceptevo.hooks import forward_until

    net = Net().eval()
    with pytest.raises(LayerNotFoundError, match="never ran.*never calls as a module.*'encoder.layers.0.self_attn'"):
        forward_until(net, ["encoder.layers.0.self_attn.out_proj"], torch.randn(2, 5, 3))
    plain = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(LayerNotFoundError, match="choose modules that the model's forward"):
        with __import__("conceptevo.hooks").hooks.layer_hooks(plain, ["1"]) as outs:
            plain[0](torch.randn(1, 3))
        outs.require_all()


def test_default_units_of_a_vit_are_its_mlp_hidden_units():
    from conceptevo.layers import resolve_layers

    vit = build_model("vit_tiny", dim=16, depth=2, heads=2, mlp=8)
    assert resolve_layers(vit, None) == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    cnn = build_model("vgg_like")
    assert resolve_layers(cnn, None) == [n for n, m in cnn.named_modules() if isinstance(m, nn.Conv2d)]
    # a model stating its own units; one with neither Conv2d nor stated units is told what to do
    net = Net()
    net.default_units = "encoder.layers.*.linear1"
    assert resolve_layers(net, None) == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    from conceptevo.errors import LayerNotFoundError
    with pytest.raises(LayerNotFoundError, match="no Conv2d layer"):
        resolve_layers(Net(), None)
