"""The built-in ViT (vit_tiny): tokens, patches, hooks on its MLP units, training with the CNNs' checkpoint schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptevo.errors import ConceptEvoError
from conceptevo.layers import resolve_layers
from conceptevo.models import build_model, list_checkpoints, load_checkpoint
from conceptevo.models.train import TrainConfig, train
from conceptevo.models.zoo import default_units


def _act(model, layer, x):
    got = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: got.setdefault("a", o.detach()))
    with torch.no_grad():
        out = model(x)
    h.remove()
    return out, got["a"]


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_mlp_units_hooked_in_eval(channels):
    model = build_model("vit_tiny", in_channels=channels, num_classes=7, width=99, seed=0).eval()  # width: ignored
    x = torch.randn(5, channels, 28, 28)
    out, act = _act(model, "blocks.3.mlp.act", x)
    assert out.shape == (5, 7)
    assert act.shape == (5, 50, 128)  # [B, T, C]: 49 patch tokens + the class token, 128 MLP hidden units
    # the act module's output is what fc2 reads: GELU of fc1
    _, pre = _act(model, "blocks.3.mlp.fc1", x)
    torch.testing.assert_close(act, torch.nn.functional.gelu(pre))
    assert resolve_layers(model, default_units(model)) == [f"blocks.{i}.mlp.act" for i in range(4)]
    assert default_units(build_model("vgg_like")) is None


def test_token_patch_is_the_patch_each_token_embeds():
    """Brute force: changing the pixels of token t's box changes token t's patch embedding and no other."""
    model = build_model("vit_tiny", seed=0).eval()
    x = torch.rand(1, 1, 28, 28)
    base = model.patch_embed(x).flatten(2).transpose(1, 2)[0]  # [49, dim], token t = row t-1
    assert model.token_patch(0) is None
    for t in (1, 2, 7, 8, 25, 49):
        top, left, bottom, right = model.token_patch(t)
        y = x.clone()
        y[..., top:bottom, left:right] += 1.0
        changed = (model.patch_embed(y).flatten(2).transpose(1, 2)[0] - base).abs().sum(1) > 1e-6
        assert changed.nonzero().flatten().tolist() == [t - 1]
    with pytest.raises(ConceptEvoError, match="out of range"):
        model.token_patch(50)
    with pytest.raises(ConceptEvoError, match="expects 28x28"):
        model(torch.rand(1, 1, 32, 32))


def test_trains_with_the_cnn_checkpoint_schedule(tmp_path):
    from conftest import bright_top_half

    ds = bright_top_half(256)
    model = build_model("vit_tiny", num_classes=2, dim=32, depth=2, heads=2, mlp=64, seed=0)
    cks = train(model, ds, ds, tmp_path, TrainConfig(epochs=3, lr=0.05, batch_size=32, first_epoch_checkpoints=2,
                                                     eval_images=128), progress=False)
    assert [c.tag for c in cks] == ["e0.5", "e1", "e2", "e3"]  # as the CNNs' schedule gives
    assert cks[-1].metrics["train_top1"] > 0.9
    listed = list_checkpoints(tmp_path)
    again = load_checkpoint(listed[-1].path, build_model("vit_tiny", num_classes=2, dim=32, depth=2, heads=2, mlp=64))
    xb = ds.images[:8]
    with torch.no_grad():
        assert torch.equal(again.eval()(xb), model.eval()(xb))


def test_timm_and_torchvision_vits_by_name(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ConceptEvoError, match=r"install the 'timm' extra: pip install 'conceptevo\[timm\]'"):
        build_model("timm:vit_tiny_patch16_224")
    monkeypatch.undo()
    pytest.importorskip("torchvision")
    vit = build_model("tv:vit_b_16", in_channels=3, num_classes=5, seed=0).eval()
    layers = resolve_layers(vit, default_units(vit))
    assert len(layers) == 12 and layers[0] == "encoder.layers.encoder_layer_0.mlp.1"
    _, act = _act(vit, layers[0], torch.randn(1, 3, 224, 224))
    assert act.shape == (1, 197, 3072)  # 14x14 patches + the class token; 3072 MLP hidden units
