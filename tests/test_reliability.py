"""Reliability: crash safety under SIGKILL, the workspace lock, determinism, a full disk, hostile inputs,
safetensors, and the explorer server under load on loopback. Figures: docs/reliability.md.

Already covered elsewhere (not repeated here): a checkpoint crafted to run code
on load and a truncated .pt (test_models.py), unknown / mistyped config keys
and non-positive values in the config (test_config.py), a stale lock and a
workspace of an older format version (test_config.py), corrupt image files and
an empty class folder (test_data.py), an empty class for importance
(test_importance.py), NaN weights and RGB data into a 1-channel model at the
API level (test_stimuli.py), IDX fuzzing (test_data.py). Fuzzing of the
config parser, image folders and the workspace reader is in test_fuzz.py.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptevo import build_model, load_checkpoint
from conceptevo import io as cio
from conceptevo.cli import main
from conceptevo.config import EmbeddingConfig
from conceptevo.data import open_dataset, write_idx
from conceptevo.errors import CheckpointError, ConceptEvoError, StorageError
from conceptevo.io import TEMP_SUFFIX, load_npy, save_npy, write_bytes
from conceptevo.layers import resolve_layers
from conceptevo.models.checkpoints import save_checkpoint
from conceptevo.models.train import TrainConfig, train
from conceptevo.workspace import Workspace, WorkspaceLock

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
[study]
out = "{out}"
[data]
kind = "{kind}"
{data_path}pool = 200
options = {options}
[[models]]
name = "vgg"
arch = "vgg_like"
checkpoints = {checkpoints}
options = {model_options}
allow_chance = true  # one epoch leaves these test models near chance
[stimuli]
k = {k}
[embedding]
dim = {dim}
epochs = 30
lr = {lr}
[layout]
n_neighbors = 10
"""


def write_config(folder: Path, name: str, checkpoints, out: str | None = None, dim=8, k=5, lr=0.05,
                 kind="synthetic", data_path=None, options='{ n = 300, size = 28 }', model_options="{ width = 4 }") -> Path:
    ck = json.dumps(checkpoints if isinstance(checkpoints, str) else [str(c) for c in checkpoints])
    text = CONFIG.format(out=out or name, kind=kind, data_path=f'path = "{data_path}"\n' if data_path else "",
                         options=options, checkpoints=ck, model_options=model_options, k=k, dim=dim, lr=lr)
    p = folder / f"{name}.toml"
    p.write_text(text)
    return p


def cli_error(capsys, *argv) -> str:
    """Run the CLI, expect exit status 2 and exactly one error line (the last), no traceback; return it."""
    capsys.readouterr()
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("conceptevo: error: ")
    assert sum(ln.startswith("conceptevo: error:") for ln in lines) == 1
    return lines[-1]


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _content(p: Path) -> bytes:
    """A file's bytes; for JSON records, without the wall-clock ``seconds`` a stage notes."""
    data = p.read_bytes()
    if p.suffix == ".json":
        return json.dumps(_without_timings(json.loads(data)), sort_keys=True).encode()
    return data


def result_files(root: Path) -> dict[str, bytes]:
    """Every file of a workspace except the manifest (it holds timestamps) and the lock.

    Arrays (.npy) and figures (.png) are compared byte for byte; JSON records
    likewise, less the wall-clock ``seconds`` the image embedding notes.
    """
    return {str(p.relative_to(root)): _content(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", ".lock") and not p.name.endswith(TEMP_SUFFIX)}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"*{TEMP_SUFFIX}") if p.is_file()]


def stages(root: Path) -> dict[str, dict]:
    return json.loads((root / "manifest.json").read_text())["stages"]


def stage_files(name: str, rec: dict, names) -> list[str]:
    """The files a finished stage vouches for (relative paths), given every file name of a complete workspace:
    those it lists, those under the folder named like the stage, or ``STAGE.npy``."""
    return sorted(set(rec.get("files", [])) | {n for n in names if n.startswith(name + "/") or n == name + ".npy"})


def check_recorded_stages(root: Path, refs: list[Path]) -> int:
    """Every stage the manifest lists has all its files, each identical to the file of a clean run with that key."""
    ref_stages = [stages(r) for r in refs]
    ref_files = [result_files(r) for r in refs]
    recorded = stages(root)
    for name, rec in recorded.items():
        match = [i for i, st in enumerate(ref_stages) if st.get(name, {}).get("key") == rec["key"]]
        assert match, f"stage {name} recorded with a key no clean run produced"
        files = ref_files[match[0]]
        wanted = stage_files(name, rec, files)
        assert wanted, name
        for f in wanted:
            assert (root / f).is_file(), f"stage {name} is recorded but {f} is missing"
            assert _content(root / f) == files[f], f"stage {name} is recorded but {f} differs from a clean run"
    return len(recorded)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny checkpoints (width 4) of a VGG-like trained on 300 generated images."""
    root = tmp_path_factory.mktemp("rel-runs")
    tr = open_dataset("synthetic", split="train", n=300, size=28)
    te = open_dataset("synthetic", split="test", n=300, size=28)
    m = build_model("vgg_like", in_channels=3, num_classes=10, width=4)
    cks = train(m, tr, te, root / "vgg", TrainConfig(epochs=1, batch_size=64, first_epoch_checkpoints=2,
                                                     eval_images=100, bn_images=100), progress=False)
    return root, cks


@pytest.fixture(scope="module")
def reference(runs):
    """An uninterrupted run of the study, in this process (config A: dim 8)."""
    root, _ = runs
    cfg = write_config(root, "ref", str(root / "vgg"))
    t = time.perf_counter()
    assert main(["-q", "run", str(cfg), "--no-progress"]) == 0
    return root / "ref", time.perf_counter() - t


# ------------------------------------------------------------------------------------------ crash safety


def _subprocess_env() -> dict:
    env = dict(os.environ)
    threads = str(torch.get_num_threads())  # the same thread count as this process's reference run
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _spawn(cfg: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "conceptevo.cli", "-q", "run", str(cfg), "--no-progress"],
                                stdout=f, stderr=subprocess.STDOUT, env=_subprocess_env(), cwd=ROOT)


def _mtime(p: Path):
    try:
        return p.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_is_identical(runs, reference, capsys):
    """Kill `conceptevo run` with SIGKILL right after seeded random file writes, rerun, compare bit for bit.

    The kill targets are drawn (seed 7) from the files of an uninterrupted run
    in write order; after each target file is (re)written the process gets a
    further random 0-300 ms before the SIGKILL, so it dies between writes, in
    the middle of one, or during a computation. Each kill's rerun continues the
    same workspace (so later kills hit resumed runs). After every kill the
    manifest must list only stages whose files are all present and identical
    to the uninterrupted run's; the final rerun must reproduce every file bit
    for bit and leave no temporary file.
    """
    root, _ = runs
    ref, ref_seconds = reference
    ref_files = result_files(ref)
    events = sorted(ref_files, key=lambda n: (ref / n).stat().st_mtime_ns)
    ref_stage = stages(ref)
    cfg = write_config(root, "crash", str(root / "vgg"))
    ws = root / "crash"
    log = root / "crash.log"
    rng = random.Random(7)
    picks = sorted(rng.sample(range(len(events)), 3))
    report = []
    for n, pick in enumerate(picks):
        done = stages(ws) if (ws / "manifest.json").exists() else {}
        recorded = {f for name, rec in done.items() for f in stage_files(name, rec, ref_files)}
        todo = [e for e in events[pick:] if e not in recorded]
        before = {e: _mtime(ws / e) for e in todo}
        proc = _spawn(cfg, log)
        target = todo[0] if todo else None
        deadline = time.monotonic() + 300
        locked_checked = n > 0
        while proc.poll() is None and time.monotonic() < deadline:
            if not locked_checked and (ws / ".lock").exists() and (ws / ".lock").read_text().strip():
                # a second process on the same workspace stops with a clear message
                line = cli_error(capsys, "run", str(cfg), "--no-progress")
                assert f"in use by process {proc.pid}" in line, line
                locked_checked = True
            if target is not None and _mtime(ws / target) not in (None, before[target]):
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        assert rc == (-signal.SIGKILL if killed else 0), (rc, log.read_text()[-2000:])
        assert locked_checked
        left = len(temporaries(ws))
        kept = check_recorded_stages(ws, [ref])
        report.append(f"kill {n}: after {target} ({'killed' if killed else 'had finished'}), "
                      f"{kept}/{len(ref_stage)} stages kept, {left} temp file(s) left")
    # the rerun: takes over the dead process's lock, removes its temporary files, finishes
    proc = _spawn(cfg, log)
    assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    assert temporaries(ws) == [] and WorkspaceLock.holder(ws) is None
    assert {k: v["key"] for k, v in stages(ws).items()} == {k: v["key"] for k, v in ref_stage.items()}
    got = result_files(ws)
    assert sorted(got) == sorted(ref_files)
    differ = [name for name in ref_files if got[name] != ref_files[name]]
    assert differ == [], f"differ from the uninterrupted run: {differ}"
    npy = sum(name.endswith(".npy") for name in ref_files)
    print(f"\nreference run {ref_seconds:.1f} s; {len(ref_files)} files ({npy} .npy) bit-identical after "
          f"{len(report)} SIGKILLs:\n  " + "\n  ".join(report))


def test_second_process_is_locked_out_and_nothing_changes(runs, reference, capsys):
    """While a process holds the lock, `conceptevo run` on the same study stops at once and writes nothing."""
    root, _ = runs
    ref, _ = reference
    cfg = write_config(root, "ref", str(root / "vgg"))
    manifest = (ref / "manifest.json").read_bytes()
    with WorkspaceLock(ref):
        line = cli_error(capsys, "run", str(cfg), "--no-progress")
    assert f"in use by process {os.getpid()}" in line and "wait for it to finish" in line
    assert (ref / "manifest.json").read_bytes() == manifest and WorkspaceLock.holder(ref) is None


def test_orphan_temporaries_removed_only_for_dead_writers(tmp_path):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    dead = tmp_path / "a" / f".x.npy.~{pid}~abcdefgh.npy.tmp"
    live = tmp_path / f".y.npy.~{os.getpid()}~abcdefgh.npy.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (dead, live, other):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    with WorkspaceLock(tmp_path):
        pass
    assert not dead.exists() and live.exists() and other.exists()


# ------------------------------------------------------------------------------------------ determinism


def test_same_inputs_same_bits_in_process(runs, reference, tmp_path):
    """A second run (same inputs and seeds) into another folder reproduces every array and figure bit for bit."""
    root, _ = runs
    ref, _ = reference
    cfg = write_config(tmp_path, "again", str(root / "vgg"))
    assert main(["-q", "run", str(cfg), "--no-progress"]) == 0
    a, b = result_files(ref), result_files(tmp_path / "again")
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []


# ------------------------------------------------------------------------------------------ full disk


def test_full_disk_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.npy"
    save_npy(target, np.arange(10))
    old = target.read_bytes()
    real_fsync = os.fsync

    def fsync_full(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if name.endswith(TEMP_SUFFIX):
            os.ftruncate(fd, 7)  # part of the data made it, then the device filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_full)
    with pytest.raises(StorageError, match="no space left to write .*a.npy.*nothing half-written was kept"):
        save_npy(target, np.arange(1000))
    with pytest.raises(StorageError):
        write_bytes(tmp_path / "new.json", b"{}")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_bytes() == old and not (tmp_path / "new.json").exists()
    assert temporaries(tmp_path) == []

    # the write itself fails half way (np.save raising ENOSPC)
    def save_half(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", save_half)
    with pytest.raises(StorageError):
        save_npy(target, np.arange(5))
    assert target.read_bytes() == old and temporaries(tmp_path) == []
    # other OS errors pass through unchanged
    monkeypatch.setattr(np, "save", lambda f, a, allow_pickle=False: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as e:
        save_npy(target, np.arange(5))
    assert not isinstance(e.value, ConceptEvoError) and target.read_bytes() == old


@contextmanager
def _count_writes(fail_at: int | None = None):
    """Count atomic writes; make write number ``fail_at`` hit a full disk after part of its data is written."""
    real = cio.atomic_path
    seen = []

    @contextmanager
    def atomic_path(path, suffix=""):
        with real(path, suffix) as tmp:
            yield tmp
            seen.append(str(path))
            if len(seen) == fail_at:
                size = tmp.stat().st_size
                with open(tmp, "r+b") as f:
                    f.truncate(size // 2)
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    saved = cio.atomic_path
    cio.atomic_path = atomic_path
    try:
        yield seen
    finally:
        cio.atomic_path = saved


@pytest.fixture(scope="module")
def reference_b(runs, reference):
    """Config B (embedding dim 6) run on a copy of the finished config-A workspace: its clean result and write list."""
    root, _ = runs
    ref, _ = reference
    shutil.copytree(ref, root / "refB")
    cfg = write_config(root, "refB", str(root / "vgg"), dim=6)
    with _count_writes() as seen:
        assert main(["-q", "run", str(cfg), "--no-progress"]) == 0
    return root / "refB", list(seen)


def test_full_disk_mid_run_never_taken_as_complete(runs, reference, reference_b, capsys):
    """A disk that fills at a seeded random write of a run: one-line error, no stage vouches for a partial file,
    no temporary file is left, the old results stay intact, and a rerun finishes with the clean run's bits."""
    root, _ = runs
    ref, _ = reference
    ref_b, writes = reference_b
    assert len(writes) > 10
    rng = random.Random(3)
    picks = sorted(rng.sample(range(1, len(writes) + 1), 4))
    hit = []
    for j, fail_at in enumerate(picks):
        ws = root / f"full{j}"
        shutil.copytree(ref, ws)
        before = result_files(ws)
        cfg = write_config(root, f"full{j}", str(root / "vgg"), dim=6)
        with _count_writes(fail_at) as seen:
            line = cli_error(capsys, "run", str(cfg), "--no-progress")
        assert "no space left to write" in line and Path(seen[-1]).name in line
        assert temporaries(ws) == []
        check_recorded_stages(ws, [ref, ref_b])
        failed = Path(seen[-1]).relative_to(ws)
        if str(failed) in before:  # the file being replaced is the old one, whole
            assert _content(ws / failed) == before[str(failed)]
        assert main(["-q", "run", str(cfg), "--no-progress"]) == 0
        assert result_files(ws) == result_files(ref_b)
        hit.append(f"write {fail_at}/{len(writes)} ({failed})")
    print(f"\nfull disk at {', '.join(hit)}: each stopped with one line, no stage vouched for a partial file, "
          "no temporary file left, the rerun matched the clean run")


def test_crash_while_rewriting_a_stage_for_new_inputs(runs, reference, reference_b, monkeypatch):
    """Config B dies after rewriting part of a stage that config A had finished; rerunning config A must not
    take B's half-written files for A's results (the stale record is dropped before the files are rewritten)."""
    root, _ = runs
    ref, _ = reference
    ws = root / "mixed"
    shutil.copytree(ref, ws)
    from conceptevo.embedding import NeuronEmbedding

    def crash_after_vectors(self, folder):
        save_npy(Path(folder) / "vectors.npy", self.vectors)
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(NeuronEmbedding, "save", crash_after_vectors)
    cfg_b = write_config(root, "mixed", str(root / "vgg"), dim=6)
    assert main(["-q", "run", str(cfg_b), "--no-progress"]) == 130
    monkeypatch.undo()
    assert "embedding/neurons" not in stages(ws)
    cfg_a = write_config(root, "mixed", str(root / "vgg"), dim=8)
    assert main(["-q", "run", str(cfg_a), "--no-progress"]) == 0
    assert result_files(ws) == result_files(ref)


# ------------------------------------------------------------------------------------------ hostile inputs


def test_truncated_checkpoint_in_a_study(runs, tmp_path, capsys):
    root, cks = runs
    data = Path(cks[-1].path).read_bytes()
    bad = tmp_path / "half.pt"
    bad.write_bytes(data[: len(data) // 2])
    cfg = write_config(tmp_path, "s", [cks[0].path, bad])
    line = cli_error(capsys, "run", str(cfg), "--no-progress")
    assert "half.pt is corrupt or truncated" in line and "re-save it" in line
    assert "stimuli/vgg/half" not in stages(tmp_path / "s")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_name_the_layer(runs, tmp_path, capsys, value):
    root, cks = runs
    model = load_checkpoint(cks[-1].path, build_model("vgg_like", in_channels=3, num_classes=10, width=4))
    layer = resolve_layers(model)[1]
    with torch.no_grad():
        model.get_submodule(layer).weight[0, 0, 0, 0] = value
    save_checkpoint(tmp_path / "poisoned.pt", model)
    cfg = write_config(tmp_path, "s", [tmp_path / "poisoned.pt"])
    line = cli_error(capsys, "run", str(cfg), "--no-progress")
    assert f"layer {layer!r} produced NaN or Inf activations" in line


def _gray_idx(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", (np.arange(300) % 10).astype(np.uint8))
    return folder


def test_grayscale_data_against_rgb_checkpoints(runs, tmp_path, capsys):
    root, cks = runs
    data = _gray_idx(tmp_path / "gray")
    # the checkpoint's first layer takes 3 channels: said before anything is computed
    cfg = write_config(tmp_path, "s", str(root / "vgg"), kind="idx", data_path=data, options="{}")
    line = cli_error(capsys, "run", str(cfg), "--no-progress")
    assert "the images have 1 channel(s) but model 'vgg' (its first layer 'features.0'" in line and "takes 3" in line
    # the model is asked for 3 channels in its options: the same
    cfg = write_config(tmp_path, "s2", str(root / "vgg"), kind="idx", data_path=data, options="{}",
                       model_options="{ width = 4, in_channels = 3 }")
    line = cli_error(capsys, "run", str(cfg), "--no-progress")
    assert "the images have 1 channel(s) but model 'vgg' (in_channels in its options) takes 3" in line
    assert not (tmp_path / "s2").exists()  # stopped before the workspace was made


def test_k_larger_than_the_pool(runs, tmp_path, capsys):
    root, _ = runs
    cfg = write_config(tmp_path, "s", str(root / "vgg"), k=500)
    line = cli_error(capsys, "run", str(cfg), "--no-progress")
    assert "k=500 is larger than the image pool (200 images)" in line


@pytest.mark.parametrize("change, message", [
    (dict(dim=-3), "embedding.dim must be positive"),
    (dict(dim=0), "embedding.dim must be positive"),
    (dict(lr=0.0), "embedding.lr must be positive"),
    (dict(lr="nan"), "embedding.lr must be positive"),
    (dict(lr="inf"), "embedding.lr must be a finite number"),
    (dict(k=0), "stimuli.k must be positive"),
])
def test_non_positive_parameters_from_the_command_line(runs, tmp_path, capsys, change, message):
    root, _ = runs
    cfg = write_config(tmp_path, "s", str(root / "vgg"), **change)
    assert message in cli_error(capsys, "run", str(cfg))
    assert not (tmp_path / "s").exists()


def test_non_positive_parameters_in_the_api():
    with pytest.raises(ConceptEvoError, match="embedding.lr must be a finite number"):
        EmbeddingConfig(lr=float("inf")).validate()
    with pytest.raises(ConceptEvoError, match="lr must be positive"):
        TrainConfig(lr=0).validate()
    with pytest.raises(ConceptEvoError, match="epochs must be positive"):
        TrainConfig(epochs=-1).validate()


def test_damaged_or_old_workspace_from_the_command_line(tmp_path, capsys):
    ws = Workspace(tmp_path / "w", create=True)
    ws.manifest["version"] = 0
    ws._flush()
    assert "format version 0, this conceptevo reads version 1" in cli_error(capsys, "info", str(tmp_path / "w"))
    data = (tmp_path / "w" / "manifest.json").read_bytes()
    (tmp_path / "w" / "manifest.json").write_bytes(data[: len(data) // 2])
    line = cli_error(capsys, "info", str(tmp_path / "w"))
    assert "manifest.json" in line and "damaged" in line
    (tmp_path / "w" / "manifest.json").write_text('{"format": "conceptevo-workspace", "version": 1, "stages": []}')
    assert "'stages' is not an object" in cli_error(capsys, "info", str(tmp_path / "w"))


def test_damaged_arrays_name_the_file(tmp_path):
    save_npy(tmp_path / "a.npy", np.arange(100, dtype=np.float32))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[:90])
    for mmap in (False, True):
        with pytest.raises(ConceptEvoError, match=r"cannot read .*a.npy .*damaged"):
            load_npy(tmp_path / "a.npy", mmap=mmap)
    np.savez(tmp_path / "z.npy", a=np.arange(3))  # an archive under a .npy name
    shutil.move(tmp_path / "z.npy.npz", tmp_path / "z.npy")
    with pytest.raises(ConceptEvoError, match="not a single .npy array"):
        load_npy(tmp_path / "z.npy")
    with pytest.raises(ConceptEvoError, match="missing"):
        load_npy(tmp_path / "none.npy")
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConceptEvoError, match="obj.npy"):  # never unpickled
        load_npy(tmp_path / "obj.npy")


def _study_copy(tmp_path_factory, tmp_path) -> Path:
    """A private copy of the fabricated study (with patches), to damage."""
    fabricated = pytest.importorskip("fabricated")
    src = fabricated.shared(tmp_path_factory).path
    dst = tmp_path / "study"
    shutil.copytree(src, dst)
    return dst


def test_damaged_layout_is_one_line_for_explore_and_export(tmp_path_factory, tmp_path, capsys):
    ws = _study_copy(tmp_path_factory, tmp_path)
    xy = ws / "layout" / "vgg" / "e1" / "xy.npy"
    xy.write_bytes(xy.read_bytes()[:60])
    for argv in (["export", str(ws), "--html", str(tmp_path / "site")], ["explore", str(ws), "--port", "0"]):
        line = cli_error(capsys, *argv)
        assert "xy.npy" in line and "damaged" in line, line


@pytest.mark.parametrize("change, words", [
    (lambda m: m["models"]["vgg"]["checkpoints"][1].update(epoch="abc"), "has epoch 'abc'"),
    (lambda m: m["models"]["vgg"]["checkpoints"][1].update(epoch=[1]), "has epoch [1]"),
    (lambda m: m["models"]["vgg"]["checkpoints"][1].update(epoch=float("nan")), "has epoch nan"),
    (lambda m: m["models"]["vgg"]["checkpoints"][1].update(step="ten"), "has step 'ten'"),
    (lambda m: m["models"]["vgg"]["checkpoints"][1]["metrics"].update(train_top1="high"), "metric 'train_top1' = 'high'"),
    (lambda m: m["models"]["vgg"]["checkpoints"][1]["metrics"].update(test_top1=float("inf")), "metric 'test_top1' = inf"),
    (lambda m: m["models"]["vgg"]["checkpoints"][1].update(tag="e0.5"), "two checkpoints tagged 'e0.5'"),
    (lambda m: m["models"]["vgg"]["checkpoints"][1].update(tag="x/../e1"), "contains '/'"),
    (lambda m: m["base"].update(tag="e9"), "base checkpoint vgg e9 is not among"),
])
def test_mistyped_manifest_is_one_line_everywhere(tmp_path_factory, tmp_path, capsys, change, words):
    """A manifest whose checkpoint records have the wrong types (or two checkpoints with one tag) is refused when
    read, with one line naming the problem: by `info`, `export` and `explore` alike."""
    ws = _study_copy(tmp_path_factory, tmp_path)
    m = json.loads((ws / "manifest.json").read_text())
    change(m)
    (ws / "manifest.json").write_text(json.dumps(m))
    for argv in (["info", str(ws)], ["export", str(ws), "--html", str(tmp_path / "site")], ["explore", str(ws), "--port", "0"]):
        line = cli_error(capsys, *argv)
        assert "manifest" in line and "damaged" in line and words in line, line


def test_checkpoint_index_with_wrong_types_is_refused(tmp_path):
    from conceptevo.models import list_checkpoints

    (tmp_path / "e1.pt").write_bytes(b"")
    for row, words in (({"tag": "e1", "path": "e1.pt", "epoch": "abc"}, "epoch 'abc'"),
                       ({"tag": "e:1", "path": "e1.pt"}, "contains ':'"), ({"path": "e1.pt"}, "no string 'tag'")):
        (tmp_path / "checkpoints.json").write_text(json.dumps({"checkpoints": [row]}))
        with pytest.raises(CheckpointError, match=words):
            list_checkpoints(tmp_path)
    (tmp_path / "checkpoints.json").write_text(json.dumps({"checkpoints": [{"tag": "a", "path": "e1.pt"}] * 2}))
    with pytest.raises(CheckpointError, match="share the tag 'a'"):
        list_checkpoints(tmp_path)


def test_embedding_dim_beyond_memory_is_refused_with_the_figure(runs, tmp_path, capsys, monkeypatch):
    """dim = 1e8 would need ~112 GiB for 300 images: refused before any pass, with the estimate and what is
    available (here fixed at 8 GiB so the test does not depend on the machine)."""
    import conceptevo.errors as errors_module

    root, _ = runs
    monkeypatch.setattr(errors_module, "available_memory", lambda: 8 * 2**30)
    cfg = write_config(tmp_path, "s", str(root / "vgg"), dim=10**8)
    line = cli_error(capsys, "run", str(cfg), "--no-progress")
    assert "embedding.dim = 100000000" in line and "needs about 111.8 GiB" in line and "8.0 GiB available" in line, line
    assert "lower embedding.dim" in line
    assert not [k for k in stages(tmp_path / "s") if k.startswith("stimuli/")]
    # the API refuses too, before allocating
    from conceptevo.embedding import embed_neurons
    from conceptevo.stimuli import Stimuli

    stim = Stimuli.from_arrays(["a:0", "a:1", "a:2"], np.array([[0, 1], [1, 2], [0, 2]]), np.ones((3, 2), np.float32),
                               num_images=3)
    with pytest.raises(ConceptEvoError, match="neuron embedding of 3 neurons in dim=1000000000 needs about"):
        embed_neurons(stim, dim=10**9)


def test_a_pool_larger_than_the_dataset_is_said(runs, tmp_path, caplog):
    import logging

    from conceptevo.config import load_config
    from conceptevo.pipeline import _plan

    root, _ = runs
    cfg = load_config(write_config(tmp_path, "s", str(root / "vgg")))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pool=10**10))
    ws = Workspace(tmp_path / "s", create=True)
    with caplog.at_level(logging.WARNING):
        _plan(ws, cfg)
    assert "a pool of 10000000000 images was asked for but the dataset has 300; the pool is all 300" in caplog.text
    assert Workspace(tmp_path / "s").manifest["data"]["pool"] == 300  # the real size is recorded


# ------------------------------------------------------------------------------------------ healthy files


def _npy_cases():
    """(name, array, format version) for every kind of plain array conceptevo could meet."""
    rng = np.random.default_rng(0)
    out = []
    for dt in ["<f4", ">f8", "<i8", "|u1", "|b1", "<c8", "<U5", "|S3", "<M8[s]", "<f2"]:
        for shape in [(), (0,), (7,), (3, 4), (2, 0, 3), (2, 3, 4)]:
            a = rng.integers(0, 100, size=shape).astype(dt)
            out.append((f"{dt}-{shape}", a, None))
            out.append((f"{dt}-{shape}-F", np.asfortranarray(a), (2, 0)))
    out.append(("utf8-header", np.arange(6.0).reshape(2, 3), (3, 0)))
    out.append(("v1", np.arange(5, dtype=np.int16), (1, 0)))
    return out


def _write_npy(path, a, version):
    from numpy.lib import format as npf

    with open(path, "wb") as f:
        if version is None:
            np.save(f, a)
        else:
            npf.write_array(f, a, version=version)


def test_npy_loader_reads_what_numpy_writes(tmp_path):
    """Every plain array numpy writes (dtypes, shapes, Fortran order, format versions 1-3) comes back as np.load
    gives it, copied or memory-mapped."""
    for name, a, version in _npy_cases():
        p = tmp_path / "a.npy"
        _write_npy(p, a, version)
        for mmap in (False, True):
            got, want = load_npy(p, mmap=mmap), np.load(p, mmap_mode="r" if mmap else None)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.tobytes(order="A") == want.tobytes(order="A") and np.array_equal(got, want), name
            assert got.flags.f_contiguous == want.flags.f_contiguous, name
            assert got.flags.writeable == (not mmap), name


def test_npy_loader_never_parses_python(tmp_path):
    """numpy reads .npy headers with ast.literal_eval, which CPython 3.11 can fail with 'SystemError: AST
    constructor recursion depth mismatch' when threads parse at once (gh-106905). conceptevo's loader must not
    go through Python's parser at all, so that failure cannot happen to it."""
    import ast
    import builtins

    def refuse(*args, **kwargs):
        raise AssertionError("the .npy loader went through Python's parser")

    cases = _npy_cases()
    for i, (_, a, version) in enumerate(cases):
        _write_npy(tmp_path / f"{i}.npy", a, version)
    saved = ast.literal_eval, ast.parse, builtins.compile
    ast.literal_eval = ast.parse = builtins.compile = refuse
    failed = []
    try:
        for i, (name, a, _) in enumerate(cases):
            for mmap in (False, True):
                try:
                    if not np.array_equal(load_npy(tmp_path / f"{i}.npy", mmap=mmap), a):
                        failed.append(f"{name}: wrong values")
                except Exception as e:  # noqa: BLE001 - reported below, once the parser is back
                    failed.append(f"{name}: {e}")
    finally:
        ast.literal_eval, ast.parse, builtins.compile = saved
    assert failed == [], failed[:3]


def test_npy_loads_from_many_threads_under_garbage_collection(tmp_path):
    """The conditions of the flake (tests/switching.py): 8 threads at different C stack depths load healthy files
    while every garbage collection hands the interpreter to another thread. No load may fail or differ."""
    import threading

    from switching import deep, gc_switching

    files = []
    for i in range(4):
        a = np.random.default_rng(i).normal(size=(50 + i, 3)).astype(np.float32)
        save_npy(tmp_path / f"{i}.npy", a)
        files.append((tmp_path / f"{i}.npy", a))
    errors, loads = [], [0] * 8

    def work(t):
        for n in range(300):
            path, want = files[(t + n) % len(files)]
            try:
                got = deep(3 * t, lambda: load_npy(path, mmap=bool(n % 2)))
                if not np.array_equal(got, want):
                    errors.append(f"{path.name}: wrong values")
                loads[t] += 1
            except Exception as e:  # noqa: BLE001 - every failure is counted
                errors.append(f"{type(e).__name__}: {e}")

    with gc_switching():
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [], errors[:5]
    assert sum(loads) == 8 * 300


def test_a_healthy_file_out_of_descriptors_is_not_called_damaged(tmp_path):
    """With the process's open-file limit used up, reading a healthy array or record says so (too many open
    files, raise the limit), not 'damaged'."""
    save_npy(tmp_path / "a.npy", np.arange(10))
    (tmp_path / "r.json").write_text('{"x": 1}')
    code = f"""
import os, resource
from conceptevo.io import load_npy, read_json
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
for read in (lambda: load_npy({str(tmp_path / 'a.npy')!r}), lambda: load_npy({str(tmp_path / 'a.npy')!r}, mmap=True),
             lambda: read_json({str(tmp_path / 'r.json')!r})):
    try:
        read()
        print("read")
    except Exception as e:
        print(type(e).__name__, "|", e)
for fd in held:
    os.close(fd)
print("after", load_npy({str(tmp_path / 'a.npy')!r}).sum())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_subprocess_env(), cwd=ROOT,
                         timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4, out.stdout + out.stderr
    for line in lines[:3]:
        assert line.startswith("FileAccessError |") and "too many open files" in line and "ulimit -n" in line, line
        assert "damaged" not in line, line
    assert lines[3] == "after 45"


@pytest.mark.parametrize("error, words", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission is denied"),
    (OSError(errno.EIO, "Input/output error"), "input/output error"),
    (OSError(errno.ENFILE, "Too many open files in system"), "the system has too many open files"),
    (MemoryError(), "not enough memory"),
])
@pytest.mark.parametrize("when", ["open", "read"])
def test_read_failures_of_the_system_are_named(tmp_path, monkeypatch, error, words, when):
    from conceptevo.errors import DamagedFileError, FileAccessError

    save_npy(tmp_path / "a.npy", np.arange(10))
    (tmp_path / "r.json").write_text("{}")
    real_open = open

    class Failing:
        def __init__(self, f):
            self.f = f

        def read(self, *a):
            raise error

        readinto = read

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def failing_open(path, *args, **kwargs):
        if when == "open":
            raise error
        return Failing(real_open(path, *args, **kwargs))

    monkeypatch.setattr(cio, "open", failing_open, raising=False)
    for read in (lambda: load_npy(tmp_path / "a.npy"), lambda: cio.read_json(tmp_path / "r.json")):
        with pytest.raises(FileAccessError, match=words) as e:
            read()
        assert not isinstance(e.value, DamagedFileError) and "damaged" not in str(e.value)


def test_npy_headers_from_random_bytes_are_refused_cleanly(tmp_path):
    """Bytes changed at random in an array file: the loader either reads exactly what numpy reads, or raises a
    DamagedFileError; nothing else comes out (and numpy reading it means the loader may still refuse, never
    read something else)."""
    from conceptevo.errors import DamagedFileError

    rng = random.Random(5)
    base = []
    for name, a, version in _npy_cases()[::7]:
        p = tmp_path / "x.npy"
        _write_npy(p, a, version)
        base.append(p.read_bytes())
    read = refused = 0
    for trial in range(1500):
        data = bytearray(rng.choice(base))
        head = min(len(data), 128)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(head)
            data[i] = rng.choice([rng.randrange(256), ord(rng.choice("'\"(),:{} 0123456789TFLx<>|"))])
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data) + 1)]
        p = tmp_path / "m.npy"
        p.write_bytes(bytes(data))
        try:
            got = load_npy(p)
        except DamagedFileError:
            refused += 1
            continue
        read += 1
        want = np.load(p, allow_pickle=False)
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), trial
    assert read > 0 and refused > 0


# ------------------------------------------------------------------------------------------ lock


LOCK_WORKER = r"""
import json, os, sys, time
from conceptevo.errors import WorkspaceError
from conceptevo.workspace import WorkspaceLock
for line in sys.stdin:
    folder, at = line.split("\t")
    while time.time() < float(at):  # everybody starts at the same instant
        pass
    try:
        with WorkspaceLock(folder):
            got = time.monotonic()
            time.sleep(0.02)
            left = time.monotonic()
        print(json.dumps({"held": [got, left]}), flush=True)
    except WorkspaceError as e:
        print(json.dumps({"refused": str(e)}), flush=True)
"""


def test_lock_is_exclusive_when_processes_start_at_the_same_instant(tmp_path):
    """8 processes try to lock one workspace at the same instant, 60 times: with no lock file, a lock file naming
    a dead process, and an empty one. Never may two hold it at once (their holding intervals, measured inside
    the lock, must not overlap), and someone must get it."""
    procs = [subprocess.Popen([sys.executable, "-c", LOCK_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=_subprocess_env(), cwd=ROOT) for _ in range(8)]
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    try:
        overlaps, unclear, holders, refusals, nobody = [], [], 0, 0, 0
        for trial in range(60):
            folder = tmp_path / f"w{trial}"
            folder.mkdir()
            kind = trial % 3
            if kind == 1:
                (folder / ".lock").write_text(str(dead))  # stale: its process is gone
            elif kind == 2:
                (folder / ".lock").write_text("")  # what a process that died before writing its pid would leave
            at = time.time() + 0.2
            for p in procs:
                p.stdin.write(f"{folder}\t{at}\n")
                p.stdin.flush()
            answers = [json.loads(p.stdout.readline()) for p in procs]
            held = sorted(a["held"] for a in answers if "held" in a)
            nobody += not held
            holders += len(held)
            refused = [a["refused"] for a in answers if "refused" in a]
            refusals += len(refused)
            unclear += [r for r in refused if "is in use by" not in r]
            overlaps += [(trial, a, b) for a, b in zip(held, held[1:]) if b[0] < a[1]]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)
            p.stdout.close()
    print(f"\nlock: 60 trials x 8 processes started together: {holders} holds, {refusals} refusals, "
          f"{len(overlaps)} overlapping holds")
    assert overlaps == [], f"two processes held the lock at once: {overlaps[:3]}"
    assert unclear == [], unclear[:3]  # every refusal says who holds it
    assert nobody == 0, f"in {nobody} trials nobody got the lock"


# ------------------------------------------------------------------------------------------ permissions


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Atomic writes give files the mode open() would (0o666 less the umask): readable by others under 022,
    private under 077. (The static export is checked the same way in test_explorer.py.)"""
    from conceptevo.io import save_figure, write_json

    import matplotlib.pyplot as plt

    old = os.umask(umask)
    try:
        save_npy(tmp_path / "out" / "a.npy", np.arange(3))
        write_json(tmp_path / "out" / "sub" / "r.json", {"x": 1})
        fig = plt.figure()
        save_figure(fig, tmp_path / "out" / "f.png", formats=("png", "pdf"))
        plt.close(fig)
    finally:
        os.umask(old)
    paths = list((tmp_path / "out").rglob("*"))
    assert len([p for p in paths if p.is_file()]) == 4
    for p in paths:
        mode = p.stat().st_mode & 0o777
        assert mode == (file_mode if p.is_file() else dir_mode), (p.name, oct(mode))


# ------------------------------------------------------------------------------------------ safetensors


def test_safetensors_round_trip_and_damage(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    src = build_model("resnet_like", width=4)
    st.save_file(src.state_dict(), str(tmp_path / "c.safetensors"))
    dst = load_checkpoint(tmp_path / "c.safetensors", build_model("resnet_like", width=4))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    data = (tmp_path / "c.safetensors").read_bytes()
    for name, payload in (("half", data[: len(data) // 2]), ("header", data[:20]), ("empty", b""),
                          ("noise", np.random.default_rng(0).bytes(4096))):
        (tmp_path / f"{name}.safetensors").write_bytes(payload)
        with pytest.raises(CheckpointError, match=f"{name}.safetensors is corrupt or truncated"):
            load_checkpoint(tmp_path / f"{name}.safetensors", build_model("resnet_like", width=4))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "c.safetensors", build_model("vgg_like", width=4))


# ------------------------------------------------------------------------------------------ explorer load


def _connect(host, port, payload: bytes = b""):
    """A client socket that (optionally) sends the start of a request and then nothing more."""
    import socket

    sock = socket.create_connection((host, port), timeout=10)
    if payload:
        sock.sendall(payload)
    sock.setblocking(False)
    return sock


def _closed_by_server(sock) -> bool:
    """True once the server has closed the connection (end of stream or reset; a 408 answer first is fine)."""
    import socket

    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            if not data.startswith(b"HTTP/1.1 408"):
                raise AssertionError(f"a slow client got an answer: {data[:80]!r}")
    except BlockingIOError:
        return False
    except (ConnectionResetError, socket.timeout):
        return True


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="watches the server process through /proc")
def test_explorer_under_load_on_loopback(tmp_path_factory):
    """50 busy loopback clients for CONCEPTEVO_LOAD_SECONDS (default 10; the issue's figure is 30) while 600 idle
    sockets come and go, against a server whose open-file limit is 256: no error, every answer the expected
    status, a fixed thread count, connections held within the cap, no memory growth after the warm-up third."""
    import http.client
    import threading

    fabricated = pytest.importorskip("fabricated")
    from served import ServerProcess, open_file_limit

    seconds = float(os.environ.get("CONCEPTEVO_LOAD_SECONDS", "10"))
    clients, idle_before, idle_during = 50, 400, 200
    ws = fabricated.shared(tmp_path_factory)
    with open_file_limit(idle_before + idle_during + clients + 256), ServerProcess(ws.path, nofile=256) as server:
        host, port = server.host, server.port
        ids = ws.stimuli("vgg", "e1").neuron_ids
        targets = [("/", 200), ("/data/meta.js", 200), ("/api/info", 200),
                   ("/files/patches/vgg/e1/sheet-000.png", 200), ("/files/%2e%2e/manifest.json", 404),
                   ("/api/neuron?model=vgg&tag=e1&id=nope:1", 404), ("/api/nearest?model=vgg&tag=e1&k=0&id=x", 400)]
        for i in range(0, len(ids), max(1, len(ids) // 8)):
            targets += [(f"/api/neuron?model=vgg&tag=e1&id={ids[i]}", 200),
                        (f"/api/patches.png?model=vgg&tag=e1&id={ids[i]}", 200),
                        (f"/api/nearest?model=vgg&tag=e1&id={ids[i]}&k=5", 200)]
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/api/info")
        assert conn.getresponse().read() and conn.close() is None
        threads_idle = server.threads()  # the pool is up: from here on the count must not grow
        # idle sockets: some send nothing, some the start of a request; the server may hold only so many
        idle = [_connect(host, port, b"" if i % 2 else b"GET / HTTP/1.1\r\nHost: x") for i in range(idle_before)]
        errors: list[str] = []
        latencies: list[float] = []
        samples: list[tuple[float, int, int, int]] = []
        start = time.monotonic()
        stop = start + seconds

        def client(seed: int):
            rng = random.Random(seed)
            conn = None
            mine = []
            while time.monotonic() < stop:
                if conn is None or rng.random() < 0.1:  # mostly keep-alive, sometimes a fresh connection
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=30)
                path, want = rng.choice(targets)
                t = time.perf_counter()
                try:
                    conn.request("GET", path)
                    r = conn.getresponse()
                    r.read()
                    if r.status != want:
                        errors.append(f"{path}: {r.status}, expected {want}")
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    errors.append(f"{path}: {type(e).__name__}: {e}")
                    conn = None
                    continue
                mine.append(time.perf_counter() - t)
            if conn is not None:
                conn.close()
            latencies.extend(mine)

        def idler():  # more idle sockets keep arriving during the load
            for i in range(idle_during):
                if time.monotonic() >= stop:
                    break
                idle.append(_connect(host, port, b"" if i % 2 else b"GET /api/info HTTP/1.1\r\n"))
                time.sleep(seconds / 2 / idle_during)

        def sampler():
            while time.monotonic() < stop:
                samples.append((time.monotonic() - start, server.rss(), server.threads(), server.fds()))
                time.sleep(0.25)

        threads = ([threading.Thread(target=client, args=(i,)) for i in range(clients)]
                   + [threading.Thread(target=idler), threading.Thread(target=sampler)])
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 60)
        assert not any(t.is_alive() for t in threads)
        stats = server.stats()
        closed = sum(_closed_by_server(s) for s in idle)
        for s in idle:
            s.close()
    assert errors == [], errors[:5]
    warm = [rss for t, rss, _, _ in samples if t >= seconds / 3]
    growth = max(warm) - warm[0]
    most_threads = max(n for _, _, n, _ in samples)
    most_fds = max(n for _, _, _, n in samples)
    lat = np.sort(np.asarray(latencies))
    print(f"\nexplorer (open-file limit {server.nofile}, at most {server.max_connections} connections): {clients} clients "
          f"x {seconds:.0f} s with {len(idle)} idle sockets: {len(lat)} requests ({len(lat) / seconds:.0f}/s), 0 errors, "
          f"p50 {1000 * lat[len(lat) // 2]:.1f} ms, p99 {1000 * lat[int(len(lat) * 0.99)]:.1f} ms; server threads "
          f"{threads_idle} idle, at most {most_threads} under load; at most {stats['peak']} connections and {most_fds} "
          f"file descriptors open; {closed} idle sockets closed by the server; RSS {warm[0] / 2**20:.0f} -> "
          f"{warm[-1] / 2**20:.0f} MiB (max growth after warm-up {growth / 2**20:.1f} MiB)")
    assert len(lat) > clients
    assert most_threads <= threads_idle, "the server started threads under load"
    assert stats["peak"] <= server.max_connections and most_fds < server.nofile
    assert closed >= len(idle) - server.max_connections  # the ones past the cap were let go
    assert growth < 64 * 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="watches the server process through /proc")
def test_explorer_serves_a_client_among_a_thousand_slow_ones(tmp_path_factory):
    """1,000 clients each send the start of a request and then a byte every half second (slowloris): a normal
    client is still answered, the server's threads stay fixed, it holds at most its cap of connections, and
    every slow connection is closed once its header timeout has passed."""
    import http.client
    import threading

    fabricated = pytest.importorskip("fabricated")
    from served import ServerProcess, open_file_limit

    slow_clients, header_timeout = 1000, 3.0
    ws = fabricated.shared(tmp_path_factory)
    with open_file_limit(slow_clients + 512), ServerProcess(ws.path, nofile=512, header_timeout=header_timeout) as server:
        host, port = server.host, server.port

        def get(path):
            conn = http.client.HTTPConnection(host, port, timeout=30)
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                return r.status, r.read()
            finally:
                conn.close()

        assert get("/api/info")[0] == 200
        threads_idle = server.threads()
        slow = [_connect(host, port, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a") for _ in range(slow_clients)]
        done = threading.Event()
        threads_seen = []

        def trickle():  # one more byte from each slow client every half second, until told to stop
            while not done.wait(0.5):
                threads_seen.append(server.threads())
                for s in slow:
                    try:
                        s.send(b"a")
                    except OSError:
                        pass

        t = threading.Thread(target=trickle)
        t.start()
        try:
            answers = [get("/api/info")[0] for _ in range(20)] + [get("/data/meta.js")[0] for _ in range(5)]
        finally:
            done.set()
            t.join()
        stats = server.stats()
        deadline = time.monotonic() + header_timeout + 20
        while not all(_closed_by_server(s) for s in slow) and time.monotonic() < deadline:
            time.sleep(0.2)
        still_open = sum(not _closed_by_server(s) for s in slow)
        threads_seen.append(server.threads())
        for s in slow:
            s.close()
    print(f"\n{slow_clients} slow clients: the normal client got {answers.count(200)}/{len(answers)} answers; server "
          f"threads {threads_idle} idle, at most {max(threads_seen)} under attack; at most {stats['peak']} connections "
          f"held (cap {server.max_connections}, open-file limit {server.nofile}); {still_open} slow connections still "
          f"open {header_timeout + 20:.0f} s after the header timeout of {header_timeout:.0f} s began")
    assert answers == [200] * len(answers)
    assert max(threads_seen) <= threads_idle, "the server started threads for slow clients"
    assert stats["peak"] <= server.max_connections < slow_clients
    assert still_open == 0

