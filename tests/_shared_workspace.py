"""One fabricated workspace per test session, shared by the diagnostics and alignment tests (it takes ~8 s)."""
from __future__ import annotations

import shutil
from pathlib import Path

_CACHE: dict[str, Path] = {}


def shared_workspace(tmp_path_factory) -> Path:
    """Path of a fabricated study (tests/fabricated.py) with an image embedding added; built once."""
    if "ws" not in _CACHE:
        import numpy as np

        from conceptevo.embedding import ImageEmbedding
        from fabricated import fabricate

        root = tmp_path_factory.mktemp("diag-ws")
        ws = fabricate(root, importance=False)
        # a stand-in image embedding (the fabricated study has none): a random vector for every image
        n = ws.manifest["data"]["num_images"]
        vec = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
        ImageEmbedding(vec, np.ones(n, dtype=bool), rmse=0.0).save(ws.path / "embedding" / "images")
        ws.finish("embedding/images", "fabricated", {}, rmse=0.0)
        _CACHE["ws"] = ws.path
    return _CACHE["ws"]


def fresh_copy(tmp_path, tmp_path_factory) -> Path:
    """A private copy of the shared workspace (for tests that write into it)."""
    src = shared_workspace(tmp_path_factory)
    dst = Path(tmp_path) / "study"
    shutil.copytree(src, dst)
    return dst
