"""Property-based fuzzing of everything that reads user files.

The config parser (random tables and random text), IDX headers, image files in
a folder and the workspace reader (manifest and arrays, random, truncated or
mutated) either work or raise the project's own ConceptEvoError with a
one-line message, never an exception from deep inside. The raw IDX reader's
byte fuzzing is in test_data.py.
"""
from __future__ import annotations

import copy
import io
import json
import shutil
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conceptevo.config import StudyConfig, load_config
from conceptevo.data import ImageFolderDataset, open_dataset
from conceptevo.embedding import ImageEmbedding, NeuronEmbedding
from conceptevo.errors import ConceptEvoError
from conceptevo.io import save_npy
from conceptevo.layers import LayerInfo
from conceptevo.stimuli import Stimuli
from conceptevo.workspace import Workspace

def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def only_our_errors(fn, *args, **kwargs):
    """Call ``fn``; a ConceptEvoError (one line) is fine, anything else fails the test. Returns the result or the error."""
    try:
        return fn(*args, **kwargs)
    except ConceptEvoError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        return e


# ------------------------------------------------------------------------------------------ config

GOOD = """
[study]
out = "study"
[data]
kind = "synthetic"
pool = 500
options = { n = 300, size = 28 }
[[models]]
name = "a"
arch = "vgg_like"
checkpoints = "runs/a"
options = { width = 4 }
[base]
checkpoint = "last"
[stimuli]
k = 5
layers = ["features.*"]
[embedding]
dim = 8
lr = 0.05
[images]
top_responses = 10
[layout]
n_neighbors = 10
min_dist = 0.1
"""
GOOD_DICT = tomllib.loads(GOOD)

scalars = st.one_of(
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.text(max_size=12),
    st.dates(), st.datetimes(), st.times(),
)
toml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
known_keys = sorted({k for sec in GOOD_DICT.values() for row in (sec if isinstance(sec, list) else [sec])
                     for k in row} | set(GOOD_DICT))


@fuzz(300)
@given(st.dictionaries(st.one_of(st.sampled_from(known_keys), st.text(max_size=8)), toml_values, max_size=5))
def test_random_config_tables(d):
    only_our_errors(StudyConfig.from_dict, d)


@fuzz(400)
@given(st.lists(st.tuples(st.sampled_from(sorted(GOOD_DICT)), st.one_of(st.sampled_from(known_keys), st.text(max_size=6)),
                          st.one_of(st.none(), toml_values)), min_size=1, max_size=4))
def test_mutated_good_config(tmp_path, edits):
    """The good config with a few keys replaced by random values (None: deleted): accepted only when well-typed."""
    d = copy.deepcopy(GOOD_DICT)
    for section, key, value in edits:
        table = d[section][0] if isinstance(d[section], list) else d[section]
        if not isinstance(table, dict):
            continue
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    out = only_our_errors(StudyConfig.from_dict, d, root=tmp_path)
    if isinstance(out, StudyConfig):
        json.dumps(out.to_dict())  # what the workspace records
        e = out.embedding
        assert isinstance(e.dim, int) and e.dim > 0 and isinstance(e.lr, (int, float)) and np.isfinite(e.lr) and e.lr > 0
        assert isinstance(out.stimuli.k, int) and out.stimuli.k > 0
        assert all(isinstance(m.name, str) and isinstance(m.options, dict) for m in out.models)


@fuzz(200)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_random_config_text(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    only_our_errors(load_config, p)


@fuzz(200)
@given(st.integers(min_value=0, max_value=len(GOOD)), st.binary(max_size=8))
def test_truncated_or_spliced_config_file(tmp_path, cut, noise):
    p = tmp_path / "c.toml"
    p.write_bytes(GOOD.encode()[:cut] + noise + GOOD.encode()[cut:][: len(noise)])
    only_our_errors(load_config, p)


# ------------------------------------------------------------------------------------------ IDX headers


@fuzz(150)
# found by the fuzzer: zero images of 2097152^3 pixels need no bytes, but numpy cannot shape such an array
@example(code=8, ndim=4, dims=[0, 2097152, 2097152, 2097152], payload=0, label_ndim=0, labels_n=0)
@given(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0xFF]), st.integers(0, 4),
       st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 40), min_size=4, max_size=4),
       st.integers(0, 4000), st.integers(0, 3), st.integers(0, 60))
def test_idx_dataset_headers(tmp_path, code, ndim, dims, payload, label_ndim, labels_n):
    """An IDX image file with a random header (type, rank, sizes, payload length) next to a labels file."""
    img = bytes([0, 0, code, ndim]) + np.asarray(dims[:ndim], dtype=">u4").tobytes() + bytes(payload)
    lab = bytes([0, 0, 0x08, label_ndim]) + np.asarray([labels_n] * label_ndim, dtype=">u4").tobytes() + bytes(labels_n)
    (tmp_path / "i").write_bytes(img)
    (tmp_path / "l").write_bytes(lab)
    ds = only_our_errors(open_dataset, "idx", images=str(tmp_path / "i"), labels=str(tmp_path / "l"))
    if not isinstance(ds, ConceptEvoError):
        for i in {0, len(ds) - 1}:
            only_our_errors(lambda: ds[i])


# ------------------------------------------------------------------------------------------ image files


def _encoded(fmt: str, mode: str = "RGB", size=(9, 7)) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


VALID = {f: _encoded(f) for f in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for c in ("a", "b"):
        (root / c).mkdir()
        for k in range(3):
            (root / c / f"{k}.png").write_bytes(VALID["PNG"])
    return root


image_bytes = st.one_of(
    st.binary(max_size=400),
    st.tuples(st.sampled_from(sorted(VALID)), st.integers(0, 2000), st.binary(max_size=16), st.integers(0, 2000)).map(
        lambda t: VALID[t[0]][: t[1]] + t[2] + VALID[t[0]][t[1] + len(t[2]):][: t[3]]),
    st.tuples(st.sampled_from(sorted(VALID)), st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), max_size=6)).map(
        lambda t: bytes(_flip(VALID[t[0]], t[1]))),
)


def _flip(data: bytes, edits) -> bytearray:
    out = bytearray(data)
    for pos, val in edits if out else ():
        out[pos % len(out)] = val
    return out


@fuzz(300)
@given(image_bytes, st.sampled_from(["zz.png", "zz.jpg", "zz.gif", "0.png"]), st.booleans())
def test_image_files_in_a_folder(image_root, data, name, alone):
    """A random, truncated or bit-flipped image among good ones (or alone in its class): DatasetError or it reads."""
    work = Path(tempfile.mkdtemp(dir=image_root.parent))
    try:
        root = work / "root"
        shutil.copytree(image_root, root)
        folder = root / ("c" if alone else "a")
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        for skip in (False, True):
            ds = only_our_errors(ImageFolderDataset, root, skip_corrupt=skip)
            if isinstance(ds, ConceptEvoError):
                continue
            for i in range(len(ds)):
                item = only_our_errors(lambda: ds[i])
                if not isinstance(item, ConceptEvoError):
                    assert tuple(item[0].shape) == ds.image_shape
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ workspace reader


def _make_workspace(path: Path) -> None:
    """A small complete workspace written through the library's own savers (no model run needed)."""
    rng = np.random.default_rng(0)
    ws = Workspace(path, create=True)
    ws.set_config({"data": {"kind": "synthetic", "path": None, "pool": 20, "seed": 0, "options": {"n": 20, "size": 8}}})
    layers = [LayerInfo("conv0", 3, (4, 4)), LayerInfo("conv1", 3, (2, 2))]
    ids = [f"{layer.name}:{c}" for layer in layers for c in range(layer.channels)]
    rows = []
    for tag in ("e1", "e2"):
        idx = np.stack([rng.choice(20, 4, replace=False) for _ in ids])
        stim = Stimuli(ids, idx, rng.random(idx.shape).astype(np.float32), rng.integers(0, 4, idx.shape), layers=layers,
                       num_images=20, mean=np.zeros(len(ids), np.float32), std=np.ones(len(ids), np.float32))
        stim.save(ws.stimuli_dir("m", tag))
        ws.finish(f"stimuli/m/{tag}", f"s{tag}")
        save_npy(ws.projection_path("m", tag), rng.normal(size=(len(ids), 3)).astype(np.float32))
        ws.finish(f"projection/m/{tag}", f"p{tag}")
        save_npy(ws.layout_path("m", tag), rng.normal(size=(len(ids), 2)).astype(np.float32))
        rows.append({"tag": tag, "path": f"/nowhere/{tag}.pt", "epoch": 1.0, "step": None, "metrics": {"train_top1": 0.5}})
    ws.finish("layout", "l")
    ws.manifest["models"] = {"m": {"arch": "vgg_like", "options": {}, "checkpoints": rows}}
    ws.manifest["base"] = {"model": "m", "tag": "e2"}
    NeuronEmbedding(ids, rng.normal(size=(len(ids), 3))).save(path / "embedding" / "neurons")
    ws.finish("embedding/neurons", "n")
    ImageEmbedding(rng.normal(size=(20, 3)), np.ones(20, bool), 0.1).save(path / "embedding" / "images")
    ws.finish("embedding/images", "i", rmse=0.1)


def read_everything(path: Path) -> None:
    """Every reader a user or the explorer goes through."""
    ws = Workspace(path)
    ws.summary()
    ws.base
    ws.neuron_embedding().vectors.sum()
    ws.image_embedding().vectors.sum()
    for m in ws.models:
        for t in ws.tags(m):
            s = ws.stimuli(m, t)
            np.asarray(s.indices).sum(), np.asarray(s.values).sum()
            ws.projection(m, t).vectors.sum()
            ws.layout(m, t).sum()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws") / "study"
    _make_workspace(root)
    read_everything(root)  # the undamaged workspace reads cleanly
    return root


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


def _mutate_json(obj, data):
    """Replace (or delete) one randomly chosen node of a JSON document."""
    if isinstance(obj, (dict, list)) and obj and data.draw(st.booleans()):
        keys = sorted(obj) if isinstance(obj, dict) else list(range(len(obj)))
        k = data.draw(st.sampled_from(keys))
        if data.draw(st.integers(0, 4)) == 0:
            del obj[k]
        else:
            obj[k] = _mutate_json(obj[k], data)
        return obj
    return data.draw(json_values)


@fuzz(250)
@given(st.data())
def test_damaged_workspace(workspace, data):
    files = sorted(p.relative_to(workspace) for p in workspace.rglob("*") if p.is_file())
    work = Path(tempfile.mkdtemp(dir=workspace.parent))
    try:
        ws = work / "study"
        shutil.copytree(workspace, ws)
        for _ in range(data.draw(st.integers(1, 2))):
            target = ws / data.draw(st.sampled_from(files))
            if not target.exists():
                continue
            raw = target.read_bytes()
            how = data.draw(st.sampled_from(["random", "truncate", "flip", "json", "delete"]))
            if how == "random":
                target.write_bytes(data.draw(st.binary(max_size=200)))
            elif how == "truncate":
                target.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))])
            elif how == "flip":
                target.write_bytes(bytes(_flip(raw, data.draw(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                                                          min_size=1, max_size=4)))))
            elif how == "json" and target.suffix == ".json":
                try:
                    doc = json.loads(raw)
                except ValueError:  # already damaged by the previous step
                    continue
                target.write_text(json.dumps(_mutate_json(doc, data)))
            elif how == "delete":
                target.unlink()
        only_our_errors(read_everything, ws)
    finally:
        shutil.rmtree(work, ignore_errors=True)
