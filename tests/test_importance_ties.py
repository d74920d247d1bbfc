"""Ties in importance score: ranked by mean sensitivity, and the output says so."""
from __future__ import annotations

import numpy as np
import pytest

from conceptevo.importance import EvolutionImportance


def _importance(sens) -> EvolutionImportance:
    sens = np.asarray(sens, dtype=np.float32)
    n = sens.shape[1]
    return EvolutionImportance([f"conv:{j}" for j in range(n)], (sens > 0).mean(axis=0), sens,
                               np.arange(sens.shape[0]), class_index=0, layers=["conv"])


@pytest.fixture
def tied():
    """12 neurons over 4 images: neurons 0-6 help on every image (score 1.0) by different amounts; 7-11 on fewer."""
    rng = np.random.default_rng(0)
    sens = rng.uniform(-1, 1, size=(4, 12))
    sens[:, :7] = np.abs(sens[:, :7]) + 0.01
    sens[:, 2] = 5.0            # the largest mean among the tied: first
    sens[:, 5] = 0.02           # the smallest: last of the tie
    sens[:, 7:] = np.where(np.arange(4)[:, None] < 2, 1.0, -1.0) * (1 + np.arange(5))  # score 0.5, mean 0
    return _importance(sens)


def test_equal_scores_are_ranked_by_mean_sensitivity(tied):
    assert int(np.sum(tied.scores == 1.0)) == 7
    top = [nid for nid, _ in tied.top(7)]
    want = sorted(range(7), key=lambda j: -float(tied.sensitivities[:, j].astype(np.float64).mean()))
    assert top == [f"conv:{j}" for j in want] and top[0] == "conv:2" and top[-1] == "conv:5"
    # brute force: the ranking is by (score, mean sensitivity) descending, then neuron order
    mean = tied.sensitivities.astype(np.float64).mean(axis=0)
    brute = sorted(range(12), key=lambda j: (-float(tied.scores[j]), -mean[j], j))
    assert list(tied.ranking()) == brute


def test_the_output_says_how_ties_were_broken(tied):
    note = tied.tie_note(3)
    assert note.startswith("ties: 7 neurons score 1.000 (3 of them in the top 3)")
    assert "ranked by mean sensitivity" in note and "neuron order" not in note
    # a cut that also reaches the score-0.5 neurons, whose mean sensitivities are equal too
    note = tied.tie_note(9)
    assert "7 neurons score 1.000;" in note and "5 neurons score 0.500 (2 of them in the top 9)" in note
    assert note.endswith("then by neuron order.")
    lines = tied.top_lines(3)
    assert lines[0].split() == ["rank", "neuron", "score", "mean", "sensitivity"]
    assert lines[1].split()[:3] == ["1", "conv:2", "1.000"] and float(lines[1].split()[3]) == pytest.approx(5.0)
    assert lines[-1] == tied.tie_note(3)


def test_no_note_without_ties():
    sens = np.array([[1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [1.0, -1.0, -1.0]])
    imp = _importance(sens)          # scores 1, 1/3, 0: all distinct
    assert imp.tie_note(2) is None and len(imp.top_lines(2)) == 3
