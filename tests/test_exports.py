"""Exports to other tools: TensorBoard's projector (files, served by TensorBoard, in a real browser) and
Weights & Biases (offline runs, read back from the run's own transaction log), and the monitor logging to W&B.

Both tools are optional: their tests skip cleanly when the package is not installed.
"""
from __future__ import annotations

import io
import json
import math
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fabricated
from conceptevo.errors import ConceptEvoError
from conceptevo.workspace import Workspace

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
from conftest import CHROMIUM, launch_chromium

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A private copy of the fabricated study (patches included) with an image embedding: 1 image in 3 has no vector."""
    src = fabricated.shared(tmp_path_factory).path
    dst = tmp_path_factory.mktemp("exports") / "study"
    shutil.copytree(src, dst)
    ws = Workspace(dst)
    from conceptevo.embedding import ImageEmbedding

    n = ws.manifest["data"]["num_images"]
    vec = np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32)
    vec[::3] = np.nan
    ImageEmbedding(vec, np.isfinite(vec[:, 0]), rmse=0.0).save(ws.path / "embedding" / "images")
    ws.finish("embedding/images", "exports-test", {}, rmse=0.0)
    return ws


def _expected_units(ws, model, tag):
    """Brute force, from the workspace's arrays and the dataset itself: ids, vectors, and the stimuli's class counts."""
    stim = ws.stimuli(model, tag)
    ds = ws.dataset("train")
    names = list(ds.classes)
    classes = []
    for row in np.asarray(stim.indices):
        counts = Counter(names[int(ds[int(i)][1])] for i in row if i >= 0)
        classes.append(counts)
    return list(stim.neuron_ids), np.asarray(ws.projection(model, tag).vectors), classes


def _top_text_matches(text: str, counts: Counter) -> bool:
    """'a 3, b 1' names the most frequent classes with their counts (any order among ties)."""
    parts = [p.rsplit(" ", 1) for p in text.split(", ")]
    got = {name: int(n) for name, n in parts}
    if any(counts[name] != n for name, n in got.items()):
        return False
    shown_min = min(got.values())
    return len(got) == min(3, len(counts)) and all(n <= shown_min for name, n in counts.items() if name not in got)


def test_stimulus_labels_from_the_patch_store_or_the_dataset(study, tmp_path):
    from conceptevo.exports.units import StimulusLabels, class_summary
    from conceptevo.patches import PatchStore

    copy = tmp_path / "study"
    shutil.copytree(study.path, copy)
    bare = Workspace(copy)
    bare.invalidate("patches/images")  # no stored stimulus images: labels come from the dataset
    ds = study.dataset("train")
    idx = np.array([[0, 5, -1], [len(ds) - 1, len(ds), 7]])
    want = np.array([[int(ds[0][1]), int(ds[5][1]), -1], [int(ds[len(ds) - 1][1]), -1, int(ds[7][1])]])
    for ws in (study, bare):
        labels = StimulusLabels(ws, PatchStore(ws))
        np.testing.assert_array_equal(labels.labels(idx), want)
        assert labels.classes == list(ds.classes)
    first, text = class_summary(np.array([[2, 1, 2, -1], [-1, -1, -1, -1], [3, 1, 1, 3]]), labels)
    names = ds.classes
    assert first == [names[2], "", names[1]]  # ties: the lower label first
    assert text == [f"{names[2]} 2, {names[1]} 1", "", f"{names[1]} 2, {names[3]} 2"]


# ================================================================================ TensorBoard: files
def _read_config(out):
    pytest.importorskip("tensorboard")
    from google.protobuf import text_format
    from tensorboard.plugins.projector import ProjectorConfig

    config = ProjectorConfig()
    text_format.Parse((Path(out) / "projector_config.pbtxt").read_text(), config)
    return {e.tensor_name: e for e in config.embeddings}


def _metadata(path):
    lines = Path(path).read_text().rstrip("\n").split("\n")
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def _tile(sprite: np.ndarray, i: int, n: int, tile: int) -> np.ndarray:
    cols = math.ceil(math.sqrt(n))
    y, x = divmod(i, cols)
    return sprite[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile]


@pytest.fixture(scope="module")
def tb_export(study, tmp_path_factory):
    pytest.importorskip("tensorboard")
    from conceptevo.exports import export_tensorboard

    out = tmp_path_factory.mktemp("tb") / "logdir"
    export_tensorboard(study, out)
    return out


def test_tensorboard_export_lists_every_checkpoint_all_and_images(study, tb_export):
    emb = _read_config(tb_export)
    per_ck = [f"units: {m} {t}" for m in study.models for t in study.tags(m)]
    assert list(emb) == per_ck + ["units: all checkpoints", "images"]
    total = 0
    for m in study.models:
        for t in study.tags(m):
            e = emb[f"units: {m} {t}"]
            ids, vectors, classes = _expected_units(study, m, t)
            assert list(e.tensor_shape) == [len(ids), vectors.shape[1]]
            got = np.loadtxt(tb_export / e.tensor_path, delimiter="\t", dtype=np.float64, ndmin=2)
            np.testing.assert_allclose(got, vectors, rtol=1e-6, atol=1e-6)
            rows = _metadata(tb_export / e.metadata_path)
            assert [r["unit"] for r in rows] == ids
            assert {r["model"] for r in rows} == {m} and {r["checkpoint"] for r in rows} == {t}
            epoch = next(c.epoch for c in study.checkpoints(m) if c.tag == t)
            assert {float(r["epoch"]) for r in rows} == {epoch}
            assert [f"{r['layer']}:{r['channel']}" for r in rows] == ids
            for r, counts in zip(rows, classes):
                assert _top_text_matches(r["top_classes"], counts), (r, counts)
                assert counts[r["top_class"]] == max(counts.values())
            total += len(ids)
    assert list(emb["units: all checkpoints"].tensor_shape)[0] == total
    n_img = study.manifest["data"]["num_images"]
    img = emb["images"]
    has = np.flatnonzero(~np.isnan(study.image_embedding().vectors).any(1))
    assert list(img.tensor_shape) == [len(has), 5] and len(has) < n_img
    rows = _metadata(tb_export / img.metadata_path)
    ds = study.dataset("train")
    assert [int(r["image"]) for r in rows] == has.tolist()
    assert [r["class"] for r in rows] == [ds.classes[int(ds[int(i)][1])] for i in has]


def test_tensorboard_sprites_hold_each_units_top_patch(study, tb_export):
    from conceptevo.patches import PatchStore, to_uint8_image

    emb = _read_config(tb_export)
    store = PatchStore(study)
    e = emb["units: vgg e1"]
    n = e.tensor_shape[0]
    tile = e.sprite.single_image_dim[0]
    assert tile == store.geometry("vgg", "e1").cell  # a few points: tiles at the patch size
    sprite = np.asarray(Image.open(tb_export / e.sprite.image_path).convert("RGB"))
    cols = math.ceil(math.sqrt(n))
    assert sprite.shape[1] == cols * tile and sprite.shape[0] == math.ceil(n / cols) * tile
    for i in (0, 7, n - 1):
        patch = store.patches("vgg", "e1", i)[0]
        np.testing.assert_array_equal(_tile(sprite, i, n, tile), np.broadcast_to(patch, patch.shape[:2] + (3,)))
    # images: their own pixels, at the image size
    e = emb["images"]
    n, tile = e.tensor_shape[0], e.sprite.single_image_dim[0]
    sprite = np.asarray(Image.open(tb_export / e.sprite.image_path).convert("RGB"))
    ds = study.dataset("train")
    rows = _metadata(tb_export / e.metadata_path)
    for i in (0, n // 2, n - 1):
        img = to_uint8_image(ds[int(rows[i]["image"])][0])
        assert img.shape[0] == tile
        np.testing.assert_array_equal(_tile(sprite, i, n, tile), img)


def test_sprite_tile_fits_tensorboards_limit():
    from conceptevo.exports.projector import MAX_POINTS, SPRITE_MAX, sprite_tile

    for n in [1, 2, 5, 17, 1000, 4225, 4226, 30000, MAX_POINTS]:
        for cell in (16, 32, 64):
            tile = sprite_tile(n, cell)
            cols = math.ceil(math.sqrt(n))
            assert 1 <= tile <= cell and cols * tile <= SPRITE_MAX
            assert tile == cell or cols * (tile + 1) > SPRITE_MAX  # the largest tile that fits
    assert sprite_tile(MAX_POINTS, 64) == 25
    with pytest.raises(ConceptEvoError, match="at least one"):
        sprite_tile(0, 32)


def test_tensorboard_caps_points_with_one_consistent_sample(study, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from conceptevo.exports import export_tensorboard, projector
    from conceptevo.patches import PatchStore

    monkeypatch.setattr(projector, "MAX_POINTS", 50)
    out = tmp_path / "tb"
    export_tensorboard(study, out, images=False)
    emb = _read_config(out)
    assert "images" not in emb
    e = emb["units: all checkpoints"]
    assert list(e.tensor_shape) == [50, 8]
    vec = np.loadtxt(out / e.tensor_path, delimiter="\t")
    rows = _metadata(out / e.metadata_path)
    sprite = np.asarray(Image.open(out / e.sprite.image_path).convert("RGB"))
    tile = e.sprite.single_image_dim[0]
    store = PatchStore(study)
    for i, r in enumerate(rows):  # row i of the tensor, the metadata and the sprite is one unit
        ids = list(study.stimuli(r["model"], r["checkpoint"]).neuron_ids)
        j = ids.index(r["unit"])
        np.testing.assert_allclose(vec[i], study.projection(r["model"], r["checkpoint"]).vectors[j], rtol=1e-6, atol=1e-6)
        patch = store.patches(r["model"], r["checkpoint"], j)[0]
        np.testing.assert_array_equal(_tile(sprite, i, 50, tile), np.broadcast_to(patch, patch.shape[:2] + (3,)))


def test_tensorboard_blank_tiles_without_patches(study, tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from conceptevo.exports import export_tensorboard
    from conceptevo.exports.projector import BLANK
    from conceptevo.patches import PatchStore

    copy = tmp_path / "study"
    shutil.copytree(study.path, copy)
    ws = Workspace(copy)
    ws.invalidate("patches/resnet/e2")
    with caplog.at_level("WARNING"):
        export_tensorboard(ws, tmp_path / "tb", images=False)
    assert "no example patches for 1 checkpoint(s) (resnet e2)" in caplog.text
    emb = _read_config(tmp_path / "tb")
    assert not emb["units: resnet e2"].HasField("sprite")  # no picture at all: dots, not grey squares
    assert emb["units: resnet e1"].HasField("sprite")
    e = emb["units: all checkpoints"]  # some with pictures: grey tiles for those without
    n, tile = e.tensor_shape[0], e.sprite.single_image_dim[0]
    sprite = np.asarray(Image.open(tmp_path / "tb" / e.sprite.image_path).convert("RGB"))
    rows = _metadata(tmp_path / "tb" / e.metadata_path)
    store = PatchStore(study)
    for i, r in enumerate(rows):
        if (r["model"], r["checkpoint"]) == ("resnet", "e2"):
            assert (_tile(sprite, i, n, tile) == BLANK).all()
        elif i % 50 == 0:
            j = list(study.stimuli(r["model"], r["checkpoint"]).neuron_ids).index(r["unit"])
            patch = store.patches(r["model"], r["checkpoint"], j)[0]
            np.testing.assert_array_equal(_tile(sprite, i, n, tile), np.broadcast_to(patch, patch.shape[:2] + (3,)))


def test_tensorboard_export_folder_rules(study, tb_export, tmp_path):
    pytest.importorskip("tensorboard")
    from conceptevo.exports import export_tensorboard

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ConceptEvoError, match="not empty and not a previous conceptevo TensorBoard export"):
        export_tensorboard(study, tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConceptEvoError, match="is not a folder"):
        export_tensorboard(study, tmp_path / "file")
    with pytest.raises(ConceptEvoError, match="contains the workspace"):
        export_tensorboard(study, study.path.parent)
    # a previous export is replaced: a file it no longer writes is gone
    again = tmp_path / "again"
    shutil.copytree(tb_export, again)
    (again / "units" / "stale.tsv").write_text("old")
    export_tensorboard(study, again, images=False)
    assert not (again / "units" / "stale.tsv").exists() and not (again / "images").exists()
    assert "images" not in _read_config(again)


def test_exports_need_their_packages(study, tmp_path, monkeypatch):
    from conceptevo.exports import export_tensorboard, export_wandb

    monkeypatch.setitem(sys.modules, "tensorboard.plugins.projector", None)
    with pytest.raises(ConceptEvoError, match=r"pip install 'conceptevo\[tensorboard\]'"):
        export_tensorboard(study, tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConceptEvoError, match=r"pip install 'conceptevo\[wandb\]'"):
        export_wandb(study, tmp_path / "wb")
    assert not (tmp_path / "wb").exists()


# ================================================================================ TensorBoard: served and in a browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@pytest.fixture(scope="module")
def tensorboard_server(tb_export, tmp_path_factory):
    """`tensorboard --logdir EXPORT --host 127.0.0.1 --port FREE`, as a user would start it (offline here)."""
    pytest.importorskip("tensorboard")
    port = _free_port()
    logf = tmp_path_factory.mktemp("tb-log") / "tensorboard.log"
    with open(logf, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tb_export), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if json.loads(_get(f"{base}/data/plugins_listing"))["projector"]:
                    # the projector decides it is active in a background thread: wait until it lists a run
                    if json.loads(_get(f"{base}/data/plugin/projector/runs")):
                        break
            except (OSError, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"TensorBoard did not come up:\n{logf.read_text()[-3000:]}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_tensorboard_serves_the_projector_data(study, tb_export, tensorboard_server):
    base = tensorboard_server
    assert json.loads(_get(f"{base}/data/plugin/projector/runs")) == ["."]
    info = json.loads(_get(f"{base}/data/plugin/projector/info?run=."))
    names = [e["tensorName"] for e in info["embeddings"]]
    assert set(names) == set(_read_config(tb_export)) and len(names) == 2 * 3 + 2
    q = "run=.&name=" + urllib.parse.quote("units: resnet e1")
    raw = _get(f"{base}/data/plugin/projector/tensor?{q}&num_rows=100000")
    ids, vectors, _ = _expected_units(study, "resnet", "e1")
    np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4").reshape(vectors.shape), vectors, rtol=1e-6, atol=1e-6)
    meta = _get(f"{base}/data/plugin/projector/metadata?{q}&num_rows=100000").decode()
    assert [line.split("\t")[0] for line in meta.rstrip("\n").split("\n")[1:]] == ids
    png = _get(f"{base}/data/plugin/projector/sprite_image?{q}")
    assert Image.open(io.BytesIO(png)).size[0] == math.ceil(math.sqrt(len(ids))) * _read_config(tb_export)["units: resnet e1"].sprite.single_image_dim[0]


_DEEP_TEXT = """() => { let out = ''; const walk = (n) => { if (!n) return; if (n.nodeType === 3) out += n.textContent + ' ';
  if (n.shadowRoot) walk(n.shadowRoot); for (const c of (n.childNodes || [])) walk(c); }; walk(document.body);
  return out.replace(/\\s+/g, ' '); }"""


def _wait_text(page, frame, pattern, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, frame.evaluate(_DEEP_TEXT))
        if m:
            return m
        page.wait_for_timeout(250)  # (the sync API handles the page's events only inside its own calls)
    raise AssertionError(f"{pattern!r} never appeared; the projector shows: {frame.evaluate(_DEEP_TEXT)[:1500]}")


@pytest.mark.slow
def test_tensorboard_projector_in_a_browser(study, tb_export, tensorboard_server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors, outside = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # no network: anything that is not the local TensorBoard fails the test
            page.route(re.compile(r"^(?!http://127\.0\.0\.1|data:|blob:).*"),
                       lambda route: (outside.append(route.request.url), route.abort()))
            page.goto(f"{tensorboard_server}/#projector", wait_until="load")
            frame = None
            deadline = time.monotonic() + 60
            while frame is None and time.monotonic() < deadline:
                frame = next((f for f in page.frames if "projector_binary.html" in f.url), None)
                page.wait_for_timeout(250)
            assert frame is not None, "the projector plugin never loaded"
            m = _wait_text(page, frame, r"(\d+) tensors found.*?Points: ([1-9]\d*) Dimension: (\d+)")
            assert int(m.group(1)) == 8
            # its first (alphabetically) embedding: all checkpoints together
            total = sum(len(study.stimuli(mm, t)) for mm in study.models for t in study.tags(mm))
            assert (int(m.group(2)), int(m.group(3))) == (total, 8)
            # the metadata loaded: colouring by model / checkpoint is offered, with the number of colours
            text = frame.evaluate(_DEEP_TEXT)
            assert "model 2 colors" in text and f"checkpoint {len(study.tags('vgg'))} colors" in text, text[:2000]
            assert "top_classes" in text
            frame.locator("paper-dropdown-menu", has_text="tensors found").first.click()
            frame.locator("paper-item", has_text="units: vgg e1").first.click()
            _wait_text(page, frame, rf"Points: {len(study.stimuli('vgg', 'e1'))} Dimension: 8")
            page.wait_for_timeout(1500)  # let the sprites render before the picture
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "tensorboard-projector.png"))
            assert not errors, errors
            assert not outside, outside
        finally:
            browser.close()


# ================================================================================ Weights & Biases
def _wandb_records(path):
    """The records of a W&B transaction log (``run-ID.wandb``), as wandb's own protobuf ``Record`` messages.

    wandb >= 0.2x reads these files only in its Go core, so the framing (LevelDB's log format: 32 KiB blocks,
    records of CRC-32, length, type and payload, split across blocks) is read here; every checksum is verified.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    out = []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if crc == n == kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at byte {pos}"
        pos += 7 + n
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


class OfflineRun:
    """What an offline run folder holds: config, history rows, final summary, logged tables (with their images)."""

    def __init__(self, folder):
        folder = Path(folder)
        (log,) = folder.glob("run-*.wandb")
        # wandb's core process may still be appending the last records just after run.finish() returns; a record
        # read half-written fails its checksum: read again until the exit record is there (every checksum is still
        # verified on the read that is kept, and a bad one that persists past the deadline fails the test)
        deadline = time.monotonic() + 30
        while True:
            try:
                records = _wandb_records(log)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.config, self.history, self.summary, self.metrics = {}, [], {}, []
        self.artifacts = {}
        self.exit_code = None
        for rec in records:
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                self.config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
            elif kind == "history":
                self.history.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
            elif kind == "summary":
                for u in rec.summary.update:
                    key = u.key or "/".join(u.nested_key)
                    self.summary[key] = json.loads(u.value_json)
            elif kind == "metric":
                self.metrics.append(rec.metric)
            elif kind == "artifact":
                files = {c.path: c.local_path for c in rec.artifact.manifest.contents}
                self.artifacts[rec.artifact.client_id] = files
                self.artifacts[rec.artifact.sequence_client_id] = files
            elif kind == "exit":
                self.exit_code = rec.exit.exit_code

    def rows(self, key):
        return [h for h in self.history if key in h]

    def table(self, key):
        """(columns, rows) of table ``key``, image cells decoded to uint8 arrays, from the run's table artifact."""
        ref = self.summary[f"{key}/artifact_path"]
        client_id, _, path = ref[len("wandb-client-artifact://"):].partition("/")
        files = self.artifacts[client_id]
        table = json.loads(Path(files[path]).read_text())
        rows = []
        for row in table["data"]:
            cells = []
            for v in row:
                if isinstance(v, dict) and v.get("_type") == "image-file":
                    v = np.asarray(Image.open(files[v["path"]]))
                cells.append(v)
            rows.append(cells)
        return table["columns"], rows


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb with every folder under tmp_path and no way to reach a server."""
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    return wandb


@pytest.fixture(scope="module")
def diagnosis(study):
    from conceptevo.diagnostics import diagnose

    return diagnose(study, write=False)


def test_wandb_export_offline_run_read_back(study, diagnosis, offline_wandb, tmp_path):
    from conceptevo.exports import export_wandb
    from conceptevo.patches import PatchStore

    folder = export_wandb(study, tmp_path / "wb", project="p", name="fabricated")
    assert folder.parent == tmp_path / "wb" / "wandb" and folder.name.startswith("offline-run-")
    run = OfflineRun(folder)
    assert run.exit_code == 0
    assert run.config["workspace"] == "study" and run.config["models"]["vgg"]["checkpoints"] == study.tags("vgg")
    store = PatchStore(study)
    for m in study.models:
        prev = None
        for t in study.tags(m):
            cols, rows = run.table(f"units/{m}/{t}")
            ids, vectors, classes = _expected_units(study, m, t)
            assert cols[:6] == ["unit", "model", "checkpoint", "epoch", "layer", "channel"]
            assert [r[0] for r in rows] == ids
            c = {name: j for j, name in enumerate(cols)}
            xy = study.layout(m, t)
            np.testing.assert_allclose([[r[c["x"]], r[c["y"]]] for r in rows], xy, rtol=1e-6)
            np.testing.assert_allclose([r[c["vector"]] for r in rows], vectors, rtol=1e-6)
            if prev is None:
                assert all(r[c["moved"]] is None for r in rows)
            else:
                np.testing.assert_allclose([r[c["moved"]] for r in rows], np.linalg.norm(vectors - prev, axis=1), rtol=1e-5)
            prev = vectors
            for r, counts in zip(rows, classes):
                assert _top_text_matches(r[c["top_classes"]], counts)
            for i in (0, len(rows) - 1):
                patch = store.patches(m, t, i)[0]
                got = rows[i][c["patch"]]
                got = got[..., None] if got.ndim == 2 else got
                np.testing.assert_array_equal(got[..., :patch.shape[-1]], patch)
    # the diagnostics: curves against the model's epoch, and the same numbers as a table
    for m, cks in diagnosis.checkpoints.items():
        got = run.rows(f"{m}/diversity/all")
        assert [h[f"{m}/epoch"] for h in got] == [c.epoch for c in cks]
        np.testing.assert_allclose([h[f"{m}/diversity/all"] for h in got], [c.diversity["all"] for c in cks], rtol=1e-9)
        moved = [h.get(f"{m}/moved/all") for h in got]
        assert moved[0] is None
        np.testing.assert_allclose(moved[1:], [c.moved["all"] for c in cks[1:]], rtol=1e-9)
        layer = cks[0].layers[0]
        np.testing.assert_allclose([h[f"{m}/collapse/{layer}"] for h in got], [c.collapse[layer] for c in cks], rtol=1e-9)
        assert any(x.glob_name == f"{m}/*" and x.step_metric == f"{m}/epoch" for x in run.metrics)
    cols, rows = run.table("diagnostics")
    assert len(rows) == sum(len(c.diversity) for cks in diagnosis.checkpoints.values() for c in cks)
    c = {name: j for j, name in enumerate(cols)}
    r = next(r for r in rows if r[c["model"]] == "resnet" and r[c["checkpoint"]] == "e2" and r[c["layer"]] == "all")
    want = diagnosis.checkpoints["resnet"][2]
    assert r[c["diversity"]] == pytest.approx(want.diversity["all"]) and r[c["moved"]] == pytest.approx(want.moved["all"])


def test_wandb_export_into_an_open_run(study, offline_wandb, tmp_path):
    from conceptevo.exports import export_wandb

    # create_new: a new run even when another test (or a README block) left one open, which wandb's
    # default would hand back here instead
    run = offline_wandb.init(project="mine", dir=str(tmp_path), reinit="create_new",
                             settings=offline_wandb.Settings(mode="offline", silent=True, x_disable_stats=True))
    with pytest.raises(ConceptEvoError, match="not both"):
        export_wandb(study, tmp_path / "elsewhere", run=run)
    folder = export_wandb(study, run=run, images=False, diagnostics=False)
    run.log({"after": 1.0})  # still open: the caller's run
    run.finish()
    back = OfflineRun(folder)
    cols, rows = back.table("units/vgg/e0.5")
    assert len(rows) == len(study.stimuli("vgg", "e0.5")) and all(r[cols.index("patch")] is None for r in rows)
    assert back.rows("after") and not back.rows("vgg/diversity/all")


# ================================================================================ the monitor, logging to W&B
def _monitor(study, run):
    from conceptevo.diagnostics import monitor_from_workspace

    return monitor_from_workspace(study.path, probe_size=100, k=5, wandb_run=run)


def _model(seed=0):
    from conceptevo.models import build_model

    torch.manual_seed(seed)
    return build_model("vgg_like", in_channels=3, num_classes=10, width=4)


def test_monitor_logs_each_check_to_a_wandb_run(study, offline_wandb, tmp_path):
    run = offline_wandb.init(project="m", dir=str(tmp_path), settings=offline_wandb.Settings(mode="offline", silent=True,
                                                                                             x_disable_stats=True))
    mon = _monitor(study, run)
    model = _model()
    mon.check(model, epoch=1, step=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    mon.check(model, epoch=2, step=20)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    mon.check(model, epoch=3, step=30)
    run.finish()
    back = OfflineRun(Path(run.settings.sync_dir))
    rows = back.rows("concept_monitor/check")
    assert [r["concept_monitor/check"] for r in rows] == [0, 1, 2]
    assert [r["concept_monitor/epoch"] for r in rows] == [1.0, 2.0, 3.0] and [r["concept_monitor/step"] for r in rows] == [10, 20, 30]
    for r, rec in zip(rows, mon.records):
        assert r["concept_monitor/finite"] == int(rec.finite)
        for layer, v in rec.diversity.items():
            assert r[f"concept_monitor/diversity/{layer}"] == pytest.approx(v)
        for layer, v in rec.collapse.items():
            assert r[f"concept_monitor/collapse/{layer}"] == pytest.approx(v)
        assert r.get("concept_monitor/probe_top1") == (None if rec.probe_top1 is None else pytest.approx(rec.probe_top1))
    assert rows[1]["concept_monitor/moved/all"] == pytest.approx(mon.records[1].moved["all"])
    assert "concept_monitor/moved/all" not in rows[0]
    assert rows[2]["concept_monitor/warnings"] == len(mon.warnings) >= 1
    assert back.summary["concept_monitor/warning_messages"] == [w.message for w in mon.warnings]
    assert any(x.glob_name == "concept_monitor/*" and x.step_metric == "concept_monitor/check" for x in back.metrics)
    with pytest.raises(ConceptEvoError, match="wandb_run must be a Weights & Biases run"):
        _monitor(study, run=object())


@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:The '?train_dataloader'? does not have many workers")
def test_monitor_lightning_callback_logs_to_wandb(study, offline_wandb, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    ds = study.dataset("train")
    x = torch.stack([ds[i][0] for i in range(64)])
    y = torch.tensor([int(ds[i][1]) for i in range(64)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model(1)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    run = offline_wandb.init(project="l", dir=str(tmp_path), settings=offline_wandb.Settings(mode="offline", silent=True,
                                                                                             x_disable_stats=True))
    mon = _monitor(study, run)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[mon.as_lightning_callback()])
    trainer.fit(Module(), loader)
    run.finish()
    rows = OfflineRun(Path(run.settings.sync_dir)).rows("concept_monitor/check")
    assert [r["concept_monitor/epoch"] for r in rows] == [1.0, 2.0] == [r.epoch for r in mon.records]
    assert [r["concept_monitor/diversity/all"] for r in rows] == pytest.approx([r.diversity["all"] for r in mon.records])


# ================================================================================ the command
def test_cli_export_tensorboard_and_wandb(study, offline_wandb, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from conceptevo.cli import main

    rc = main(["export", str(study.path), "--tensorboard", str(tmp_path / "tb"), "--wandb", "--wandb-dir", str(tmp_path / "wb"),
               "--wandb-project", "cli", "--wandb-name", "cli-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in out and "wandb sync " in out
    assert (tmp_path / "tb" / "projector_config.pbtxt").exists()
    (folder,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert OfflineRun(folder).rows("units/vgg/e2/nrows")
    assert main(["export", str(study.path), "--wandb-dir", str(tmp_path / "x")]) == 2
    assert "go with --wandb" in capsys.readouterr().err
