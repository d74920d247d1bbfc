"""Receptive fields derived from the model, example patches, sprite sheets, and the patch store."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fabricated
from conceptevo.errors import ConceptEvoError, WorkspaceError
from conceptevo.patches import (
    SHEET_MAX,
    PatchStore,
    SheetGeometry,
    _resize,
    compute_patches,
    crop_patches,
    receptive_fields,
    to_uint8_image,
)
from conceptevo.workspace import Workspace


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return fabricated.shared(tmp_path_factory)


def clipped(start, size, limit):
    return max(0, start), min(limit, start + size)


# ------------------------------------------------------------------------------ receptive fields: known answers
def test_conv_stack_grows_by_two_then_doubles_after_pool():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 3, 3, padding=1),
        nn.Conv2d(3, 3, 3, stride=2, padding=1),
    )
    H = 24
    rf = receptive_fields(m, ["0", "2", "4", "7", "8"], (1, H, H))
    assert [rf[n].size for n in ["0", "2", "4"]] == [(3, 3), (5, 5), (7, 7)]
    # after a 2x2 pool: 8 px at stride 2; a 3x3 conv on that grid adds 2 * 2
    assert rf["7"].size == (12, 12) and rf["7"].spatial == (12, 12)
    assert rf["8"].size == (16, 16) and rf["8"].spatial == (6, 6)
    for i in range(H):
        assert tuple(rf["0"].rows[i]) == clipped(i - 1, 3, H)
        assert tuple(rf["4"].cols[i]) == clipped(i - 3, 7, H)
    for i in range(12):
        assert tuple(rf["7"].rows[i]) == clipped(2 * i - 5, 12, H)
    for i in range(6):
        assert tuple(rf["8"].rows[i]) == clipped(4 * i - 7, 16, H)
    # boxes of flat positions
    b = rf["7"].boxes(np.array([0, 5 * 12 + 7, -1]))
    assert b[0].tolist() == [0, 0, 7, 7]
    assert b[1].tolist() == [5, 9, 17, 21]
    assert b[2].tolist() == [0, 0, H, H]


def test_functional_max_pool_dilation_and_dead_relus():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3, padding=1)
            self.b = nn.Conv2d(2, 2, 3, padding=2, dilation=2)
            self.c = nn.Conv2d(2, 2, 3, padding=1)
            with torch.no_grad():
                self.a.bias.fill_(-100.0)  # every ReLU after `a` is dead on real images

        def forward(self, x):
            h = F.relu(self.a(x))
            h = F.relu(self.b(h))
            h = F.max_pool2d(h, kernel_size=3, stride=2, padding=1)  # functional: no module to see
            return self.c(h)

    rf = receptive_fields(Net(), ["a", "b", "c"], (1, 20, 20))
    assert rf["a"].size == (3, 3)
    assert rf["b"].size == (7, 7)            # dilation 2 adds 4
    assert rf["c"].size == (7 + 2 + 4, 7 + 2 + 4)  # pool 3 adds 2; conv 3 at stride 2 adds 4
    assert rf["c"].spatial == (10, 10)


class Branchy(nn.Module):
    """Concatenated branches of different kernels, a strided conv, a dilated conv, a residual sum."""

    def __init__(self, act=torch.tanh):
        super().__init__()
        self.act = act
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 3, 1)
        self.b5 = nn.Conv2d(4, 3, 5, padding=2)
        self.cat = nn.Identity()
        self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.dil = nn.Conv2d(6, 4, 3, padding=2, dilation=2)
        self.res = nn.Conv2d(4, 4, 3, padding=1)
        self.merge = nn.Identity()
        self.head = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        h = self.act(self.stem(x))
        h = self.cat(torch.cat([self.act(self.b1(h)), self.act(self.b5(h))], 1))
        h = self.act(self.down(h))
        h = self.act(self.dil(h))
        h = self.merge(h + self.act(self.res(h)))
        h = F.avg_pool2d(h, 2)
        return self.head(h)


LAYERS = ["stem", "b1", "b5", "cat", "down", "dil", "res", "merge", "head"]


def brute_force_boxes(model, layer, x):
    """Per output position, the bounding box of the nonzero gradient on the real model (tanh: no dead units).

    One batched backward: sample b of the batch backpropagates position b only.
    """
    store = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: store.__setitem__("o", o))
    try:
        with torch.no_grad():
            model(x)
        Ho, Wo = store["o"].shape[2:]
        xb = x.repeat(Ho * Wo, 1, 1, 1).requires_grad_(True)
        model(xb)
        sel = torch.zeros_like(store["o"])
        for b in range(Ho * Wo):
            sel[b, :, b // Wo, b % Wo] = 1.0
        (g,) = torch.autograd.grad((store["o"] * sel).sum(), xb)
    finally:
        h.remove()
    out = {}
    for b in range(Ho * Wo):
        nz = g[b].abs().sum(0) > 0
        rows, cols = np.flatnonzero(nz.any(1).numpy()), np.flatnonzero(nz.any(0).numpy())
        out[(b // Wo, b % Wo)] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    return out


def test_branching_residual_model_matches_brute_force():
    torch.manual_seed(3)
    model = Branchy().double().eval()
    H, W = 22, 19  # not square, odd
    rf = receptive_fields(model, LAYERS, (2, H, W))
    x = torch.randn(1, 2, H, W, dtype=torch.float64)
    assert rf["cat"].size == (7, 7) and rf["b1"].size == (3, 3)
    assert rf["merge"].size == rf["res"].size
    for name in LAYERS:
        for (i, j), box in brute_force_boxes(model, name, x).items():
            assert rf[name].box(i, j) == box, (name, i, j)


def test_probe_leaves_the_model_alone_and_subsampled_fit_is_exact():
    torch.manual_seed(0)
    model = Branchy(act=torch.relu).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = receptive_fields(model, LAYERS, (2, 40, 36))
    fitted = receptive_fields(model, LAYERS, (2, 40, 36), exact_limit=6)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for name in LAYERS:
        np.testing.assert_array_equal(exact[name].rows, fitted[name].rows)
        np.testing.assert_array_equal(exact[name].cols, fitted[name].cols)


def test_zoo_models_and_linear_layers():
    from conceptevo.models import build_model

    torch.manual_seed(0)
    vgg = build_model("vgg_like", in_channels=1, num_classes=3, width=2)
    rf = receptive_fields(vgg, ["features.0", "features.7", "features.24", "classifier.2"], (1, 28, 28))
    assert rf["features.0"].size == (3, 3)
    assert rf["features.7"].size == (10, 10)
    assert rf["classifier.2"].spatial == () and rf["classifier.2"].boxes(np.array([3])).tolist() == [[0, 0, 28, 28]]
    res = build_model("resnet_like", in_channels=1, num_classes=3, width=2)
    rr = receptive_fields(res, ["stem.0", "layers.0.conv2", "layers.2.conv1", "layers.2.shortcut.0"], (1, 28, 28))
    assert rr["layers.0.conv2"].size == (7, 7)
    assert rr["layers.2.conv1"].size == (13, 13)      # stride-2 conv after 11 px of context
    assert rr["layers.2.shortcut.0"].size == (11, 11)  # the 1x1 projection sees what its input saw


def test_bad_input_shape():
    with pytest.raises(ConceptEvoError, match="input_shape"):
        receptive_fields(nn.Conv2d(1, 1, 3), ["0"], (28, 28))


# ------------------------------------------------------------------------------ crops and sheets
def test_crops_are_the_boxed_pixels():
    img = np.arange(12 * 10, dtype=np.uint8).reshape(1, 12, 10, 1)
    boxes = np.array([[[2, 3, 6, 7], [0, 0, 4, 4]]])
    out = crop_patches(img, np.array([[0, 0]]), boxes, cell=4)
    np.testing.assert_array_equal(out[0, 0, :, :, 0], img[0, 2:6, 3:7, 0])
    np.testing.assert_array_equal(out[0, 1, :, :, 0], img[0, 0:4, 0:4, 0])
    # enlarging is nearest-neighbour; clipped (non-square) boxes keep their aspect, centred
    big = _resize(img[0, 0:2, 0:4], 8)
    assert big.shape == (8, 8, 1)
    np.testing.assert_array_equal(big[2:6, :, 0], np.repeat(np.repeat(img[0, 0:2, 0:4, 0], 2, 0), 2, 1))
    assert (big[:2] == 0).all() and (big[6:] == 0).all()


def test_sheet_geometry_places_every_cell_once():
    for count, k, cell in [(1, 10, 28), (7, 3, 16), (500, 10, 28), (5000, 5, 64), (300, 10, 100)]:
        g = SheetGeometry.plan(count, k, cell)
        w, h = g.sheet_size
        assert w <= SHEET_MAX and h <= SHEET_MAX
        seen = set()
        for n in range(0, count, max(1, count // 97)):
            for j in range(k):
                s, x, y = g.locate(n, j)
                assert 0 <= x <= w - cell and 0 <= y <= h - cell and s < g.sheets
                seen.add((s, x, y))
        assert len(seen) == len(range(0, count, max(1, count // 97))) * k
    with pytest.raises(ConceptEvoError, match="patch size"):
        SheetGeometry.plan(10, 20, 64)


def test_to_uint8_image():
    t = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    np.testing.assert_array_equal(to_uint8_image(t)[..., 0], [[0, 128], [255, 64]])
    normalised = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]])  # outside [0, 1]: stretched
    np.testing.assert_array_equal(to_uint8_image(normalised)[..., 0], [[0, 64], [128, 255]])
    assert to_uint8_image(torch.rand(3, 4, 5)).shape == (4, 5, 3)


# ------------------------------------------------------------------------------ a workspace's patches
def test_workspace_patches_are_crops_at_the_stimulus_argmax(ws):
    from conceptevo.models import build_model

    store = PatchStore(ws)
    dataset = ws.dataset("train")
    torch.manual_seed(0)
    net = build_model("vgg_like", in_channels=3, num_classes=10, width=4)
    for m, t in [("vgg", "e1"), ("resnet", "e2")]:
        assert store.has(m, t) and ws.stage(f"patches/{m}/{t}") is not None
        stim = ws.stimuli(m, t)
        geom = store.geometry(m, t)
        assert geom.count == len(stim) and geom.per_entry == stim.k
        boxes = store.boxes(m, t)
        for row in (0, len(stim) // 2, len(stim) - 1):
            layer = stim.neuron_ids[row].rpartition(":")[0]
            info = next(i for i in stim.layers if i.name == layer)
            got = store.patches(m, t, row)
            for j in range(stim.k):
                h, w = np.unravel_index(int(stim.positions[row, j]), info.spatial)
                if m == "vgg":  # check the stored box against an independent probe of a fresh model
                    rf = receptive_fields(net, [layer], (3, 32, 32))[layer]
                    assert tuple(boxes[row, j]) == rf.box(h, w)
                t0, l0, b0, r0 = boxes[row, j]
                image = to_uint8_image(dataset[int(stim.indices[row, j])][0])
                np.testing.assert_array_equal(got[j], _resize(image[t0:b0, l0:r0], geom.cell))
    # the full stimulus images
    idx = store.image_indices
    assert np.all(np.diff(idx) > 0)
    i = int(idx[len(idx) // 2])
    np.testing.assert_array_equal(store.image(i), to_uint8_image(dataset[i][0]))
    assert store.image_labels[len(idx) // 2] == dataset.targets[i]
    png = store.strip_png("vgg", "e1", 3)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_force_recomputes_and_errors(ws, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(ws.path, copy)
    w2 = Workspace(copy)
    assert compute_patches(w2, progress=False) == []
    assert len(compute_patches(w2, models=["resnet"], force=True, progress=False)) == 3
    with pytest.raises(WorkspaceError, match="not in this study"):
        compute_patches(w2, models=["nope"], progress=False)
    with pytest.raises(ConceptEvoError, match="cell"):
        compute_patches(w2, cell=2, progress=False)
    with pytest.raises(ConceptEvoError, match="at most 204 px"):
        compute_patches(w2, cell=250, progress=False)
    store = PatchStore(w2)
    with pytest.raises(ConceptEvoError, match="out of range"):
        store.patches("vgg", "e1", 10_000)
    w2.invalidate("patches/vgg/e1")
    with pytest.raises(WorkspaceError, match="conceptevo patches"):
        PatchStore(w2).patches("vgg", "e1", 0)


def test_workspace_without_stimuli(tmp_path):
    w = Workspace(tmp_path / "empty", create=True)
    w.manifest["models"] = {"m": {"arch": "vgg_like", "options": {}, "checkpoints": [{"tag": "e1", "path": "x.pt"}]}}
    with pytest.raises(WorkspaceError, match="no stimuli"):
        compute_patches(w, progress=False)
