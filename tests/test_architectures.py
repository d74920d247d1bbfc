"""Any architecture: branching/concatenating, grouped and depthwise convolutions, Linear units, torchvision models."""
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conceptevo import find_stimuli
from conceptevo.importance import evolution_importance
from conceptevo.layers import resolve_layers
sys.path.insert(0, os.path.dirname(__file__))
from test_stimuli import brute_force  # noqa: E402


class Inceptionish(nn.Module):
    """Parallel branches concatenated, a grouped conv, a depthwise-separable pair, a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.bpool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(8, 2, 1))
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, stride=2)
        self.pw = nn.Conv2d(12, 10, 1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.cat([self.b1(h), self.b3(h), self.bpool(h)], dim=1)
        h = torch.relu(self.grouped(torch.relu(h)))
        h = torch.relu(self.pw(torch.relu(self.dw(h))))
        return self.fc(h.mean(dim=(2, 3)))


def test_branching_grouped_depthwise_and_linear(tiny_data):
    torch.manual_seed(0)
    m = Inceptionish()
    layers = resolve_layers(m, [nn.Conv2d, nn.Linear])
    assert "b3.2" in layers and "fc" in layers and "dw" in layers
    s = find_stimuli(m, tiny_data, k=4, layers=layers, batch_size=16, progress=False)
    bi, bv, _ = brute_force(m, tiny_data, 4, layers)
    np.testing.assert_array_equal(s.indices, bi)
    np.testing.assert_allclose(s.values, bv, rtol=1e-5, atol=1e-6)
    assert s.neuron_ids[-1] == "fc:3"


def test_importance_on_branching_model(tiny_data):
    torch.manual_seed(0)
    a = Inceptionish()
    torch.manual_seed(1)
    b = Inceptionish()
    imp = evolution_importance(a, b, tiny_data, 1, num_images=10, progress=False)
    assert imp.sensitivities.shape == (10, len(imp.neuron_ids))
    assert ((imp.scores >= 0) & (imp.scores <= 1)).all()




@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet50", "inception_v3", "convnext_tiny"])
def test_torchvision_architectures(name):
    pytest.importorskip("torchvision", reason="torchvision is optional (the 'vision' extra)")
    from conceptevo import build_model

    m = build_model(f"tv:{name}", in_channels=3, num_classes=5).eval()
    size = 299 if name == "inception_v3" else 64
    x = torch.rand(12, 3, size, size)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(12, dtype=torch.long))
    s = find_stimuli(m, ds, k=3, batch_size=6, progress=False)
    assert len(s) == sum(mod.out_channels for mod in m.modules() if isinstance(mod, nn.Conv2d))
    assert s.indices.shape == (len(s), 3) and (np.asarray(s.indices) < 12).all()
    assert np.isfinite(s.values).all() and (np.diff(np.asarray(s.values), axis=1) <= 0).all()
