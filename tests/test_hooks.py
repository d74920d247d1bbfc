"""The one hook helper, the mode context, the device check and the unit model (conceptevo.hooks / conceptevo.units)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conceptevo.alignment.cka import layer_responses
from conceptevo.errors import ConceptEvoError, LayerNotFoundError, NonFiniteActivationError
from conceptevo.hooks import capture, check_model_device, eval_mode, forward_until, layer_hooks, replace_outputs, train_mode
from conceptevo.layers import layer_infos
from conceptevo.models.train import accuracy, recalibrate_batchnorm
from conceptevo.stimuli import find_stimuli, top_responses
from conceptevo.units import (LayerInfo, layer_of, neuron_id, rows_by_layer, split_neuron_id, strength,
                              strength_and_position)


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5), Counted())


def _data(n=24):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 5)


# ---------------------------------------------------------------------------------------------- modes
def _frozen_bn_in_training_model():
    net = _net()
    net.train()
    net[1].eval()  # the user's frozen BatchNorm inside a model that trains
    return net


def _flags(net):
    return [m.training for m in net.modules()]


def test_eval_mode_gives_every_module_its_own_flag_back():
    net = _frozen_bn_in_training_model()
    before = _flags(net)
    with eval_mode(net):
        assert not any(_flags(net))
    assert _flags(net) == before and not net[1].training and net.training
    with train_mode(net):
        assert all(_flags(net))
    assert _flags(net) == before


def test_eval_mode_restores_flags_after_an_error():
    net = _frozen_bn_in_training_model()
    before = _flags(net)
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(net):
            raise RuntimeError("boom")
    assert _flags(net) == before


@pytest.mark.parametrize("run", [
    lambda net, ds: find_stimuli(net, ds, k=3, progress=False),
    lambda net, ds: layer_responses(net, ds),
    lambda net, ds: accuracy(net, ds),
    lambda net, ds: recalibrate_batchnorm(net, ds, np.arange(8)),
    lambda net, ds: layer_infos(net, ["0", "3"], ds.tensors[0][:2]),
    lambda net, ds: top_responses(net, ds, find_stimuli(net, ds, k=3, progress=False), top=2, progress=False, num_images=len(ds)),
], ids=["find_stimuli", "layer_responses", "accuracy", "recalibrate_batchnorm", "layer_infos", "top_responses"])
def test_a_frozen_batchnorm_stays_frozen(run):
    # model.train(was) after the pass would set the frozen BatchNorm back to training
    net = _frozen_bn_in_training_model()
    run(net, _data())
    assert net.training and not net[1].training


# ---------------------------------------------------------------------------------------------- hooks
def test_capture_records_outputs_and_removes_hooks():
    net = _net().eval()
    x = torch.randn(2, 1, 8, 8)
    with capture(net, ["0", "5"]) as outs:
        y = net(x)
        outs.require_once()
    assert outs["0"].shape == (2, 4, 6, 6) and torch.equal(outs["5"], y)
    assert all(not m._forward_hooks for m in net.modules())


def test_capture_with_fn_keeps_only_the_reduction():
    net = _net().eval()
    with capture(net, ["0"], lambda name, o: o.shape) as outs:
        net(torch.randn(3, 1, 8, 8))
    assert outs["0"] == (3, 4, 6, 6)


def test_replace_changes_what_the_rest_of_the_network_sees():
    net = _net().eval()
    x = torch.randn(2, 1, 8, 8)
    with replace_outputs(net, {"5": lambda o: torch.zeros_like(o) + 7}) as calls:
        y = net(x)
    assert calls.calls == {"5": 1}
    assert torch.equal(y, torch.full((2, 5), 7.0))
    assert not torch.equal(net(x), y)  # hook gone


def test_until_stops_after_the_last_needed_layer():
    net = _net().eval()
    x = torch.randn(2, 1, 8, 8)
    outs = forward_until(net, ["0", "3"], x)
    assert set(outs) == {"0", "3"} and outs["3"].shape == (2, 3, 4, 4)
    assert net[6].calls == 0  # nothing after layer "3" ran
    with capture(net, ["3"]) as full:
        net(x)
    assert torch.equal(outs["3"], full["3"]) and net[6].calls == 1
    assert all(not m._forward_hooks for m in net.modules())


def test_hook_errors_name_the_problem():
    net = _net().eval()
    with pytest.raises(LayerNotFoundError, match="'nope' is not a module"):
        with capture(net, ["nope"]):
            pass
    with pytest.raises(LayerNotFoundError, match="never ran"):
        with capture(net, ["0"]) as outs:
            outs.require_all()
    with pytest.raises(ConceptEvoError, match="mode="):
        with layer_hooks(net, ["0"], mode="bogus"):
            pass
    twice = nn.Sequential(nn.Linear(3, 3))
    twice.forward = lambda x: twice[0](twice[0](x))
    with pytest.raises(LayerNotFoundError, match="more than once"):
        with capture(twice, ["0"]) as outs:
            twice(torch.randn(1, 3))
            outs.require_once()


def test_hooks_are_removed_when_the_forward_fails():
    net = _net().eval()
    with pytest.raises(RuntimeError):
        with capture(net, ["0"]):
            net(torch.randn(2, 3, 8, 8))  # wrong channel count
    assert all(not m._forward_hooks for m in net.modules())


# ---------------------------------------------------------------------------------------------- errors, devices
def test_non_finite_activations_are_a_typed_error_naming_the_layer():
    net = _net().eval()
    with torch.no_grad():
        net[3].weight[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError) as err:
        find_stimuli(net, _data(), k=3, progress=False)
    assert err.value.layer == "3" and "layer '3' produced NaN or Inf activations" in str(err.value)
    again = pickle.loads(pickle.dumps(err.value))
    assert again.layer == "3" and str(again) == str(err.value)


def test_device_check_names_where_the_model_is():
    net = _net()
    assert check_model_device(net, "cpu") == torch.device("cpu")
    assert check_model_device(None, "cpu") == torch.device("cpu")
    with pytest.raises(ConceptEvoError, match=r"the model is on meta but device='cpu'; move it first"):
        check_model_device(net.to("meta"), "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConceptEvoError, match="no CUDA GPU"):
            check_model_device(None, "cuda")


# ---------------------------------------------------------------------------------------------- units
def test_neuron_ids_format_and_parse_in_one_place():
    assert neuron_id("features.3", 12) == "features.3:12"
    assert split_neuron_id("blocks.0.attn:qkv:7") == ("blocks.0.attn:qkv", 7)
    assert layer_of("a.b:0") == "a.b"
    assert rows_by_layer(["a:0", "b:0", "a:1"]) == {"a": [0, 2], "b": [1]}
    for bad in ("features.3", ":3", "x:y", "x:-1"):
        with pytest.raises(LayerNotFoundError, match="malformed neuron id"):
            split_neuron_id(bad)


def test_layer_info_from_outputs_of_each_kind():
    conv = LayerInfo.from_output("c", (4, 6, 5))
    assert (conv.channels, conv.position_shape, conv.num_positions, conv.spatial) == (4, (6, 5), 30, (6, 5))
    tokens = LayerInfo.from_output("t", (7, 16), channel_axis=-1)
    assert (tokens.channels, tokens.position_shape, tokens.num_positions) == (16, (7,), 7)
    assert LayerInfo.from_output("fc", (10,)).position_shape == ()
    assert conv.unravel(13) == tuple(np.unravel_index(13, (6, 5)))
    assert LayerInfo.from_json(tokens.to_json()) == tokens and LayerInfo.from_json(conv.to_json()) == conv
    assert conv.to_json() == {"name": "c", "channels": 4, "spatial": [6, 5]}  # the stimuli file format, unchanged
    with pytest.raises(ConceptEvoError, match="channel_axis"):
        LayerInfo("x", 3, (), channel_axis=2)
    with pytest.raises(ConceptEvoError, match="reduce="):
        LayerInfo("x", 3, (), reduce="median")


def test_strength_is_the_same_for_channels_first_and_channels_last_layouts():
    g = torch.Generator().manual_seed(0)
    first = torch.randn(3, 5, 4, 6, generator=g)                 # [B, C, H, W]
    flat = first.flatten(2)
    assert torch.equal(strength(first), flat.amax(2))
    v, p = strength_and_position(first)
    assert torch.equal(v, flat.amax(2)) and torch.equal(p, flat.argmax(2))
    tokens = flat.transpose(1, 2).contiguous()                    # [B, T, C], one value per token
    assert torch.equal(strength(tokens, channel_axis=-1), flat.amax(2))
    vt, pt = strength_and_position(tokens, channel_axis=-1)
    assert torch.equal(vt, v) and torch.equal(pt, p)
    assert torch.allclose(strength(tokens, channel_axis=-1, reduce="mean"), flat.mean(2))
    linear = torch.randn(3, 5, generator=g)
    assert strength(linear) is linear
    lv, lp = strength_and_position(linear)
    assert torch.equal(lv, linear) and lv is not linear and not lp.any()


def test_diagnosis_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    # matplotlib.use("Agg") in library code switched a notebook's backend; Figure objects need no backend
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import matplotlib
matplotlib.use("pdf")
import matplotlib.pyplot as plt
from conceptevo.diagnostics import Diagnosis, plot_diagnosis
from conceptevo.diagnostics.metrics import CheckpointMetrics
cs = [CheckpointMetrics("m", f"e{{i}}", float(i), {{"all": 1.0 + i}}, {{"all": 0.1 * i}}, {{"all": 0.5}}, {{"train_top1": 0.3 * i}})
      for i in range(3)]
files = plot_diagnosis(Diagnosis({{"m": cs}}), {str(tmp_path)!r})
print(matplotlib.get_backend(), len(plt.get_fignums()), sorted(name + ".png" for name in files))
"""
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "MPLBACKEND": ""})
    assert out.stdout.split() == ["pdf", "0", "['collapse.png',", "'diversity.png',", "'layers.png',", "'speed.png']"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in ("collapse.png", "diversity.png", "layers.png", "speed.png"))
