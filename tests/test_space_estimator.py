"""UnifiedSpace (fit / transform / save / load) against the functions it wraps; the numba-free result types;
the one K-means and the one distance-moved of the library."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conceptevo.alignment.space import fit_kmeans, kmeans_groups, nearest_centre
from conceptevo.containers import NeuronEmbedding, Stimuli
from conceptevo.diagnostics.metrics import distance_moved, row_distances
from conceptevo.embedding import embed_images, embed_neurons
from conceptevo.errors import ConceptEvoError
from conceptevo.projection import UnifiedSpace, project
from conceptevo.stimuli import find_stimuli, top_responses

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = dict(dim=6, epochs=40, seed=3)


@pytest.fixture(scope="module")
def case():
    """A small CNN at two 'checkpoints' (two seeds) and its stimuli over a pool of 60 images."""
    g = torch.Generator().manual_seed(0)
    pool = TensorDataset(torch.randn(60, 1, 10, 10, generator=g), torch.arange(60) % 4)

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU()).eval()

    base, other = net(0), net(1)
    return dict(pool=pool, base=base, base_stim=find_stimuli(base, pool, k=5, progress=False),
                other_stim=find_stimuli(other, pool, k=5, progress=False))


def _by_functions(case):
    emb = embed_neurons(case["base_stim"], **SMALL, progress=False)
    resp = top_responses(case["base"], case["pool"], case["base_stim"], top=4, progress=False, num_images=60)
    img = embed_images(case["base_stim"], emb, num_images=60, responses=resp, seed=SMALL["seed"])
    return emb, resp, img


def test_fit_and_transform_equal_the_pipeline_functions(case):
    emb, resp, img = _by_functions(case)
    space = UnifiedSpace(**SMALL, top_responses=4).fit(case["base_stim"], model=case["base"], dataset=case["pool"],
                                                       num_images=60)
    assert np.array_equal(space.neuron_embedding_.vectors, emb.vectors)
    assert space.neuron_embedding_.neuron_ids == emb.neuron_ids
    assert np.array_equal(space.responses_, resp)
    assert np.array_equal(space.image_vectors_, img.vectors, equal_nan=True)
    assert np.array_equal(space.image_embedding_.covered, img.covered)
    for stim in (case["base_stim"], case["other_stim"]):
        got, want = space.transform(stim), project(stim, img)
        assert got.neuron_ids == want.neuron_ids
        assert np.array_equal(got.vectors, want.vectors, equal_nan=True)
    # responses given instead of the model: the same space
    again = UnifiedSpace(**SMALL, top_responses=4).fit(case["base_stim"], resp, num_images=60)
    assert np.array_equal(again.image_vectors_, img.vectors, equal_nan=True)
    base_proj = UnifiedSpace(**SMALL, top_responses=4).fit_transform(case["base_stim"], resp, num_images=60)
    assert np.array_equal(base_proj.vectors, project(case["base_stim"], img).vectors, equal_nan=True)


def test_save_and_load_round_trip(case, tmp_path):
    space = UnifiedSpace(**SMALL, top_responses=4).fit(case["base_stim"], model=case["base"], dataset=case["pool"],
                                                       num_images=60)
    space.save(tmp_path / "space")
    back = UnifiedSpace.load(tmp_path / "space")
    assert back.get_params() == space.get_params()
    assert np.array_equal(back.neuron_embedding_.vectors, space.neuron_embedding_.vectors)
    assert back.neuron_embedding_.neuron_ids == space.neuron_embedding_.neuron_ids
    assert np.array_equal(back.responses_, space.responses_)
    assert np.array_equal(back.image_vectors_, space.image_vectors_, equal_nan=True)
    assert np.array_equal(back.transform(case["other_stim"]).vectors, space.transform(case["other_stim"]).vectors,
                          equal_nan=True)
    # fitted without responses: none saved, none loaded
    bare = UnifiedSpace(**SMALL).fit(case["base_stim"], num_images=60)
    bare.save(tmp_path / "bare")
    assert UnifiedSpace.load(tmp_path / "bare").responses_ is None


def test_estimator_errors_name_the_fix(case, tmp_path):
    with pytest.raises(ConceptEvoError, match="not fitted yet"):
        UnifiedSpace().transform(case["base_stim"])
    with pytest.raises(ConceptEvoError, match="embedding.dim"):
        UnifiedSpace(dim=0).fit(case["base_stim"])
    with pytest.raises(ConceptEvoError, match="embedding.lr_schedule"):
        UnifiedSpace(lr_schedule="cosine").fit(case["base_stim"])
    with pytest.raises(ConceptEvoError, match="images.top_responses"):
        UnifiedSpace(top_responses=0).fit(case["base_stim"])
    with pytest.raises(ConceptEvoError, match="needs dataset="):
        UnifiedSpace(**SMALL).fit(case["base_stim"], model=case["base"])
    with pytest.raises(ConceptEvoError, match="space.json missing"):
        UnifiedSpace.load(tmp_path)
    assert repr(UnifiedSpace(dim=4)) == "UnifiedSpace(dim=4)"


def test_result_types_import_without_numba():
    code = ("import sys; import conceptevo.containers as c; c.Stimuli; c.NeuronEmbedding; c.ImageEmbedding; "
            "import conceptevo.units; print('numba' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["False", "False"]


def test_result_types_are_the_ones_the_stages_return(case):
    from conceptevo import embedding, stimuli

    assert stimuli.Stimuli is Stimuli and embedding.NeuronEmbedding is NeuronEmbedding
    assert isinstance(case["base_stim"], Stimuli)


def test_one_kmeans_gives_what_each_caller_gave_before():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(c, 0.3, size=(40, 3)) for c in (0.0, 3.0, -3.0)])
    # the alignment grouping: K-means with n_init=4 and scikit-learn's predict
    from sklearn.cluster import KMeans

    want = KMeans(n_clusters=3, n_init=4, random_state=5).fit(v).predict(v)
    assert np.array_equal(kmeans_groups(v, 3, seed=5), want)
    # nearest centre: brute force, NaN rows unlabelled
    km = fit_kmeans(v.astype(np.float32), 3, seed=5)
    c = km.cluster_centers_.astype(np.float32)
    w = v.astype(np.float32).copy()
    w[7] = np.nan
    lab = nearest_centre(w, c)
    brute = [int(np.argmin([((row - cc) ** 2).sum() for cc in c])) for row in w]
    assert lab[7] == -1 and lab.dtype == np.int32
    assert all(lab[i] == brute[i] for i in range(len(w)) if i != 7)


def test_one_distance_moved():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    d = row_distances(a, b)
    assert d.dtype == np.float32
    assert np.allclose(d, [np.sqrt(((b[i] - a[i]) ** 2).sum()) for i in range(5)])
    ids = [f"l:{i}" for i in range(5)]
    mv = distance_moved(NeuronEmbedding(ids, a), NeuronEmbedding(ids, b))
    assert np.array_equal(mv.distances, row_distances(a.astype(np.float64), b.astype(np.float64)))


def test_monitor_takes_the_fitted_space(case):
    from conceptevo.diagnostics import ConceptMonitor

    space = UnifiedSpace(**SMALL, top_responses=4).fit(case["base_stim"], model=case["base"], dataset=case["pool"],
                                                       num_images=60)
    mon = ConceptMonitor(case["pool"], space, k=2, layers=["0", "2"], probe_accuracy=False)
    assert np.array_equal(mon.image_vectors, space.image_vectors_)
    rec = mon.check(case["base"])
    want = ConceptMonitor(case["pool"], space.image_embedding_, k=2, layers=["0", "2"], probe_accuracy=False).check(case["base"])
    assert rec.diversity == want.diversity and rec.collapse == want.collapse
    with pytest.raises(ConceptEvoError, match="not fitted"):
        ConceptMonitor(case["pool"], UnifiedSpace(), k=2)


def test_from_fitted_parts_is_the_same_space(case):
    emb, resp, img = _by_functions(case)
    space = UnifiedSpace.from_fitted(emb, img, resp)
    assert np.array_equal(space.transform(case["other_stim"]).vectors, project(case["other_stim"], img).vectors,
                          equal_nan=True)
    with pytest.raises(ConceptEvoError, match="dim"):
        UnifiedSpace.from_fitted(NeuronEmbedding(["a:0"], [[0.0]]), img)
