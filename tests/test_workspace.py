"""The workspace on its own: opening, the stage records (run_stage / is_done / finish / invalidate), the
study's record, the lock. What the stages write is tested with the stages (test_pipeline.py, test_results.py)."""
import os

import pytest

from conceptevo.errors import WorkspaceError
from conceptevo.workspace import Workspace, WorkspaceLock


def test_workspace_errors(tmp_path):
    with pytest.raises(WorkspaceError, match="no conceptevo workspace"):
        Workspace(tmp_path / "none")
    ws = Workspace(tmp_path / "w", create=True)
    with pytest.raises(WorkspaceError, match="run `conceptevo run`"):
        ws.neuron_embedding()
    ws.manifest["version"] = 0
    ws._flush()
    with pytest.raises(WorkspaceError, match="format version 0"):
        Workspace(tmp_path / "w")


def test_lock_and_stale_lock(tmp_path):
    with WorkspaceLock(tmp_path):
        with pytest.raises(WorkspaceError, match="in use by process"):
            with WorkspaceLock(tmp_path):
                pass
    assert WorkspaceLock.holder(tmp_path) is None and (tmp_path / ".lock").read_text() == ""
    # a lock left by a process that no longer exists is taken over
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    (tmp_path / ".lock").write_text(str(pid))
    with WorkspaceLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        assert WorkspaceLock.holder(tmp_path) == os.getpid()


def test_concurrent_writers_keep_each_others_stage_records(tmp_path):
    a = Workspace(tmp_path / "w", create=True)
    b = Workspace(tmp_path / "w")  # opened before a writes anything
    a.finish("evaluation/vgg", "k1")
    b.finish("evaluation/resnet", "k2")  # must not erase a's record
    a.invalidate("evaluation/vgg")
    b.finish("other", "k3")  # must not resurrect what a dropped
    stages = Workspace(tmp_path / "w").manifest["stages"]
    assert set(stages) == {"evaluation/resnet", "other"}


def test_run_stage_runs_once_per_key_and_records_what_write_returns(tmp_path):
    ws = Workspace(tmp_path / "w", create=True)
    calls = []

    def write():
        calls.append(1)
        return {"rows": len(calls)}

    assert ws.run_stage("s", "k1", write, {"p": 1}) is True
    assert ws.run_stage("s", "k1", write, {"p": 1}) is False  # same inputs: not run again
    assert len(calls) == 1
    rec = Workspace(tmp_path / "w").stage("s")  # saved, seen by a fresh reader
    assert rec["key"] == "k1" and rec["params"] == {"p": 1} and rec["rows"] == 1
    assert ws.run_stage("s", "k2", write) is True  # new inputs: run again, the record replaced
    assert len(calls) == 2 and Workspace(tmp_path / "w").stage("s")["key"] == "k2"


def test_a_stage_whose_write_fails_is_not_recorded_and_its_old_record_is_dropped(tmp_path):
    ws = Workspace(tmp_path / "w", create=True)
    ws.run_stage("s", "k1", lambda: None)

    def fails():
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ws.run_stage("s", "k2", fails)
    # the old record must not vouch for files that were being rewritten
    assert Workspace(tmp_path / "w").stage("s") is None
    assert not ws.is_done("s", "k1")


def test_study_record_and_data_info_are_saved(tmp_path):
    ws = Workspace(tmp_path / "w", create=True)
    ws.set_config({"data": {"kind": "synthetic"}})
    models = {"a": {"arch": "vgg_like", "options": {}, "checkpoints": [{"tag": "e1", "epoch": 1.0, "path": "runs/a/e1.pt"}]}}
    ws.record_study(models, ("a", "e1"), {"pool": 20, "num_images": 20})
    ws.update_data(classes=["x", "y"])
    ws.record_sanity("a", {"top1": 0.5})
    again = Workspace(tmp_path / "w")
    assert again.config == {"data": {"kind": "synthetic"}}
    assert again.models == ["a"] and again.base == ("a", "e1") and again.tags("a") == ["e1"]
    assert again.data_info == {"pool": 20, "num_images": 20, "classes": ["x", "y"]}
    assert again.sanity_record("a") == {"top1": 0.5} and again.sanity_record("b") is None
