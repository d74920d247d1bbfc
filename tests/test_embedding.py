"""Embedding (METHOD §3-5) and projection (§6): pairs, neuron and image embedding, projection."""
from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

from conceptevo.embedding import (NeuronEmbedding, ImageEmbedding, coactivation_pairs, embed_images, embed_neurons,
                                  embed_neurons_reference, fit_summary, objective, sample_epoch, stimulus_matrix)
from conceptevo.config import EmbeddingConfig, load_config
from conceptevo.embedding.pairs import expected_pair_counts, pair_counts
from conceptevo.embedding.neurons import changed_share, epoch_lr, nearest_neighbors, neighbor_jaccard
from conceptevo.errors import ConceptEvoError
from conceptevo.projection import fidelity, holdout_fidelity, project


def make_stimuli(indices, num_images=None, prefix="features.0"):
    indices = np.asarray(indices, dtype=np.int64)
    return types.SimpleNamespace(
        neuron_ids=[f"{prefix}:{i}" for i in range(len(indices))],
        indices=indices,
        values=np.zeros(indices.shape, np.float32),
        num_images=num_images,
    )


def clustered_indices(num_neurons=60, k=6, clusters=4, group=15, pool=200, seed=0):
    """Neurons in latent clusters; each draws most stimuli from its cluster's image group."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(pool)[: clusters * group].reshape(clusters, group)
    cluster = np.arange(num_neurons) % clusters
    out = np.empty((num_neurons, k), np.int64)
    for n in range(num_neurons):
        own = rng.choice(groups[cluster[n]], k - 1, replace=False)
        other = rng.choice(np.setdiff1d(np.arange(pool), own), 1)
        out[n] = np.concatenate([own, other])
    return out, cluster


@pytest.fixture(scope="module")
def clustered():
    indices, cluster = clustered_indices()
    return make_stimuli(indices, num_images=200), cluster


@pytest.fixture(scope="module")
def base(clustered):
    stimuli, _ = clustered
    return embed_neurons(stimuli, dim=8, epochs=150, tol=0, progress=False)


# ---------------------------------------------------------------- pairs (§3)
def test_each_image_gives_a_path_through_its_neurons():
    indices, _ = clustered_indices(num_neurons=40, k=5, pool=60)
    heads, tails, images = coactivation_pairs(indices, rng=1, return_images=True)
    assert heads.dtype == np.int32 and tails.dtype == np.int32
    assert np.all(heads != tails)
    members = {}
    for n, row in enumerate(indices):
        for x in set(row.tolist()):
            members.setdefault(x, set()).add(n)
    assert len(heads) == sum(len(m) - 1 for m in members.values())
    for x, neurons in members.items():
        sel = images == x
        edges = list(zip(heads[sel].tolist(), tails[sel].tolist()))
        assert len(edges) == len(neurons) - 1
        touched = {v for e in edges for v in e}
        if len(neurons) >= 2:
            assert touched == neurons          # every member of N_x is paired, and only members
            degree = np.bincount(np.ravel(edges))
            assert degree.max() <= 2           # consecutive pairs of one shuffle: a path
    # both members of every pair have the pair's image among their stimuli
    for h, t, x in zip(heads, tails, images):
        assert x in indices[h] and x in indices[t]


def test_duplicates_and_padding_are_ignored():
    indices = np.array([[0, 0, 1, -1], [0, 2, -1, -1], [1, 2, 3, 3]])
    heads, tails = coactivation_pairs(indices, rng=0)
    # images 0: {0,1}, 1: {0,2}, 2: {1,2}, 3: {2} -> 3 pairs
    assert len(heads) == 3
    assert sorted(pair_counts(heads, tails)) == [(0, 1), (0, 2), (1, 2)]


def test_pair_frequency_follows_shared_images():
    indices, _ = clustered_indices(num_neurons=20, k=5, clusters=2, group=10, pool=40, seed=3)
    expected = expected_pair_counts(indices)
    rng = np.random.default_rng(0)
    draws = 3000
    total = {}
    for _ in range(draws):
        for key, c in pair_counts(*coactivation_pairs(indices, rng)).items():
            total[key] = total.get(key, 0) + c
    assert set(total) <= set(expected)
    keys = sorted(expected)
    obs = np.array([total.get(k, 0) / draws for k in keys])
    exp = np.array([expected[k] for k in keys])
    assert np.abs(obs - exp).max() < 0.06
    assert np.corrcoef(obs, exp)[0, 1] > 0.99


# ---------------------------------------------------------------- neuron embedding (§4)
def test_j1_rises(clustered, base):
    stimuli, _ = clustered
    heads, tails, nn, nm = sample_epoch(stimuli.indices, 3, rng=123)
    init = np.random.default_rng(0).uniform(-0.5, 0.5, size=(len(base), 8)).astype(np.float32)
    assert objective(base.vectors, heads, tails, nn, nm) > objective(init, heads, tails, nn, nm) + 25
    hist = base.j1_history
    assert base.epochs_run == 150 and len(hist) == 150
    assert hist[-10:].mean() > hist[:3].mean()


def test_embedding_groups_clusters(clustered, base):
    _, cluster = clustered
    v = base.vectors / np.linalg.norm(base.vectors, axis=1, keepdims=True)
    sim = v @ v.T
    same = cluster[:, None] == cluster[None, :]
    np.fill_diagonal(same, False)
    other = cluster[:, None] != cluster[None, :]
    assert sim[same].mean() > sim[other].mean() + 0.3


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_numba_matches_python_reference(schedule):
    stimuli = make_stimuli(clustered_indices(num_neurons=24, k=4, clusters=3, group=10, pool=50)[0])
    fast = embed_neurons(stimuli, dim=6, epochs=4, seed=5, lr_schedule=schedule, progress=False)
    slow = embed_neurons_reference(stimuli, dim=6, epochs=4, seed=5, lr_schedule=schedule)
    np.testing.assert_allclose(fast.vectors, slow.vectors, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.j1_history, slow.j1_history, rtol=1e-5)


def test_learning_rate_schedules():
    assert [epoch_lr(0.05, e, 4, "linear") for e in range(4)] == pytest.approx([0.05, 0.0375, 0.025, 0.0125])
    assert epoch_lr(0.05, 3, 4, "constant") == 0.05
    assert epoch_lr(0.05, 10**6, 10**6 + 1, "linear") == pytest.approx(0.05 * 1e-4)  # floor, never 0
    # the schedule changes the updates: one epoch is the same (lr for epoch 0), two are not
    stimuli = make_stimuli(clustered_indices(num_neurons=24, k=4, clusters=3, group=10, pool=50)[0])
    one = [embed_neurons(stimuli, dim=4, epochs=1, lr_schedule=s, progress=False).vectors for s in ("linear", "constant")]
    two = [embed_neurons(stimuli, dim=4, epochs=2, lr_schedule=s, progress=False).vectors for s in ("linear", "constant")]
    assert np.array_equal(*one) and not np.allclose(*two)


def test_nearest_neighbors_and_changed_share_against_brute_force():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(30, 3))
    queries = np.array([0, 5, 29])
    nn = nearest_neighbors(v, queries, 4)
    for q, row in zip(queries, nn):
        d = np.linalg.norm(v - v[q], axis=1)
        d[q] = np.inf
        assert set(row) == set(np.argsort(d)[:4])
    groups = np.arange(30) // 10                          # leave out the query's own group of 10 rows
    for q, row in zip(queries, nearest_neighbors(v, queries, 4, groups)):
        d = np.linalg.norm(v - v[q], axis=1)
        d[groups == groups[q]] = np.inf
        assert set(row) == set(np.argsort(d)[:4])
    before = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    after = np.array([[4, 3, 9, 1], [10, 11, 12, 13]])
    assert changed_share(before, after) == pytest.approx((1 + 4) / 8)
    assert neighbor_jaccard(before, after) == pytest.approx((3 / 5 + 0 / 8) / 2)


def _stopping_config(tmp_path, **embedding):
    lines = ["[study]", 'out = "s"', "[[models]]", 'name = "m"', 'arch = "vgg_like"', 'checkpoints = "ck"', "[embedding]"]
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v).replace(chr(39), chr(34))}"
              for k, v in embedding.items()]
    path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return dataclasses.asdict(load_config(path).embedding)


def test_config_sets_every_stopping_parameter_and_each_takes_effect(tmp_path, clustered, caplog):
    stimuli, _ = clustered
    # every stopping key is accepted in [embedding] (before: tol, patience, ... were unknown keys)
    ep = _stopping_config(tmp_path, epochs=120, lr_schedule="constant", early_stop=True, tol=1.0, patience=2,
                          check_every=10, dim=4)
    assert (ep["epochs"], ep["lr_schedule"], ep["early_stop"], ep["tol"], ep["patience"], ep["check_every"]) == \
        (120, "constant", True, 1.0, 2, 10)

    def run(**changes):
        return embed_neurons(stimuli, **dict(ep, **changes), progress=False)

    # tol = 1 fires at the first check that can compare patience + 1 changes: epoch check_every * (patience + 2)
    with caplog.at_level("INFO", logger="conceptevo.embedding.neurons"):
        stopped = run()
    assert stopped.epochs_run == 10 * (2 + 2) and stopped.config["early_stopped"]
    assert "early stop at epoch 40" in stopped.config["stop_reason"] and "early stop at epoch 40" in caplog.text
    assert len(stopped.config["neighbor_change"]) == 3
    assert run(check_every=5).epochs_run == 5 * 4          # check_every takes effect
    assert run(patience=4).epochs_run == 10 * 6            # patience takes effect
    # tol takes effect: with the linear decay the neighbourhoods keep settling, so tol = 0 never fires
    full = run(tol=0.0, lr_schedule="linear")
    assert full.epochs_run == 120 and not full.config["early_stopped"]
    assert full.config["stop_reason"] == "ran all 120 epochs (linear learning rate, the early stop did not fire)"
    # epochs takes effect, and the stop can be turned off
    off = run(early_stop=False, epochs=70)
    assert off.epochs_run == 70 and off.config["stop_reason"] == "ran all 70 epochs (constant learning rate, early stop off)"
    assert off.config["neighbor_change"] is None
    # the stop does not change the run up to where it fires: same draws, same vectors
    np.testing.assert_array_equal(run(early_stop=False, epochs=40).vectors, stopped.vectors)


def test_embedding_defaults_live_in_one_place():
    import inspect

    sig = inspect.signature(embed_neurons).parameters
    for key, value in dataclasses.asdict(EmbeddingConfig()).items():
        assert sig[key].default == value, key


def test_default_run_reaches_the_fidelity_plateau():
    """On a planted-concept set the default (linear decay, fixed epochs) places neurons among their concept's far
    more often than the previous default (constant rate, stopped when the running J1 levelled off: after 49 epochs here)."""
    rng = np.random.default_rng(1)
    concepts, pool, group = 24, 5000, 60
    groups = rng.permutation(pool)[: concepts * group].reshape(concepts, group)
    concept = rng.integers(0, concepts, 480)
    w = 1.0 / np.arange(1, group + 1)
    indices = np.array([np.concatenate([rng.choice(groups[c], 4, replace=False, p=w / w.sum()),
                                        rng.choice(pool, 6, replace=False)]) for c in concept])
    stimuli = make_stimuli(indices, num_images=pool)

    def purity(v):
        nn = nearest_neighbors(v, np.arange(len(v)), 5)
        return float((concept[nn] == concept[:, None]).mean())

    default = purity(embed_neurons(stimuli, progress=False).vectors)
    previous = purity(embed_neurons(stimuli, lr_schedule="constant", epochs=49, progress=False).vectors)
    assert default > 0.8 and default > previous + 0.1


def test_same_seed_same_result(clustered):
    stimuli, _ = clustered
    a = embed_neurons(stimuli, dim=5, epochs=20, seed=7, progress=False)
    b = embed_neurons(stimuli, dim=5, epochs=20, seed=7, progress=False)
    c = embed_neurons(stimuli, dim=5, epochs=20, seed=8, progress=False)
    assert np.array_equal(a.vectors, b.vectors)
    assert not np.allclose(a.vectors, c.vectors)


def test_neuron_without_pair_keeps_its_initial_vector():
    indices = np.array([[0, 1], [1, 2], [2, 0], [7, 8]])
    emb = embed_neurons(make_stimuli(indices), dim=4, epochs=30, seed=3, progress=False)
    init = np.random.default_rng(3).uniform(-0.5, 0.5, size=(4, 4)).astype(np.float32)
    assert np.array_equal(emb.vectors[3], init[3])
    assert not np.allclose(emb.vectors[0], init[0])


def test_neuron_embedding_save_load(tmp_path, base):
    base.save(tmp_path / "emb")
    back = NeuronEmbedding.load(tmp_path / "emb")
    assert back.neuron_ids == base.neuron_ids
    assert np.array_equal(back.vectors, base.vectors)
    np.testing.assert_allclose(back.j1_history, base.j1_history)
    assert back.epochs_run == base.epochs_run and back.config == base.config
    assert back.index_of("features.0:7") == 7
    with pytest.raises(ConceptEvoError, match="features.0:999"):
        back.index_of("features.0:999")


@pytest.mark.parametrize("kwargs, name", [
    (dict(dim=0), "dim"), (dict(dim=2.5), "dim"), (dict(negatives=-1), "negatives"),
    (dict(negatives=1.0), "negatives"), (dict(lr=0), "lr"), (dict(lr=-0.1), "lr"),
    (dict(epochs=0), "epochs"), (dict(tol=-1e-3), "tol"), (dict(patience=0), "patience"),
    (dict(seed="x"), "seed"), (dict(check_every=0), "check_every"), (dict(lr_schedule="cosine"), "lr_schedule"),
    (dict(early_stop="yes"), "early_stop"),
])
def test_embed_neurons_bad_params(clustered, kwargs, name):
    with pytest.raises(ConceptEvoError, match=name):
        embed_neurons(clustered[0], progress=False, **kwargs)


def test_embed_neurons_bad_stimuli():
    with pytest.raises(ConceptEvoError, match="at least 2 neurons"):
        embed_neurons(make_stimuli([[0, 1]]), progress=False)
    with pytest.raises(ConceptEvoError, match="no two neurons share"):
        embed_neurons(make_stimuli([[0, 1], [2, 3]]), progress=False)
    with pytest.raises(ConceptEvoError, match="stimuli"):
        embed_neurons(np.zeros((3, 2)), progress=False)


# ---------------------------------------------------------------- image embedding (§5)
def test_j2_reaches_least_squares_optimum_overdetermined():
    # 40 neurons over 12 images: J2 > 0 at the optimum; rank-deficient (duplicate rows)
    rng = np.random.default_rng(0)
    indices = np.array([rng.choice(12, 4, replace=False) for _ in range(40)])
    indices[5] = indices[6]
    stimuli = make_stimuli(indices, num_images=12)
    emb = NeuronEmbedding(stimuli.neuron_ids, rng.normal(size=(40, 3)).astype(np.float32))
    img = embed_images(stimuli, emb)
    A = np.zeros((40, 12))
    for n, row in enumerate(indices):
        A[n, row] = 1 / 4
    W = np.linalg.lstsq(A, emb.vectors.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(img.vectors, W, atol=1e-5)
    R = A @ W - emb.vectors
    opt = np.sqrt(np.mean(np.sum(R ** 2, axis=1)))        # per neuron: root of the mean squared norm (the paper's unit)
    assert img.rmse == pytest.approx(opt, rel=1e-6) and img.rmse > 0.1
    assert img.info["rmse_per_coordinate"] == pytest.approx(opt / np.sqrt(3), rel=1e-6)
    assert img.info["j2"] == pytest.approx(img.rmse ** 2 / 2, rel=1e-9)
    assert img.info["relative_error"] == pytest.approx(np.linalg.norm(R) / np.linalg.norm(emb.vectors), rel=1e-6)
    assert img.info["determined"] == "over" and (img.info["num_neurons"], img.info["num_covered"]) == (40, 12)
    assert fit_summary(dict(img.info, rmse=img.rmse)).startswith(f"error per neuron {img.rmse:.4f}, ")
    gd = embed_images(stimuli, emb, method="gd", tol=1e-13, max_iter=50000)
    assert gd.rmse == pytest.approx(opt, rel=1e-4)


def test_j2_is_zero_and_minimum_norm_when_underdetermined(clustered, base):
    stimuli, _ = clustered
    img = embed_images(stimuli, base)
    assert img.rmse < 1e-6 and img.info["relative_error"] < 1e-6 and img.info["determined"] == "under"
    text = fit_summary(dict(img.info, rmse=img.rmse, holdout_relative=0.25, holdout_self_match=0.9))
    assert "exact fit (" in text and "says nothing about faithfulness" in text and "land 0.25 of a typical" in text
    assert text.endswith("90% of them nearer their own learned vector than any other neuron's")
    A, images, rows = stimulus_matrix(stimuli.indices)
    W = np.linalg.pinv(A.toarray()) @ base.vectors.astype(np.float64)
    np.testing.assert_allclose(img.vectors[images], W, atol=1e-4)
    assert img.covered.sum() == len(images) and img.num_images == 200


def test_uncovered_images_nan_without_responses(clustered, base):
    stimuli, _ = clustered
    img = embed_images(stimuli, base)
    assert np.isnan(img.vectors[~img.covered]).all()
    assert np.array_equal(img.has_vector, img.covered)
    other = make_stimuli(np.array([[int(np.flatnonzero(~img.covered)[0]), int(np.flatnonzero(img.covered)[0])]]))
    with pytest.raises(ConceptEvoError, match=str(int(np.flatnonzero(~img.covered)[0]))) as err:
        project(other, img)
    assert "responses" in str(err.value)
    with pytest.raises(ConceptEvoError, match="holds only"):
        project(make_stimuli([[0, 500]]), img)


def test_uncovered_images_from_responses(clustered, base):
    stimuli, _ = clustered
    rng = np.random.default_rng(0)
    responses = rng.integers(0, len(base), size=(200, 3))
    responses[0] = -1                              # an image with no responsive neuron
    responses[1, 1:] = -1
    img = embed_images(stimuli, base, responses=responses)
    covered_before = embed_images(stimuli, base)
    np.testing.assert_array_equal(img.vectors[img.covered], covered_before.vectors[img.covered])
    todo = np.flatnonzero(~img.covered)
    for x in todo[:20]:
        r = responses[x][responses[x] >= 0]
        if len(r):
            np.testing.assert_allclose(img.vectors[x], base.vectors[r].mean(axis=0), rtol=1e-5, atol=1e-6)
            assert img.indirect[x]
    if not img.covered[0]:
        assert np.isnan(img.vectors[0]).all()
    none = embed_images(stimuli, base, responses=responses, indirect=False)
    assert np.isnan(none.vectors[~none.covered]).all()


def test_image_embedding_save_load(tmp_path, clustered, base):
    img = embed_images(clustered[0], base)
    img.save(tmp_path / "img")
    back = ImageEmbedding.load(tmp_path / "img")
    np.testing.assert_array_equal(back.vectors, img.vectors)
    np.testing.assert_array_equal(back.covered, img.covered)
    assert back.rmse == img.rmse and back.info["method"] == "lstsq"
    # a folder written when the error was per coordinate is read in the per-neuron unit
    meta = json.loads((tmp_path / "img" / "meta.json").read_text())
    meta.pop("rmse_unit")
    meta["rmse"] = 0.5
    (tmp_path / "img" / "meta.json").write_text(json.dumps(meta))
    assert ImageEmbedding.load(tmp_path / "img").rmse == pytest.approx(0.5 * np.sqrt(img.dim))
    assert fit_summary({"rmse": 0.5}).startswith("RMSE 0.5000 per coordinate (an older workspace")


@pytest.mark.parametrize("kwargs, name", [
    (dict(method="svd"), "method"), (dict(tol=-1), "tol"), (dict(max_iter=0), "max_iter"),
    (dict(lr=0, method="gd"), "lr"), (dict(num_images=10), "num_images"), (dict(gd_init="ones"), "gd_init"),
    (dict(responses=np.zeros((7, 2), np.int64)), "responses"),
    (dict(responses=np.full((200, 2), 999)), "responses"),
])
def test_embed_images_bad_params(clustered, base, kwargs, name):
    with pytest.raises(ConceptEvoError, match=name):
        embed_images(clustered[0], base, **kwargs)


def test_embed_images_needs_matching_neurons(clustered, base):
    other = make_stimuli(clustered[0].indices, prefix="conv9")
    with pytest.raises(ConceptEvoError, match="conv9:0"):
        embed_images(other, base)


# ---------------------------------------------------------------- projection (§6)
def test_projection_is_stimulus_mean(clustered, base):
    stimuli, _ = clustered
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    other = make_stimuli(rng.integers(0, 200, size=(30, 6)), prefix="features.5")
    proj = project(other, vectors)
    for n, row in enumerate(other.indices):
        np.testing.assert_allclose(proj.vectors[n], vectors[np.unique(row)].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert proj.neuron_ids == other.neuron_ids


def test_base_projection_is_faithful(clustered, base):
    stimuli, _ = clustered
    img = embed_images(stimuli, base)
    proj = project(stimuli, img)
    np.testing.assert_allclose(proj.vectors, base.vectors, atol=1e-4)
    fid = fidelity(base, proj)
    assert fid["mean_distance"] < 1e-3 and fid["self_match"] == 1.0 and fid["typical_distance"] > 0.5
    shuffled = NeuronEmbedding(base.neuron_ids, base.vectors[np.random.default_rng(0).permutation(len(base))])
    assert fidelity(base, shuffled)["relative_mean"] > 0.5


def test_holdout_projection_lands_in_its_cluster(clustered, base):
    stimuli, cluster = clustered
    responses = np.stack([np.flatnonzero(cluster == cluster[0])[:3]] * 200)   # arbitrary but valid rows
    for kwargs in (dict(), dict(responses=responses)):
        res = holdout_fidelity(stimuli, base, fraction=0.25, seed=1, **kwargs)
        assert res["num_neurons"] == 15 and 0 < res["coverage"] <= 1
        assert res["relative_mean"] < 0.8
        proj = res["projected"]
        own = np.array([base.index_of(i) for i in proj.neuron_ids])
        d = ((proj.vectors[:, None, :] - base.vectors[None]) ** 2).sum(-1)
        assert np.mean(cluster[d.argmin(1)] == cluster[own]) > 0.8
    with pytest.raises(ConceptEvoError, match="fraction"):
        holdout_fidelity(stimuli, base, fraction=1.0)


@pytest.mark.slow
def test_layout_shared_frame(tmp_path, base):
    from conceptevo.projection import Layout2D, fit_layout

    layout = fit_layout(base, seed=0, n_neighbors=10)
    assert layout.base_xy.shape == (len(base), 2)
    xy = layout.transform(base.vectors[:5])
    assert xy.shape == (5, 2) and np.isfinite(xy).all()
    layout.save(tmp_path / "layout.joblib")
    back = Layout2D.load(tmp_path / "layout.joblib")
    np.testing.assert_array_equal(back.base_xy, layout.base_xy)
    with pytest.raises(ConceptEvoError, match="dim"):
        back.transform(np.zeros((2, 3)))


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_neighbors=1), "n_neighbors"), (dict(min_dist=-0.1), "min_dist"), (dict(min_dist=2.0), "min_dist"),
    (dict(seed=-1), "seed"),
])
def test_fit_layout_bad_params(base, kwargs, name):
    from conceptevo.projection import fit_layout

    with pytest.raises(ConceptEvoError, match=name):
        fit_layout(base, **kwargs)

