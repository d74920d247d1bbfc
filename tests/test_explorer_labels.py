"""The explorer names checkpoints by their tags, and by epoch or step only where they are known."""
from __future__ import annotations

import pytest

import fabricated
from conceptevo.explorer import ExplorerData, make_server
from conceptevo.report import analysis
from conceptevo.workspace import Workspace
from test_explorer import Running, browser, page, wait_ready  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread_module")

TAGS = [("ckpt_000100", None), ("ckpt_000200", None), ("ckpt_000300", None), ("ckpt_000400", None),
        ("ckpt_000500", None), ("ckpt_000600", None), ("ckpt_000700", None)]


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    """Seven checkpoints named by step, with steps but no epochs recorded (as a plain training loop saves them)."""
    ws = fabricated.fabricate(tmp_path_factory.mktemp("stepped"), importance=False, models=fabricated.MODELS[:1], tags=TAGS)
    for i, row in enumerate(ws.manifest["models"]["vgg"]["checkpoints"]):
        row["step"] = 100 * (i + 1)
    ws._flush()
    return Workspace(ws.path)


def test_meta_carries_steps_and_the_axis(stepped, tmp_path_factory):
    meta = ExplorerData(stepped, kmeans=3).meta()
    cks = meta["models"][0]["checkpoints"]
    assert meta["time_axis"] == "checkpoint"
    assert [(c["tag"], c["epoch"], c["step"], c["time"]) for c in cks][:2] == [("ckpt_000100", None, 100, 0.0),
                                                                               ("ckpt_000200", None, 200, 1.0)]
    epochs = fabricated.shared(tmp_path_factory)
    assert ExplorerData(epochs, kmeans=3).meta()["time_axis"] == "epoch"


def test_one_axis_for_all_models_when_any_epoch_is_unknown(tmp_path):
    ws = fabricated.fabricate(tmp_path, importance=False, tags=[("e0.5", 0.5), ("e1", 1.0), ("e2", 2.0)])
    assert analysis.checkpoint_times(ws, "vgg") == [0.5, 1.0, 2.0]
    ws.manifest["models"]["resnet"]["checkpoints"][1]["epoch"] = None
    ws._flush()
    assert analysis.time_axis(ws) == "checkpoint"
    assert analysis.checkpoint_times(ws, "vgg") == analysis.checkpoint_times(ws, "resnet") == [0.0, 1.0, 2.0]


def test_the_slider_names_the_sixth_checkpoint_by_its_tag_and_step(stepped, page):  # noqa: F811
    run = Running(make_server(stepped, port=0, kmeans=3))
    try:
        page.goto(run.server.url + "?step=5")
        wait_ready(page)
        label = page.inner_text("#timelabel")
        assert label.startswith("checkpoint 6 of 7 — vgg ckpt_000600 (step 600, acc ")
        assert "epoch" not in label
        assert page.inner_text(".panel .title").startswith("vgg ckpt_000600 · step 600 · acc ")
        assert page.get_attribute("#slider", "aria-label") == "checkpoint"
        assert page.errors == []
    finally:
        run.close()


def test_with_epochs_the_slider_says_the_epoch(tmp_path_factory, page):  # noqa: F811
    ws = fabricated.shared(tmp_path_factory)
    run = Running(make_server(ws, port=0, kmeans=3))
    try:
        page.goto(run.server.url + "?panels=vgg&step=1")
        wait_ready(page)
        assert page.inner_text("#timelabel").startswith("epoch 1 — vgg e1 (epoch 1, acc ")
        assert page.errors == []
    finally:
        run.close()
