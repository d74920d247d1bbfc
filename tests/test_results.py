"""Workspace.from_results: API results in memory -> a workspace the figures, the CLI and the explorer read."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch

import conceptevo as ce
from conceptevo.data import open_dataset, sample_pool
from conceptevo.errors import ConceptEvoError, WorkspaceError
from conceptevo.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread


def _net(seed, ncls, width=4):
    torch.manual_seed(seed)
    return build_model("vgg_like", in_channels=3, num_classes=ncls, width=width).eval()


@pytest.fixture(scope="module")
def results():
    full = open_dataset("synthetic", n=300, size=32, seed=1)
    pool = sample_pool(full, 160, seed=0)   # a conceptevo pool: stimuli name images by their index in `full`
    ncls = len(full.classes)
    nets = {"e1": _net(0, ncls), "e2": _net(1, ncls), "e3": _net(2, ncls)}
    other = build_model("resnet_like", in_channels=3, num_classes=ncls, width=4).eval()
    kw = dict(k=6, progress=False, num_images=len(full))
    stim = {"cnn": {t: ce.find_stimuli(n, pool, **kw) for t, n in nets.items()},
            "res": {"r1": ce.find_stimuli(other, pool, **kw)}}
    base = stim["cnn"]["e3"]
    emb = ce.embed_neurons(base, dim=8, epochs=30, progress=False)
    img = ce.embed_images(base, emb, responses=ce.top_responses(nets["e3"], pool, base, progress=False, num_images=len(full)))
    return {"stim": stim, "emb": emb, "img": img, "pool": pool, "full": full,
            "models": {"cnn": nets["e3"], "res": other}}


def _build(path, r, **kw):
    args = dict(base=("cnn", "e3"), dataset=r["pool"], models=r["models"], layout="pca")
    args.update(kw)
    return ce.Workspace.from_results(path, r["stim"], r["emb"], r["img"], **args)


@pytest.fixture(scope="module")
def ws(results, tmp_path_factory):
    cks = {"cnn": [{"tag": "e1", "epoch": 1, "step": 40, "metrics": {"train_top1": 0.4}}, {"tag": "e3", "epoch": 3}]}
    return _build(tmp_path_factory.mktemp("api") / "space", results, checkpoints=cks)


def test_the_workspace_holds_the_results_in_the_pipeline_format(ws, results):
    again = ce.Workspace(ws.path)                      # read back from disk
    assert again.models == ["cnn", "res"] and again.tags("cnn") == ["e1", "e2", "e3"] and again.base == ("cnn", "e3")
    for m, per in results["stim"].items():
        for t, s in per.items():
            got = again.stimuli(m, t)
            assert got.neuron_ids == s.neuron_ids and np.array_equal(got.indices, s.indices)
            want = ce.project(s, results["img"]).vectors
            np.testing.assert_array_equal(again.projection(m, t).vectors, want)
            assert again.layout(m, t).shape == (len(s), 2)
    np.testing.assert_array_equal(again.neuron_embedding().vectors, results["emb"].vectors)
    np.testing.assert_array_equal(again.image_embedding().vectors, results["img"].vectors)
    cks = {c.tag: c for c in again.checkpoints("cnn")}
    assert (cks["e1"].epoch, cks["e1"].step, cks["e1"].metrics) == (1, 40, {"train_top1": 0.4})
    assert cks["e2"].epoch is None and cks["e3"].epoch == 3
    # the layout is fitted on the base's learned vectors and shared: the base's own projection lands where PCA puts it
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(results["emb"].vectors)
    np.testing.assert_allclose(again.layout("cnn", "e1"), pca.transform(again.projection("cnn", "e1").vectors), atol=1e-4)


def test_patches_show_the_images_the_stimuli_name(ws, results):
    from conceptevo.patches import PatchStore, to_uint8_image

    store = PatchStore(ws)
    s = results["stim"]["cnn"]["e1"]
    first = int(s.indices[0, 0])
    assert store.has("cnn", "e1") and first in set(store.image_indices.tolist())
    # the pool is a subset: image `first` is item `first` of the full dataset, not of the pool
    np.testing.assert_array_equal(store.image(first), to_uint8_image(results["full"][first][0]))


def test_figures_cli_and_explorer_read_it(ws, tmp_path, capsys):
    from conceptevo.cli import main

    paths = ce.make_figures(ws, out=tmp_path / "fig", formats=("png",))
    assert sorted(p.name for p in paths) == ["evolution.png", "groups.png", "space.png"]
    # the CLI recomputes nothing and needs no recorded dataset: the patches were made from the images given
    assert main(["figures", str(ws.path), "--out", str(tmp_path / "cli"), "--formats", "png"]) == 0
    assert (tmp_path / "cli" / "space.png").exists()
    app = ce.explore(ws, port=0, background=True)
    try:
        text = urllib.request.urlopen(app.url + "data/meta.js", timeout=10).read().decode()
    finally:
        app.shutdown()
        app.server_close()
    meta = json.loads(text[text.index(",") + 1:text.rindex(")")])
    assert [m["name"] for m in meta["models"]] == ["cnn", "res"] and meta["base"] == {"model": "cnn", "tag": "e3"}
    assert meta["images"] is not None and not [x for x in meta["missing"] if x["what"] != "importance"]


def test_commands_that_reread_the_images_say_the_dataset_is_not_recorded(ws):
    with pytest.raises(WorkspaceError, match="records no dataset.*from_results"):
        ws.dataset("train")


def test_a_rerun_rewrites_only_what_changed(results, tmp_path):
    path = tmp_path / "space"
    first = _build(path, results)
    before = {k: dict(v) for k, v in first.manifest["stages"].items()}
    same = _build(path, results)
    assert same.manifest["stages"] == before
    changed = dict(results)
    changed["stim"] = {"cnn": dict(results["stim"]["cnn"]), "res": results["stim"]["res"]}
    s = results["stim"]["cnn"]["e1"]
    changed["stim"]["cnn"]["e1"] = ce.Stimuli(s.neuron_ids, s.indices[:, ::-1], s.values, s.positions[:, ::-1],
                                              layers=s.layers, num_images=s.num_images, mean=s.mean, std=s.std)
    after = _build(path, changed).manifest["stages"]
    redone = sorted(k for k in after if after[k]["key"] != before[k]["key"])
    assert redone == ["layout", "patches/cnn/e1", "patches/images", "projection/cnn/e1", "stimuli/cnn/e1"]


def test_it_never_overwrites_a_study_or_a_foreign_folder(results, tmp_path):
    study = ce.Workspace(tmp_path / "study", create=True)
    study.set_config({"data": {"kind": "synthetic"}})
    with pytest.raises(WorkspaceError, match="made by `conceptevo run`"):
        _build(study.path, results)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="not an empty folder"):
        _build(tmp_path / "other", results)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("change, message", [
    ({"base": ("cnn", "e9")}, "base .* has no stimuli"),
    ({"base": "cnn"}, "base must be a \\(model, tag\\) pair"),
    ({"models": {"cnn": None}}, "one network per model"),
    ({"checkpoints": {"cnn": [{"tag": "e7", "epoch": 7}]}}, "'e7' that have no stimuli"),
    ({"checkpoints": {"cnn": [{"epoch": 7}]}}, "dicts with a 'tag'"),
])
def test_bad_arguments_are_one_line_errors(results, tmp_path, change, message):
    with pytest.raises(ConceptEvoError, match=message):
        _build(tmp_path / "w", results, **change)
    assert not (tmp_path / "w").exists()


def test_the_embedding_must_be_the_bases(results, tmp_path):
    wrong = ce.embed_neurons(results["stim"]["res"]["r1"], dim=8, epochs=2, progress=False)
    with pytest.raises(ConceptEvoError, match="not those of the base stimuli"):
        ce.Workspace.from_results(tmp_path / "w", results["stim"], wrong, results["img"], base=("cnn", "e3"),
                                  dataset=results["pool"], models=results["models"])


def test_a_checkpoint_without_a_file_says_where_it_came_from():
    from conceptevo.errors import CheckpointError
    from conceptevo.models import load_checkpoint

    with pytest.raises(CheckpointError, match="built from results in memory"):
        load_checkpoint("", torch.nn.Linear(2, 2))
