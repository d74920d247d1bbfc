import numpy as np
import pytest
import torch
from torch import nn

from conceptevo import ConceptEvoError, Stimuli, find_stimuli
from conceptevo.data.base import Subset
from conceptevo.errors import LayerNotFoundError
from conceptevo.layers import resolve_layers


def brute_force(model, dataset, k, layers):
    """Every image's full activation maps, one image at a time; top-k by (-value, index)."""
    model.eval()
    acts = {n: [] for n in layers}
    idxs = []
    mods = dict(model.named_modules())
    for pos in range(len(dataset)):
        img, _, idx = dataset[pos]
        store = {}
        hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in layers]
        with torch.no_grad():
            model(img[None])
        for h in hs:
            h.remove()
        for n in layers:
            o = store[n][0]
            acts[n].append(o.reshape(o.shape[0], -1) if o.dim() > 1 else o[:, None])  # [C, P]
        idxs.append(idx)
    idxs = np.array(idxs)
    rows_i, rows_v, rows_p = [], [], []
    for n in layers:
        a = torch.stack(acts[n])  # [images, C, P]
        vals, pos = a.max(dim=2)
        for c in range(a.shape[1]):
            v = vals[:, c].numpy()
            order = np.lexsort((idxs, -v))[:k]
            rows_i.append(idxs[order]); rows_v.append(v[order]); rows_p.append(pos[order, c].numpy())
    return np.array(rows_i), np.array(rows_v), np.array(rows_p)


@pytest.mark.parametrize("merge", ["layer", "batch"])
@pytest.mark.parametrize("batch_size", [1, 16, 64, 256])
def test_topk_matches_brute_force_with_ties(tiny_model, tiny_data, batch_size, merge):
    layers = resolve_layers(tiny_model)
    s = find_stimuli(tiny_model, tiny_data, k=5, batch_size=batch_size, progress=False, merge=merge)
    bi, bv, bp = brute_force(tiny_model, tiny_data, 5, layers)
    np.testing.assert_array_equal(s.indices, bi)
    np.testing.assert_allclose(s.values, bv, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.positions, bp)
    assert s.neuron_ids[0] == f"{layers[0]}:0"
    assert len(s) == sum(i.channels for i in s.layers)


@pytest.mark.parametrize("merge", ["layer", "batch"])
def test_ties_go_to_lower_index(tiny_model, tiny_data, merge):
    # images 3, 10 and 40 are identical: wherever two of them are stimuli, 3 comes before 10 before 40
    s = find_stimuli(tiny_model, tiny_data, k=10, batch_size=7, progress=False, merge=merge)
    for row in s.indices:
        present = [i for i in row if i in (3, 10, 40)]
        assert present == sorted(present)


def test_unordered_subset_keeps_dataset_indices(tiny_model, tiny_data):
    # a pool whose positions are not in index order exercises the general merge
    perm = np.random.default_rng(0).permutation(len(tiny_data))[:50]
    pool = Subset(tiny_data, perm)
    s = find_stimuli(tiny_model, pool, k=4, batch_size=8, progress=False)
    bi, bv, _ = brute_force(tiny_model, pool, 4, resolve_layers(tiny_model))
    np.testing.assert_array_equal(s.indices, bi)
    assert set(np.unique(s.indices)) <= set(perm.tolist())


def test_plain_dataset_without_index(tiny_model, tiny_data):
    plain = torch.utils.data.TensorDataset(tiny_data.images, torch.as_tensor(tiny_data.targets))
    a = find_stimuli(tiny_model, plain, k=3, batch_size=9, progress=False)
    b = find_stimuli(tiny_model, tiny_data, k=3, batch_size=32, progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_linear_layer_units_are_neurons(tiny_data):
    torch.manual_seed(0)
    from conftest import TinySeq

    m = TinySeq()
    s = find_stimuli(m, tiny_data, k=3, layers=[nn.Linear, "features.0"], progress=False)
    assert [i.name for i in s.layers] == ["features.0", "head.2"]
    assert s.neuron_ids[-1] == "head.2:3"


def test_glob_layers(tiny_data):
    from conftest import TinyRes

    m = TinyRes()
    assert resolve_layers(m, ["a", "d*"]) == ["a", "down"]


def test_save_load_roundtrip(tmp_path, tiny_model, tiny_data):
    s = find_stimuli(tiny_model, tiny_data, k=4, progress=False)
    s.save(tmp_path / "s")
    t = Stimuli.load(tmp_path / "s", mmap=True)
    assert t.neuron_ids == s.neuron_ids and t.layers == s.layers
    np.testing.assert_array_equal(t.indices, s.indices)
    np.testing.assert_array_equal(t.values, s.values)
    assert t.position_hw(0, 0) == tuple(np.unravel_index(s.positions[0, 0], s.layers[0].spatial))


def test_from_arrays():
    s = Stimuli.from_arrays(["a:0", "a:1"], [[1, 2], [3, 0]], [[2.0, 1.0], [5.0, 4.0]])
    assert s.k == 2 and s.num_images == 4 and (s.positions == -1).all()
    with pytest.raises(ConceptEvoError):
        Stimuli.from_arrays(["a:0"], [[1, 2], [3, 0]], [[2.0, 1.0], [5.0, 4.0]])


def test_bad_inputs(tiny_data):
    from conftest import TinySeq

    m = TinySeq()
    with pytest.raises(ConceptEvoError, match="larger than the image pool"):
        find_stimuli(m, tiny_data, k=1000, progress=False)
    with pytest.raises(LayerNotFoundError, match="features.0"):
        find_stimuli(m, tiny_data, layers=["features.O"], progress=False)
    with pytest.raises(ConceptEvoError, match="cannot go through"):
        find_stimuli(TinySeq(cin=3), tiny_data, progress=False)
    with pytest.raises(ConceptEvoError, match="k must be"):
        find_stimuli(m, tiny_data, k=0, progress=False)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("merge", ["layer", "batch"])
def test_nan_weights_name_the_layer(tiny_data, merge, bad):
    from conftest import TinySeq

    m = TinySeq()
    with torch.no_grad():
        m.features[3].bias[1] = float(bad)
    with pytest.raises(ConceptEvoError, match="features.3"):
        find_stimuli(m, tiny_data, k=2, progress=False, merge=merge)
    with pytest.raises(ConceptEvoError, match="merge="):
        find_stimuli(m, tiny_data, k=2, progress=False, merge="fast")


def test_unused_layer_is_an_error(tiny_data):
    from conftest import TinySeq

    m = TinySeq()
    m.spare = nn.Conv2d(1, 2, 3)
    with pytest.raises(LayerNotFoundError, match="never ran"):
        find_stimuli(m, tiny_data, k=2, progress=False)


def test_hooks_are_removed(tiny_model, tiny_data):
    find_stimuli(tiny_model, tiny_data, k=2, progress=False)
    assert all(not m._forward_hooks for m in tiny_model.modules())


def test_merge_modes_agree_when_later_modules_work_in_place(tiny_data):
    """Per-batch merging reads the layers' reductions after the forward: in-place ReLUs downstream of a
    Linear or Conv2d must not change what it sees."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(6), nn.ReLU(inplace=True),
                      nn.Linear(6, 3))
    m(tiny_data[0][0][None])
    a = find_stimuli(m, tiny_data, k=4, layers=[nn.Conv2d, nn.Linear], batch_size=9, progress=False, merge="layer")
    b = find_stimuli(m, tiny_data, k=4, layers=[nn.Conv2d, nn.Linear], batch_size=9, progress=False, merge="batch")
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.mean, b.mean)
    assert (a.values[4:10] < 0).any(), "some Linear maxima are negative: an in-place ReLU would have changed them"


def test_top_responses_has_a_row_for_every_image_even_one_no_neuron_chose():
    """Without num_images, the stimuli count every image passed, not only up to the last one chosen as a stimulus."""
    from conceptevo import top_responses

    class Last(torch.utils.data.Dataset):   # the last images are all zero: never anyone's top stimulus
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.rand(30, 1, 8, 8, generator=g) + 0.5
            self.x[25:] = 0

        def __len__(self):
            return 30

        def __getitem__(self, i):
            return self.x[i], 0, i

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.zero_()
    stim = find_stimuli(model, Last(), k=4, progress=False)
    assert stim.indices.max() < 25 and stim.num_images == 30
    rows = top_responses(model, Last(), stim, top=2, progress=False)
    assert rows.shape == (30, 2) and (rows >= 0).all()
