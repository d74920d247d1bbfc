"""A researcher's own run: own model, own image folder, own normalisation and class order.

The model below is defined here (not built in), trained with a plain loop on
mean/std-normalised grayscale images whose classes it numbers in its own
order (not the folder's alphabetical one); the images are exported as PNG
class folders, a few of them saved as RGB. Each test reproduces a way such a
run used to give silently wrong figures: un-normalised inputs, classes
numbered alphabetically, mixed grayscale/RGB files, no test split.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conceptevo import ConceptEvoError, Workspace
from conceptevo.config import DataConfig, EmbeddingConfig, LayoutConfig, ModelConfig, StimuliConfig, StudyConfig, load_config
from conceptevo.data import ImageFolderDataset, Preprocess, open_dataset
from conceptevo.data.loader import iter_batches
from conceptevo.errors import ChanceAccuracyError, DatasetError, WorkspaceError
from conceptevo.models.checkpoints import list_checkpoints
from conceptevo.pipeline import holdout_split, open_study_dataset, run_study, study_pool
from conceptevo.preflight import chance_p_value, check_test_split, resolve_channels
from conceptevo.stimuli import find_stimuli

#: The model's own class order; the folder's (sorted) order is bars, blob, checks, columns.
MODEL_ORDER = ["columns", "checks", "bars", "blob"]
PER_CLASS = 50
SIZE = 16


class OwnNet(nn.Module):
    """A small BatchNorm CNN of the user's own."""

    def __init__(self, in_channels=1, num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def own_net(in_channels=1, num_classes=4):
    return OwnNet(in_channels, num_classes)


def _pattern(name: str, rng) -> np.ndarray:
    """A low-contrast 16x16 grayscale picture of one class (uint8)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    ph, f = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.0)
    if name == "bars":
        s = np.sin(f * yy + ph)
    elif name == "columns":
        s = np.sin(f * xx + ph)
    elif name == "blob":
        cy, cx = rng.uniform(5, 11, 2)
        s = 2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 10) - 1
    else:  # checks
        s = np.sign(np.sin(f * xx + ph) * np.sin(f * yy + ph))
    img = 0.5 + 0.13 * s + rng.normal(0, 0.03, s.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def write_folder(root: Path, per_class: int, seed: int, rgb_every: int = 0, classes=MODEL_ORDER) -> None:
    """PNG class folders; every ``rgb_every``-th file saved as RGB (same gray in each channel)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.fromarray(_pattern(c, rng), mode="L")
            if rgb_every and i % rgb_every == 3:
                im = im.convert("RGB")
            im.save(root / c / f"{i:03d}.png")


def read_folder(root: Path):
    """(uint8 [N, H, W], model-order labels, paths) in the folder dataset's file order."""
    paths = sorted(p for d in sorted(root.iterdir()) if d.is_dir() for p in sorted(d.glob("*.png")))
    arr = np.stack([np.array(Image.open(p).convert("L")) for p in paths])
    labels = np.array([MODEL_ORDER.index(p.parent.name) for p in paths])
    return arr, labels, paths


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The user's files: an image folder (no train/test split), its mean/std, two checkpoints of OwnNet."""
    root = tmp_path_factory.mktemp("own")
    write_folder(root / "shapes", PER_CLASS, seed=0, rgb_every=10)
    arr, labels, _ = read_folder(root / "shapes")
    x = torch.from_numpy(arr).float().div(255).unsqueeze(1)
    mean, std = round(float(x.mean()), 4), round(float(x.std()), 4)  # as a user computes them
    xn, y = (x - mean) / std, torch.from_numpy(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OwnNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        (root / "ck").mkdir()
        for step in range(1, 61):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = F.cross_entropy(model(xn[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in (20, 60):
                torch.save(model.state_dict(), root / "ck" / f"step{step}.pt")
    model.eval()
    with torch.no_grad():
        assert (model(xn).argmax(1) == y).float().mean() > 0.9  # the model works on its own inputs
    return {"root": root, "mean": mean, "std": std, "model": model}


def config(own, out, **data_changes) -> StudyConfig:
    data = DataConfig(kind="folder", path=str(own["root"] / "shapes"), pool=120, mean=own["mean"], std=own["std"],
                      classes=MODEL_ORDER, holdout=0.25)
    return StudyConfig(out=str(out), data=dataclasses.replace(data, **data_changes),
                       models=[ModelConfig(name="own", arch="test_own_data:own_net", checkpoints=str(own["root"] / "ck"))],
                       stimuli=StimuliConfig(k=3, batch_size=64), embedding=EmbeddingConfig(dim=4, epochs=5),
                       layout=LayoutConfig(method="pca")).validate()


class _Stop(Exception):
    """Raised in place of the stimuli passes: the run got past its checks."""


def _stop_before_passes(monkeypatch):
    from conceptevo import pipeline

    def stop(*a, **k):
        raise _Stop()

    monkeypatch.setattr(pipeline, "_stimuli_stage", stop)


@pytest.fixture(scope="module")
def study(own, tmp_path_factory):
    """The full run with the right settings; its log is kept."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("conceptevo")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        ws = run_study(config(own, tmp_path_factory.mktemp("study") / "ws"), progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return ws, [r.getMessage() for r in records]


# ---------------------------------------------------------------- 1. preprocessing
def test_run_gives_the_stimuli_of_the_normalised_images(own, study):
    """Right answers: the stimuli equal find_stimuli on the normalised images, computed here by hand."""
    ws, _ = study
    full = ws.images()
    arr, labels, _ = read_folder(own["root"] / "shapes")
    assert np.array_equal(full.targets, labels)
    pool_idx = np.asarray(study_pool(config(own, "unused").data).indices)
    x = (torch.from_numpy(arr[pool_idx]).float().div(255).unsqueeze(1) - own["mean"]) / own["std"]
    items = [(x[j], int(labels[i]), int(i)) for j, i in enumerate(pool_idx)]
    for c in list_checkpoints(own["root"] / "ck"):
        model = OwnNet()
        model.load_state_dict(torch.load(c.path))
        ref = find_stimuli(model.eval(), items, k=3, progress=False, num_images=len(full))
        got = ws.stimuli("own", c.tag)
        assert np.array_equal(np.asarray(got.indices), np.asarray(ref.indices))
        np.testing.assert_allclose(np.asarray(got.values), np.asarray(ref.values), rtol=1e-5, atol=1e-6)


def test_later_commands_open_the_data_with_the_same_preprocessing(own, study):
    ws, _ = study
    recorded = ws.manifest["data"]["preprocess"]
    assert recorded == {"mean": [own["mean"]], "std": [own["std"]]}
    arr, _, _ = read_folder(own["root"] / "shapes")
    for ds in (ws.images(), Workspace(ws.path).dataset("train")):
        img, _, i = ds[3]
        np.testing.assert_allclose(img.numpy()[0], (arr[i] / 255.0 - own["mean"]) / own["std"], rtol=1e-5, atol=1e-5)


def test_patches_show_the_pixels_people_see_not_the_normalised_input(own, study):
    ws, _ = study
    img_dir = ws.path / "patches" / "images"
    pixels, indices = np.load(img_dir / "pixels.npy"), np.load(img_dir / "indices.npy")
    arr, labels, _ = read_folder(own["root"] / "shapes")
    assert np.array_equal(pixels[..., 0], arr[indices])  # exactly the files' gray values
    index = json.loads((img_dir / "index.json").read_text())
    assert index["classes"] == MODEL_ORDER and np.array_equal(np.load(img_dir / "labels.npy"), labels[indices])


def test_a_model_given_unnormalised_images_stops_the_run(own, tmp_path):
    """The reported failure: the model scored chance on raw images and the figures came out anyway."""
    with pytest.raises(ChanceAccuracyError, match=r"not above chance.*mean/std.*--allow-chance"):
        run_study(config(own, tmp_path / "ws", mean=None, std=None), progress=False)
    rec = Workspace(tmp_path / "ws").manifest["sanity"]["own"]
    assert rec["top1"] < 0.35 and rec["p_value"] > 0.01 and rec["images"] == 120  # recorded, even so
    assert not (tmp_path / "ws" / "stimuli").exists()  # stopped before the heavy passes


def test_transform_as_a_callable_or_a_file_in_the_config(own, tmp_path):
    root = own["root"] / "shapes"
    m, s = own["mean"], own["std"]
    by_hand = ImageFolderDataset(root, transform=lambda x: (x - m) / s, classes=MODEL_ORDER)
    by_settings = open_dataset("folder", root, mean=m, std=s, classes=MODEL_ORDER)
    (tmp_path / "prep.py").write_text(f"def normalise(x):\n    return (x - {m}) / {s}\n")
    (tmp_path / "study.toml").write_text(
        f'[study]\nout = "ws"\n[data]\nkind = "folder"\npath = "{root}"\ntransform = "prep.py:normalise"\n'
        f'classes = {json.dumps(MODEL_ORDER)}\n[[models]]\nname = "own"\narch = "test_own_data:own_net"\n'
        f'checkpoints = "{own["root"] / "ck"}"\n')
    by_config = open_study_dataset(load_config(tmp_path / "study.toml").data)
    for i in (0, 57, 199):
        ref = by_settings[i][0]
        for ds in (by_hand, by_config):
            torch.testing.assert_close(ds[i][0], ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(ds.pixels(i), by_settings.pixels(i))  # pictures: before normalisation
        assert 0 <= float(by_settings.pixels(i).min()) and float(by_settings.pixels(i).max()) <= 1
    with pytest.raises(DatasetError, match="float tensor.*drop ToTensor"):
        ImageFolderDataset(root, transform=lambda pil: pil.convert("L"))  # a PIL-only step


def test_mean_std_resize_and_crop_for_every_kind():
    m, s = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    raw = open_dataset("synthetic", n=24, size=20)
    ds = open_dataset("synthetic", n=24, size=20, mean=m, std=s, resize=[10, 12], crop=[8, 8])
    x = raw.image(5)
    geo = F.interpolate(x[None], size=(10, 12), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    geo = geo[:, 1:9, 2:10]
    torch.testing.assert_close(ds.pixels(5), geo)
    torch.testing.assert_close(ds[5][0], (geo - torch.tensor(m)[:, None, None]) / torch.tensor(s)[:, None, None])
    batch = next(iter_batches(ds, 24))[0]  # the batched path gives what the items give
    torch.testing.assert_close(batch, torch.stack([ds[i][0] for i in range(24)]))
    assert ds.image_shape == (3, 8, 8)
    # an integer resize keeps the aspect ratio (shorter side -> N)
    assert Preprocess(resize=10).geometry(torch.rand(1, 20, 40)).shape == (1, 10, 20)
    idx = open_dataset("idx", images=np.full((6, 8, 8), 51, np.uint8), labels=np.arange(6) % 2, mean=0.2, std=0.5)
    assert torch.allclose(idx[0][0], torch.zeros(1, 8, 8), atol=1e-6)
    with pytest.raises(DatasetError, match="0..255"):
        open_dataset("synthetic", n=4, mean=[125.3, 123.0, 113.9], std=[63.0, 62.1, 66.7])
    with pytest.raises(DatasetError, match="3 channel"):
        open_dataset("synthetic", n=4, mean=[0.5, 0.5], std=[0.2, 0.2])


def test_fashion_mnist_takes_the_same_settings():
    from conceptevo.data import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed")
    raw = open_dataset("fashion-mnist")
    ds = open_dataset("fashion-mnist", mean=0.286, std=0.353)
    torch.testing.assert_close(ds[7][0], (raw[7][0] - 0.286) / 0.353)


def test_folder_of_mixed_sizes_with_resize_and_crop(tmp_path):
    for c, sizes in (("a", [(20, 24), (30, 18)]), ("b", [(24, 24), (40, 22)])):
        (tmp_path / c).mkdir()
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(np.full((h, w), 100 + i, np.uint8), mode="L").save(tmp_path / c / f"{i}.png")
    with pytest.raises(DatasetError, match="resize"):
        ImageFolderDataset(tmp_path)
    ds = open_dataset("folder", tmp_path, resize=16, crop=12)
    assert [tuple(ds[i][0].shape) for i in range(len(ds))] == [(1, 12, 12)] * 4
    assert torch.allclose(ds[1][0], torch.full((1, 12, 12), 101 / 255))  # a flat image stays flat


# ---------------------------------------------------------------- 2. sanity check
def test_chance_p_value_is_the_binomial_tail():
    from math import comb

    for correct, n, p in ((0, 10, 0.1), (3, 10, 0.25), (30, 120, 0.25), (120, 120, 0.25)):
        brute = sum(comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(correct, n + 1))
        assert chance_p_value(correct, n, p) == pytest.approx(brute, rel=1e-9, abs=1e-300)


def test_accuracy_is_printed_and_recorded(study):
    ws, log = study
    rec = ws.manifest["sanity"]["own"]
    assert rec["top1"] > 0.9 and rec["images"] == 120 and rec["chance"] == 0.25 and rec["p_value"] < 1e-10
    assert any(m.startswith(f"sanity check: own step60 top-1 {rec['top1']:.3f} on 120 pool images (chance 0.250") for m in log)
    assert f"own step60: top-1 {rec['top1']:.3f} on 120 pool images (chance 0.250)" in Workspace(ws.path).summary()


def test_allow_chance_on_the_command_line_and_in_the_config(own, tmp_path, monkeypatch, capsys):
    from conceptevo.cli import main

    _stop_before_passes(monkeypatch)
    (tmp_path / "study.toml").write_text(
        f'[study]\nout = "ws"\n[data]\nkind = "folder"\npath = "{own["root"] / "shapes"}"\npool = 120\n'
        f'classes = {json.dumps(MODEL_ORDER)}\n[[models]]\nname = "own"\narch = "test_own_data:own_net"\n'
        f'checkpoints = "{own["root"] / "ck"}"\n')
    assert main(["run", str(tmp_path / "study.toml"), "--no-progress"]) == 2  # at chance: a one-line error
    assert "--allow-chance" in capsys.readouterr().err
    with pytest.raises(_Stop):
        main(["run", str(tmp_path / "study.toml"), "--no-progress", "--allow-chance"])
    c = config(own, tmp_path / "ws2", mean=None, std=None)
    c = dataclasses.replace(c, models=[dataclasses.replace(c.models[0], allow_chance=True)])
    with pytest.raises(_Stop):
        run_study(c, progress=False)


# ---------------------------------------------------------------- 4. class order
def test_classes_numbered_alphabetically_stop_the_run(own, tmp_path):
    """The reported failure: folder classes numbered alphabetically, the model numbering them otherwise."""
    with pytest.raises(ChanceAccuracyError, match=r"classes numbered differently.*\[data\] classes"):
        run_study(config(own, tmp_path / "ws", classes=None), progress=False)


def test_run_prints_the_class_mapping(study):
    _, log = study
    assert "stimulus pool: 120 of the 200 images of shapes (a seeded, class-balanced sample)" in log  # not 'shapes[120]'
    assert any("classes (model output: name), as given by [data] classes: 0 columns, 1 checks, 2 bars, 3 blob" in m
               for m in log)


def test_class_to_idx_equals_the_class_list(own):
    root = own["root"] / "shapes"
    a = ImageFolderDataset(root, classes=MODEL_ORDER)
    b = ImageFolderDataset(root, class_to_idx={c: i for i, c in enumerate(MODEL_ORDER)})
    assert a.classes == b.classes == MODEL_ORDER and np.array_equal(a.targets, b.targets)
    assert np.array_equal(a.targets, read_folder(root)[1])
    with pytest.raises(DatasetError, match="'columns'.*list every class"):
        ImageFolderDataset(root, classes=["bars", "blob", "checks"])
    gaps = ImageFolderDataset(root, class_to_idx={"bars": 0, "blob": 2, "checks": 3, "columns": 5})
    assert gaps.classes == ["bars", "output 1", "blob", "checks", "output 4", "columns"]


def test_importance_and_evaluation_name_the_classes(own, study, capsys):
    import csv

    from conceptevo.cli import main
    from conceptevo.importance.commands import evaluate_command

    ws, _ = study
    assert main(["importance", str(ws.path), "--model", "own", "--from", "step20", "--to", "step60",
                 "--class", "checks", "--images", "12", "--top", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "for class 'checks'" in out
    folder = ws.path / "importance" / "own" / "step20__step60" / f"class-{MODEL_ORDER.index('checks')}"
    with open(folder / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["class"] for r in rows} == {"checks"}
    from conceptevo.importance import EvolutionImportance

    used = EvolutionImportance.load(folder / "importance.npz").image_indices
    files = np.array(ws.images().files, dtype=object)
    assert {Path(p).parent.name for p in files[used]} == {"checks"}  # the images really are of that class
    r = evaluate_command(ws.path, "own", stages="step20:step60", classes="bars,blob", repeats=1, images=8, progress=False)
    assert "(bars; blob)" in r["markdown"].read_text()
    with open(r["csv"]) as f:
        assert {row["class names"] for row in csv.DictReader(f)} == {"bars; blob"}


def test_evaluate_images_bounds_the_test_sample_too(study):
    """`evaluate-importance --images 8` measures 8 training and 8 test images of the class, not 8 and up to 128."""
    from conceptevo.importance.commands import evaluate_command

    ws, _ = study
    test_images = int(np.sum(ws.dataset("test").targets == MODEL_ORDER.index("blob")))
    assert test_images > 8
    r = evaluate_command(ws.path, "own", stages="step20:step60", classes="blob", repeats=1, images=8, progress=False)
    assert r["results"][0].num_images.tolist() == [[[8, 8]]]


def test_a_test_folder_missing_a_class_keeps_the_numbering(tmp_path):
    write_folder(tmp_path / "d" / "train", 3, seed=1)
    write_folder(tmp_path / "d" / "test", 3, seed=2, classes=["bars", "columns"])
    data = DataConfig(kind="folder", path=str(tmp_path / "d"))
    train, test = open_study_dataset(data, "train"), open_study_dataset(data, "test")
    assert test.classes == train.classes == sorted(MODEL_ORDER)
    assert sorted(set(test.targets.tolist())) == [train.classes.index("bars"), train.classes.index("columns")]


# ---------------------------------------------------------------- 8. channels
def test_mixed_grayscale_and_rgb_files_follow_the_models_first_layer(own, study, caplog):
    ws, log = study
    assert ws.config["data"]["options"]["channels"] == 1  # recorded: later commands read them the same way
    assert any("mixes grayscale and colour" in m and "reading them as grayscale" in m for m in log)
    assert ws.images()[0][0].shape[0] == 1
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(own["root"] / "shapes")  # through the API: no model to ask, so say which option
    assert ds.channels == 3 and ds.mixed_modes and "pass channels=1" in caplog.text


def test_channels_that_do_not_fit_the_model_name_the_option(own, tmp_path):
    c = config(own, tmp_path / "ws", options={"channels": 3})
    with pytest.raises(DatasetError, match=r"3 channel\(s\) but model 'own' \(its first layer 'conv1'.*takes 1; set \[data\] options.channels = 1"):
        resolve_channels(c)


# ---------------------------------------------------------------- 10. train/test split
def test_holdout_split_is_seeded_stratified_and_disjoint():
    targets = np.repeat(np.arange(3), [10, 21, 2])
    kept, held = holdout_split(targets, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(targets)))
    assert [int(np.sum(targets[held] == c)) for c in range(3)] == [2, 4, 1]
    k2, h2 = holdout_split(targets, 0.2, seed=3)
    assert np.array_equal(held, h2) and not np.array_equal(held, holdout_split(targets, 0.2, seed=4)[1])


def test_run_records_the_held_out_split_and_keeps_it_out_of_the_pool(study):
    ws, log = study
    held = np.load(ws.path / "data" / "heldout.npy")
    info = ws.manifest["data"]
    assert info["holdout"]["images"] == len(held) == 48 and info["test"] == {"images": 48, "source": "holdout"}
    test = ws.dataset("test")
    assert np.array_equal(test.indices, held) and len(ws.dataset("train")) == 200 - 48
    used = np.concatenate([np.asarray(ws.stimuli("own", t).indices).ravel() for t in ws.tags("own")])
    assert not np.isin(used, held).any()
    assert any("test split: 48 held-out images of 200" in m for m in log)
    ws.manifest["data"]["holdout"]["key"] = "changed"
    with pytest.raises(WorkspaceError, match="held-out images"):
        ws.dataset("test")


def test_run_warns_when_there_is_no_test_split(own, caplog):
    c = config(own, "unused", holdout=None)
    with caplog.at_level(logging.WARNING):
        assert check_test_split(c) is None
    assert "evaluate-importance will not be possible" in caplog.text and "holdout = 0.2" in caplog.text


@pytest.mark.parametrize("data, message", [
    ({"transform": "prep"}, "data.transform must name a callable"),
    ({"holdout": 1.5}, "data.holdout must be a fraction"),
    ({"mean": [0.5], "std": [0]}, "std must be positive"),
    ({"mean": [120.0], "std": [60.0]}, "0..255 pixel units"),
    ({"mean": 0.5}, "give both mean and std"),
    ({"resize": [1, 2, 3]}, "resize must be a positive integer or a list"),
    ({"classes": []}, "data.classes must be a list of class names"),
    ({"size": 3}, "Did you mean 'resize'"),
    ({"classes": ["a"], "options": {"classes": ["a"]}}, "both as a key and in options"),
])
def test_bad_data_settings_are_one_line_errors(data, message):
    raw = {"study": {"out": "x"}, "data": {"kind": "synthetic", **data},
           "models": [{"name": "a", "arch": "vgg_like", "checkpoints": "c"}]}
    with pytest.raises(ConceptEvoError, match=message):
        StudyConfig.from_dict(raw).data.dataset_options()


def test_evaluation_without_a_test_split_names_the_holdout(study, tmp_path):
    import shutil

    from conceptevo.importance.commands import evaluate_command

    ws, _ = study
    shutil.copytree(ws.path, tmp_path / "ws")
    manifest = json.loads((tmp_path / "ws" / "manifest.json").read_text())
    manifest["config"]["data"]["holdout"] = None
    (tmp_path / "ws" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"no 'test' sub-folder.*holdout = 0.2"):
        evaluate_command(tmp_path / "ws", "own", stages="step20:step60", classes="bars", repeats=1, images=8, progress=False)
