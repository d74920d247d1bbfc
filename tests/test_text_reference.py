"""The brute-force text-stimuli reference agrees with what it claims, on a model whose units are known."""
import numpy as np
import torch
from torch import nn

from conceptevo.data.text import TextWindows
from conceptevo.models.lm import lm_tiny
from text_reference import layer_output, reference_text_stimuli


class OneHotUnits(nn.Module):
    """Unit c fires 1.0 + 0.01 * position exactly where token c appears (no context): stimuli are known."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.units = nn.Identity()

    def forward(self, ids):
        T = ids.shape[1]
        onehot = torch.nn.functional.one_hot(ids, self.vocab).float()
        return self.units(onehot * (1.0 + 0.01 * torch.arange(T).float())[None, :, None])


def test_reference_on_known_units():
    tokens = np.array([0, 1, 2, 3, 1, 1, 4, 0, 2, 2, 3, 4, 0, 0, 0])
    ds = TextWindows(tokens, context=4, stride=2)  # windows start at 0, 2, 4, 6, 8, 10
    ref = reference_text_stimuli(OneHotUnits(5), "units", ds, k=3)
    # token 1 is at stream 1, 4, 5: window 1 holds it at positions 2 and 3 (the later is stronger); windows 0
    # and 2 tie at position 1, the lower window first
    assert [(w, p) for w, p, _ in ref[1]] == [(1, 3), (0, 1), (2, 1)]
    # token 4 appears at stream 6 (window 2 pos 2, window 3 pos 0) and 11 (window 4 pos 3, window 5 pos 1)
    assert [(w, p) for w, p, _ in ref[4]] == [(4, 3), (2, 2), (5, 1)]
    assert np.allclose([s for _, _, s in ref[4]], [1.03, 1.02, 1.01])


def test_reference_agrees_with_a_batched_max():
    torch.manual_seed(0)
    model = lm_tiny(vocab_size=12, d_model=16, n_layers=2, n_heads=2, context=8).eval()
    ds = TextWindows(torch.randint(0, 12, (90,)), context=8, stride=3)
    ref = reference_text_stimuli(model, "blocks.1.mlp.act", ds, k=5)
    ids, _ = ds.batch(range(len(ds)))
    act = layer_output(model, "blocks.1.mlp.act", ids)  # [B, T, C] in one batch
    strength, pos = act.max(dim=1)
    for c in range(act.shape[2]):
        order = torch.argsort(-strength[:, c], stable=True)[:5].tolist()
        assert [w for w, _, _ in ref[c]] == order
        assert [p for _, p, _ in ref[c]] == pos[order, c].tolist()
        assert np.allclose([s for _, _, s in ref[c]], strength[order, c].numpy(), atol=1e-5)
