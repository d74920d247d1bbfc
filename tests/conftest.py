import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class TinySeq(nn.Module):
    def __init__(self, cin=1, ncls=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(cin, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, ncls))

    def forward(self, x):
        return self.head(self.features(x))


class TinyRes(nn.Module):
    """A residual model with a branch: not expressible as a Sequential."""

    def __init__(self, cin=1, ncls=4):
        super().__init__()
        self.stem = nn.Conv2d(cin, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, ncls)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.a(h) + self.b(h) + h)
        h = torch.relu(self.down(h))
        return self.fc(h.mean(dim=(2, 3)))


#: Debian's Chromium for the browser tests (they skip cleanly without it), started headless and offline
CHROMIUM = os.environ.get("CONCEPTEVO_CHROMIUM", "/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"]


def launch_chromium(pw):
    """``pw.chromium`` launched on :data:`CHROMIUM`; the test is skipped where the browser does not start."""
    try:
        return pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
    except Exception as e:  # pragma: no cover - a broken browser install
        pytest.skip(f"Chromium does not start: {e}")


class TensorImages(torch.utils.data.Dataset):
    """In-memory images returning (image, label, index)."""

    def __init__(self, images, labels, classes=None):
        self.images = images
        self.targets = np.asarray(labels, dtype=np.int64)
        self.classes = classes or [str(i) for i in range(int(self.targets.max()) + 1)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i]), i


def bright_top_half(n: int, seed: int = 0) -> TensorImages:
    """``n`` dim 28x28 images in two classes, alternating; class 1 has a bright top half (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    y = np.arange(n) % 2
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.2
    x[y == 1, :, :14] += 0.8
    return TensorImages(x, y)


@pytest.fixture
def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(70, 1, 12, 12, generator=g)
    x[10] = x[3]          # exact duplicates: ties in every neuron
    x[40] = x[3]
    x[20] = 0.0           # a blank image
    y = torch.arange(70) % 4
    return TensorImages(x, y.numpy())


@pytest.fixture(params=["seq", "res"])
def tiny_model(request):
    torch.manual_seed(1)
    return TinySeq() if request.param == "seq" else TinyRes()


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a test module: tiny models run far faster so on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fabricated_study(tmp_path_factory):
    """Path of one fabricated study per session (tests/fabricated.py), with a stand-in image embedding.

    Built once (about 8 s) and shared: read it, never write into it; take :func:`fabricated_copy` to write.
    """
    from conceptevo.embedding import ImageEmbedding
    from fabricated import fabricate

    ws = fabricate(tmp_path_factory.mktemp("diag-ws"), importance=False)
    # the fabricated study has no image embedding: a random vector for every image stands in
    n = ws.manifest["data"]["num_images"]
    vec = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    ImageEmbedding(vec, np.ones(n, dtype=bool), rmse=0.0).save(ws.path / "embedding" / "images")
    ws.finish("embedding/images", "fabricated", {}, rmse=0.0)
    return ws.path


@pytest.fixture
def fabricated_copy(fabricated_study, tmp_path):
    """A private copy of :func:`fabricated_study` for a test that writes into the study."""
    dst = tmp_path / "fabricated-study"
    shutil.copytree(fabricated_study, dst)
    return dst


TEXT_SMALL = dict(context=32, d_model=32, n_layers=2, n_heads=2, batch_size=8, steps=12, every=6, log_until=2)


def text_study_config(tmp, runs, **data):
    """A text study of lm_tiny runs on the generated corpus (two layers, k = 5, 150 windows)."""
    from conceptevo.config import StudyConfig

    return StudyConfig.from_dict({
        "study": {"out": str(tmp / "ws")},
        "data": {"kind": "text", "corpus": "generated", "context": 32, "pool": 150, **data},
        "models": [{"name": f"s{s}", "arch": "lm_tiny", "checkpoints": str(r),
                    "options": {"d_model": 32, "n_layers": 2, "n_heads": 2}} for s, r in enumerate(runs)],
        "stimuli": {"k": 5, "layers": ["blocks.*.mlp.act"]},
        "layout": {"method": "pca"}})


@pytest.fixture(scope="session")
def text_study(tmp_path_factory):
    """``(folder, runs, config, workspace)`` of one small text study per session: two lm_tiny runs (seeds 0
    and 1, 12 steps, checkpoints step0/1/2/6/12) studied end to end. Read it; write outputs elsewhere (out=)."""
    from conceptevo.models.train_lm import train_text
    from conceptevo.pipeline import run_study

    tmp = tmp_path_factory.mktemp("textstudy")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = []
    for seed in (0, 1):
        train_text(tmp / f"run{seed}", corpus="generated", seed=seed, **TEXT_SMALL)
        runs.append(tmp / f"run{seed}")
    config = text_study_config(tmp, runs)
    ws = run_study(config, progress=False)
    torch.set_num_threads(before)
    return tmp, runs, config, ws
