"""The golden study: committed tiny checkpoints in, committed outputs expected (tests/golden/).

A refactor that changes any output (stimuli sets, order, positions, the embeddings, the projection, the
layout) fails here, not only when two runs of the same code disagree. Integer outputs must match
exactly; floating-point ones to float32 rounding (another CPU's kernels may round differently). After an
intended change of output, rewrite the file with `python tests/golden/make_golden.py` and say why.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import make_golden  # noqa: E402


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    return make_golden.outputs(tmp_path_factory.mktemp("golden") / "study")


def test_golden_outputs_unchanged(produced):
    expected = dict(np.load(make_golden.EXPECTED))
    assert sorted(produced) == sorted(expected), "the study's outputs are not the golden set of arrays"
    for name, want in expected.items():
        got = produced[name]
        assert got.shape == want.shape and got.dtype.kind == want.dtype.kind, name
        if want.dtype.kind in "iubU":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_golden_study_is_not_trivial():
    """The expected outputs must be able to catch a change: varied stimuli, non-degenerate vectors."""
    expected = dict(np.load(make_golden.EXPECTED))
    idx = expected["vgg/e1/indices"]
    assert len(np.unique(idx)) > 50 and idx.shape[1] == 5
    assert (np.diff(expected["vgg/e1/values"], axis=1) <= 0).all()   # top-k in decreasing order
    assert expected["neurons/vectors"].std() > 0.05 and len(expected["neurons/ids"]) > 20
    assert not np.array_equal(expected["vgg/e0.5/indices"], expected["vgg/e1/indices"])
