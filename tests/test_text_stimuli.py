"""The stimuli pass on a language model: windows and argmax tokens as the brute-force reference gives them."""
import numpy as np
import torch

from conceptevo.data.base import Subset
from conceptevo.data.loader import iter_batches
from conceptevo.data.text import TextWindows
from conceptevo.models.lm import lm_tiny
from conceptevo.stimuli import find_stimuli, top_responses
from text_reference import layer_output, reference_text_stimuli

LAYERS = ["blocks.0.mlp.act", "blocks.1.mlp.act"]


def _model_and_windows(seed=0, vocab=11, n=160, context=8, stride=3):
    torch.manual_seed(seed)
    model = lm_tiny(vocab_size=vocab, d_model=16, n_layers=2, n_heads=2, context=context).eval()
    tokens = np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)
    return model, TextWindows(tokens, context=context, stride=stride)


def test_iter_batches_keeps_token_ids_integer():
    _, ds = _model_and_windows()
    ids, targets, idx = next(iter_batches(ds, 7))
    assert ids.dtype == torch.int64 and ids.shape == (7, 8) and targets.shape == (7, 8)
    assert torch.equal(ids[3], ds[3][0]) and torch.equal(targets[3], ds[3][1]) and idx.tolist() == list(range(7))
    sub = Subset(ds, [5, 2, 9])
    ids, _, idx = next(iter_batches(sub, 10))
    assert idx.tolist() == [5, 2, 9] and torch.equal(ids[1], ds[2][0])


def test_stimuli_match_the_brute_force_reference():
    model, ds = _model_and_windows()
    k = 6
    for batch_size in (5, 64):  # several batches (running merge) and one
        st = find_stimuli(model, ds, k=k, layers=LAYERS, batch_size=batch_size, progress=False)
        assert st.num_images == len(ds)
        row = 0
        for layer in LAYERS:
            ref = reference_text_stimuli(model, layer, ds, k)
            assert st.neuron_ids[row].startswith(layer)
            for c in range(len(ref)):
                assert st.indices[row + c].tolist() == [w for w, _, _ in ref[c]], (layer, c)
                assert st.positions[row + c].tolist() == [p for _, p, _ in ref[c]], (layer, c)
                assert np.allclose(st.values[row + c], [s for _, _, s in ref[c]], atol=1e-5)
            row += len(ref)
        assert row == len(st)


def test_stimuli_on_a_subset_pool_keep_window_numbers():
    model, ds = _model_and_windows(seed=1)
    pool = [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]
    st = find_stimuli(model, Subset(ds, pool), k=3, layers=LAYERS[1:], batch_size=4, progress=False)
    sub = [ds[i] for i in pool]
    ref = reference_text_stimuli(model, LAYERS[1], sub, 3)
    for c in range(len(ref)):
        assert st.indices[c].tolist() == [pool[w] for w, _, _ in ref[c]]
        assert st.positions[c].tolist() == [p for _, p, _ in ref[c]]


def test_top_responses_on_windows():
    model, ds = _model_and_windows(seed=2)
    st = find_stimuli(model, ds, k=4, layers=LAYERS, batch_size=16, progress=False)
    got = top_responses(model, ds, st, top=5, batch_size=9, progress=False)
    ids, _ = ds.batch(range(len(ds)))
    strengths = torch.cat([layer_output(model, nm, ids).max(dim=1).values for nm in LAYERS], dim=1)
    z = (strengths - torch.as_tensor(st.mean)) / torch.as_tensor(np.maximum(st.std, 1e-6))
    assert got.shape == (len(ds), 5)
    for w in range(len(ds)):
        assert set(got[w].tolist()) == set(z[w].topk(5).indices.tolist())
