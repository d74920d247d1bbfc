"""Tests of conceptevo.data: IDX files, image folders, ConceptShapes, the protocol helpers."""
from __future__ import annotations

import gzip
import logging
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conceptevo.data import (
    ConceptShapes,
    FashionMNIST,
    IDXDataset,
    ImageDataset,
    ImageFolderDataset,
    Subset,
    class_indices,
    describe,
    find_fashion_mnist,
    indexed,
    open_dataset,
    read_idx,
    sample_pool,
    write_idx,
)
from conceptevo.data.idx import parse_idx
from conceptevo.errors import DatasetError


def check_items(ds, n_check=5):
    """Every dataset yields (float32 [C,H,W] in [0,1], int label in range, its index)."""
    idx = np.unique(np.linspace(0, len(ds) - 1, num=min(n_check, len(ds))).astype(int))
    for i in idx:
        img, label, index = ds[int(i)]
        assert isinstance(img, torch.Tensor) and img.dtype == torch.float32
        assert img.ndim == 3 and tuple(img.shape) == tuple(ds.image_shape)
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        assert isinstance(label, int) and 0 <= label < len(ds.classes)
        assert label == int(ds.targets[int(i)])
        assert isinstance(index, int)
    with pytest.raises(IndexError):
        ds[len(ds)]


# ---------------------------------------------------------------- IDX


def make_idx(tmp_path, n=20, h=28, w=28, gz=False, prefix="train", seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    ext = ".gz" if gz else ""
    ip = write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{ext}", images)
    lp = write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels, ip, lp


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels, ip, lp = make_idx(tmp_path, gz=gz)
    if gz:
        assert ip.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(ip), images)
    np.testing.assert_array_equal(read_idx(lp), labels)
    ds = IDXDataset(ip, lp)
    assert len(ds) == 20 and ds.array.dtype == np.uint8 and ds.targets.dtype == np.int64
    check_items(ds)
    img, label, i = ds[3]
    assert img.shape == (1, 28, 28)
    assert torch.equal(img[0], torch.from_numpy(images[3]).float() / 255)
    batch = ds.images_tensor([3, 5])
    assert batch.shape == (2, 1, 28, 28)
    assert torch.equal(batch[0], img)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_dtypes(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == "uint8":
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = write_idx(tmp_path / "a.idx", arr)
    back = read_idx(p)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, arr)


def test_idx_header_and_truncation_errors(tmp_path):
    _, _, ip, _ = make_idx(tmp_path, n=4)
    data = ip.read_bytes()
    cases = {
        "short.idx": data[:3],
        "trunc_header.idx": data[:9],
        "trunc_body.idx": data[:-7],
        "long.idx": data + b"\0\0",
        "bad_magic.idx": b"\x01\x02" + data[2:],
        "bad_type.idx": data[:2] + b"\x07" + data[3:],
        "zero_dims.idx": data[:3] + b"\x00" + data[4:],
    }
    for name, payload in cases.items():
        p = tmp_path / name
        p.write_bytes(payload)
        with pytest.raises(DatasetError) as e:
            read_idx(p)
        assert name in str(e.value) and "\n" not in str(e.value)
    p = tmp_path / "trunc.gz"
    p.write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DatasetError, match="gzip"):
        read_idx(p)
    with pytest.raises(DatasetError, match="does not exist"):
        read_idx(tmp_path / "missing")
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "trunc_body.idx")


def test_idx_dataset_mismatches(tmp_path):
    images, labels, ip, lp = make_idx(tmp_path, n=5)
    with pytest.raises(DatasetError, match="5 images but"):
        IDXDataset(ip, labels[:4])
    with pytest.raises(DatasetError, match="uint8"):
        IDXDataset(images.astype(np.float32), labels)
    with pytest.raises(DatasetError, match="class names"):
        IDXDataset(images, np.full(5, 3), classes=["a", "b"])
    ds = IDXDataset(images, labels.astype(np.int64), classes=[str(c) for c in range(10)])
    assert ds.name == "idx" and ds.classes[0] == "0"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=80), st.integers(min_value=0, max_value=200), st.booleans())
def test_idx_fuzz_only_dataset_errors(tmp_path, noise, cut, gz):
    """Random, spliced or truncated bytes either parse or raise DatasetError, nothing else."""
    valid = (
        bytes([0, 0, 0x08, 2]) + np.asarray([3, 4], dtype=">u4").tobytes() + bytes(range(12))
    )
    payloads = [noise, valid[:cut] + noise, bytes([0, 0]) + noise, valid[: cut % (len(valid) + 1)]]
    for k, payload in enumerate(payloads):
        if gz:
            payload = gzip.compress(payload)[: cut + 10]
        p = tmp_path / f"fuzz{k}.idx"
        p.write_bytes(payload)
        try:
            arr = read_idx(p)
        except DatasetError as e:
            assert str(e)
        else:
            assert isinstance(arr, np.ndarray)
        try:
            parse_idx(payload)
        except DatasetError:
            pass


def test_open_idx_directory(tmp_path):
    make_idx(tmp_path, n=6, gz=True, prefix="train")
    make_idx(tmp_path, n=4, gz=False, prefix="t10k", seed=1)
    tr = open_dataset("idx", tmp_path)
    te = open_dataset("idx", tmp_path, split="test", classes=[f"c{i}" for i in range(10)])
    assert (len(tr), len(te)) == (6, 4) and te.classes[1] == "c1"
    files = open_dataset(
        "idx", images=tmp_path / "t10k-images-idx3-ubyte", labels=tmp_path / "t10k-labels-idx1-ubyte"
    )
    assert len(files) == 4
    with pytest.raises(DatasetError, match="nothing-here does not exist.*apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no t10k-images.*apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "empty", split="test")
    with pytest.raises(DatasetError, match="split"):
        FashionMNIST(tmp_path, split="validation")


def test_fashion_mnist_not_28x28(tmp_path):
    make_idx(tmp_path, n=3, h=8, w=8)
    with pytest.raises(DatasetError, match="28x28"):
        FashionMNIST(tmp_path)


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist():
    tr, te = FashionMNIST(), open_dataset("fashion-mnist", split="test")
    assert (len(tr), len(te)) == (60000, 10000)
    assert tr.classes[0] == "T-shirt/top" and tr.classes[9] == "Ankle boot"
    for ds in (tr, te):
        assert ds.targets.min() == 0 and ds.targets.max() == 9
        assert np.bincount(ds.targets).min() == len(ds) // 10  # balanced
        check_items(ds)
        assert ds.image_shape == (1, 28, 28)
    assert describe(tr).startswith("fashion-mnist-train: 60000 images of 1x28x28, 10 classes")


# ---------------------------------------------------------------- image folders


def make_folder(root, classes=("cat", "dog"), n=3, mode="RGB", size=(10, 12)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(
                root / c / f"{k}.{'png' if k % 2 == 0 else 'JPG'}"
            )
    return root


def test_folder_rgb_and_gray(tmp_path):
    rgb = ImageFolderDataset(make_folder(tmp_path / "rgb"))
    assert rgb.classes == ["cat", "dog"] and len(rgb) == 6 and rgb.image_shape == (3, 12, 10)
    assert list(rgb.targets) == [0, 0, 0, 1, 1, 1]
    check_items(rgb)
    gray = ImageFolderDataset(make_folder(tmp_path / "gray", mode="L"))
    assert gray.channels == 1 and gray[0][0].shape == (1, 12, 10)
    check_items(gray)
    forced = ImageFolderDataset(tmp_path / "gray", channels=3, size=8)
    assert forced[0][0].shape == (3, 8, 8)
    check_items(forced)
    (tmp_path / "rgb" / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "rgb" / ".hidden").mkdir()
    assert len(ImageFolderDataset(tmp_path / "rgb")) == 6
    assert "rgb: 6 images of 3x12x10, 2 classes (cat, dog)" == describe(rgb)


def test_folder_mixed_sizes(tmp_path):
    make_folder(tmp_path / "a", classes=("x",), size=(10, 10))
    make_folder(tmp_path / "b", classes=("y",), size=(6, 6))
    (tmp_path / "a" / "y").mkdir()
    for f in (tmp_path / "b" / "y").iterdir():
        f.rename(tmp_path / "a" / "y" / f.name)
    with pytest.raises(DatasetError, match="size=N"):
        ImageFolderDataset(tmp_path / "a")
    ds = ImageFolderDataset(tmp_path / "a", size=7)
    assert ds.image_shape == (3, 7, 7)
    check_items(ds)


def test_folder_corrupt_policies(tmp_path, caplog):
    root = make_folder(tmp_path / "f", n=2)
    bad = root / "dog" / "zz_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = ImageFolderDataset(root)
    assert len(ds) == 5
    with pytest.raises(DatasetError, match="zz_bad.png") as e:
        ds[4]
    assert "skip_corrupt=True" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="conceptevo.data.folder"):
        ok = ImageFolderDataset(root, skip_corrupt=True)
    assert len(ok) == 4 and ok.skipped == [str(bad)]
    assert any("skipped 1" in r.getMessage() for r in caplog.records)
    check_items(ok)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty")
    root = make_folder(tmp_path / "f", classes=("a",))
    (root / "b").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*b has no readable images"):
        ImageFolderDataset(root)
    with pytest.raises(DatasetError, match="channels"):
        ImageFolderDataset(tmp_path / "f", channels=2)


def test_open_folder_splits(tmp_path):
    make_folder(tmp_path / "d" / "train")
    make_folder(tmp_path / "d" / "test", n=1)
    assert len(open_dataset("folder", tmp_path / "d")) == 6
    assert len(open_dataset("folder", tmp_path / "d", split="test", size=5)) == 2
    flat = make_folder(tmp_path / "flat")
    assert len(open_dataset("folder", flat)) == 6
    with pytest.raises(DatasetError, match="'test' sub-folder"):
        open_dataset("folder", flat, split="test")


# ---------------------------------------------------------------- synthetic


def test_concept_shapes_deterministic():
    a = ConceptShapes(n=300, seed=3)
    b = ConceptShapes(n=300, seed=3, cache=False)
    np.testing.assert_array_equal(a.targets, b.targets)
    for i in (0, 17, 299):
        assert torch.equal(a[i][0], b[i][0])  # bulk (cached) == alone
        np.testing.assert_array_equal(a.render([i])[0], a.array[i])
    np.testing.assert_array_equal(a.render([5, 2, 5]), a.array[[5, 2, 5]])
    # a longer dataset with the same seed starts with the same images
    np.testing.assert_array_equal(ConceptShapes(n=310, seed=3).array[:300], a.array)
    assert not np.array_equal(ConceptShapes(n=300, seed=4).array, a.array)
    assert not np.array_equal(ConceptShapes(n=300, seed=3, split="test").array, a.array)
    assert a.fingerprint() == b.fingerprint()


def test_concept_shapes_concepts_and_items():
    ds = ConceptShapes(n=600, seed=0)
    check_items(ds)
    assert ds.image_shape == (3, 32, 32) and len(ds.classes) == 10
    assert set(ds.concepts) == set(ds.concept_names)
    for k, v in ds.concepts.items():
        assert v.dtype == np.int64 and v.shape == (600,)
        assert v.min() >= 0 and v.max() < len(ds.concept_names[k])
        assert len(np.unique(v)) == len(ds.concept_names[k])  # every value occurs
    np.testing.assert_array_equal(ds.targets, 2 * ds.concepts["shape"] + ds.concepts["family"])
    for i in range(0, 600, 37):
        shape = ds.concept_names["shape"][ds.concepts["shape"][i]]
        fam = ds.concept_names["family"][ds.concepts["family"][i]]
        assert ds.classes[ds.targets[i]] == f"{fam} {shape}"
    warm = ds.concepts["family"] == 0
    assert set(ds.concepts["colour"][warm]) == {0, 1, 2}
    # colour is visible: warm shapes have more red than blue on average
    x = ds.images_tensor(np.arange(200)).numpy()
    red_minus_blue = (x[:, 0] - x[:, 2]).reshape(200, -1).max(axis=1)
    assert red_minus_blue[warm[:200]].mean() > red_minus_blue[~warm[:200]].mean() + 0.3
    assert ds.images_tensor([1, 2]).shape == (2, 3, 32, 32)


def test_concept_shapes_speed_and_validation():
    t = time.perf_counter()
    ds = ConceptShapes(n=10000, seed=1)
    arr = ds.array
    assert arr.shape == (10000, 3, 32, 32) and arr.dtype == np.uint8
    assert time.perf_counter() - t < 10.0
    assert ConceptShapes(n=4, size=48)[0][0].shape == (3, 48, 48)
    for bad in ({"n": 0}, {"size": 8}, {"seed": -1}, {"split": "training"}):
        with pytest.raises(DatasetError):
            ConceptShapes(**bad)


# ---------------------------------------------------------------- helpers


def test_sample_pool_balanced_and_seeded():
    ds = ConceptShapes(n=1000, seed=0)
    pool = sample_pool(ds, 200, seed=5)
    assert isinstance(pool, Subset) and len(pool) == 200
    counts = np.bincount(pool.targets, minlength=10)
    assert counts.min() == counts.max() == 20
    again = sample_pool(ds, 200, seed=5)
    np.testing.assert_array_equal(pool.indices, again.indices)
    assert not np.array_equal(pool.indices, sample_pool(ds, 200, seed=6).indices)
    img, label, index = pool[7]
    assert index == int(pool.indices[7]) and label == int(ds.targets[index])
    assert torch.equal(img, ds[index][0])
    assert sample_pool(ds, None) is ds
    with pytest.raises(DatasetError):
        sample_pool(ds, 0)
    assert np.all(ds.targets[class_indices(ds, 3)] == 3)


def test_indexed_wraps_plain_datasets():
    plain = [(torch.zeros(1, 2, 2), 1), (torch.ones(1, 2, 2), 0)]
    wrapped = indexed(plain)
    assert wrapped[1][2] == 1
    ds = ConceptShapes(n=5)
    assert indexed(ds) is ds and isinstance(ds, ImageDataset)
    with pytest.raises(DatasetError):
        indexed([])


def test_open_dataset_kinds_and_describe():
    ds = open_dataset("Synthetic", n=50, seed=2)
    assert isinstance(ds, ConceptShapes) and len(ds) == 50
    assert describe(ds).startswith("concept-shapes-train: 50 images of 3x32x32, 10 classes (warm circle,")
    with pytest.raises(DatasetError, match="'fashion-mnist', 'idx', 'folder', 'synthetic'"):
        open_dataset("imagenet")
    with pytest.raises(DatasetError, match="Did you mean 'folder'"):
        open_dataset("folders", "x")
    with pytest.raises(DatasetError, match="no option 'colour'"):
        open_dataset("synthetic", colour=1)
    with pytest.raises(DatasetError, match="takes no path"):
        open_dataset("synthetic", "some/dir")
    with pytest.raises(DatasetError, match="needs a path"):
        open_dataset("folder")
    assert describe(Subset(ds, [1, 2])).startswith("concept-shapes-train[2]: 2 images of 3x32x32")
