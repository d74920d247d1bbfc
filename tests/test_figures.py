"""Static figures (Fig 1, 2, 3) and the `figures` / `patches` commands."""
from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fabricated
from conceptevo.errors import ConceptEvoError, WorkspaceError
from conceptevo.explorer.cli import add_commands
from conceptevo.report import make_figures, plot_neuron_evolution, plot_neuron_groups, plot_space_grid
from conceptevo.report import analysis
from conceptevo.workspace import Workspace, WorkspaceLock


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return fabricated.shared(tmp_path_factory)


def parser():
    p = argparse.ArgumentParser(prog="conceptevo")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_make_figures_writes_png_and_pdf(ws, tmp_path):
    paths = make_figures(ws, out=tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{n}.{f}" for n in ("space", "groups", "evolution") for f in ("png", "pdf"))
    for p in paths:
        assert p.stat().st_size > 1000
        if p.suffix == ".pdf":
            assert p.read_bytes()[:5] == b"%PDF-"
        else:
            with Image.open(p) as im:
                assert im.size[0] > 300 and im.size[1] > 200
                # not blank: the picture has many colours (points and patches)
                assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50


def test_evolution_of_a_chosen_neuron_and_errors(ws, tmp_path):
    [png] = plot_neuron_evolution(ws, tmp_path / "e.png", neuron="features.3:1", model="vgg", formats=("png",))
    assert png.exists()
    with pytest.raises(ConceptEvoError, match="features.3:1"):
        plot_neuron_evolution(ws, tmp_path / "e.png", neuron="features.3:99", model="vgg", formats=("png",))
    with pytest.raises(ConceptEvoError, match="malformed neuron id"):
        plot_neuron_evolution(ws, tmp_path / "e.png", neuron="nonsense", formats=("png",))
    with pytest.raises(WorkspaceError, match="not in this study"):
        plot_neuron_evolution(ws, tmp_path / "e.png", model="nope", formats=("png",))
    with pytest.raises(ConceptEvoError, match="formats"):
        plot_neuron_groups(ws, tmp_path / "g.png", formats=("gif",))
    # the default neuron is the one that travelled furthest: the longest path over its checkpoints, by brute force
    vectors = analysis.unified_vectors(ws)
    tags = [t for t in ws.tags("vgg") if vectors[("vgg", t)] is not None]
    ids = analysis.neuron_ids(ws, "vgg", tags[-1])
    path = {nid: sum(float(np.linalg.norm(vectors[("vgg", b)][i] - vectors[("vgg", a)][i])) for a, b in zip(tags, tags[1:]))
            for i, nid in enumerate(ids)}
    assert len(tags) >= 2 and len(set(path.values())) > 1
    assert analysis.most_moving_neuron(ws, "vgg", vectors) == max(path, key=path.get)


def test_space_grid_still_works(ws, tmp_path):
    paths = plot_space_grid(ws, tmp_path / "space.png", formats=("png", "pdf"))
    assert [p.suffix for p in paths] == [".png", ".pdf"]


def test_figures_need_patches_and_say_how(ws, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(ws.path, copy)
    w2 = Workspace(copy)
    w2.invalidate("patches/vgg/e2")
    with pytest.raises(WorkspaceError, match="conceptevo patches"):
        plot_neuron_groups(w2, tmp_path / "g.png", formats=("png",))


def test_cli_patches_then_figures(ws, tmp_path, capsys):
    copy = tmp_path / "study"
    shutil.copytree(ws.path, copy)
    shutil.rmtree(copy / "patches")
    w2 = Workspace(copy)
    for name in list(w2.manifest["stages"]):
        if name.startswith("patches/"):
            w2.invalidate(name)
    args = parser().parse_args(["figures", str(copy), "--formats", "png", "--no-progress", "--neuron", "layers.0.conv1:1", "--model", "resnet"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "evolution.png" in out and (copy / "figures" / "groups.png").exists()
    assert Workspace(copy).stage("patches/resnet/e1") is not None  # figures computed the missing patches first
    assert WorkspaceLock.holder(copy) is None  # released


def test_cli_argument_errors():
    p = parser()
    with pytest.raises(SystemExit):
        p.parse_args(["figures", "ws", "--formats", "gif"])
    with pytest.raises(SystemExit):
        p.parse_args(["explore", "ws", "--port", "70000"])
    a = p.parse_args(["export", "ws"])
    with pytest.raises(ConceptEvoError, match="at least one of --html DIR, --tensorboard DIR, --wandb"):
        a.fn(a)  # nothing to export
    a = p.parse_args(["explore", "ws"])
    assert a.host == "127.0.0.1" and a.port == 8000
