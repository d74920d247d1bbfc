"""Every Python code block of README.md and docs/*.md runs, as written.

A block runs in a fresh namespace, in an empty temporary folder. A block that
needs objects a reader brings (their model, their dataset) names a context on
the line before its fence, which provides them::

    <!-- docs-test: context two-checkpoints -->

A block that cannot run as a test says why on that line; such blocks are
compiled only, and must stay rare::

    <!-- docs-test: illustrative: REASON -->

A walk-through section (README's "Your own model") is run as a whole by its
own test (tests/test_readme_own_model.py): its blocks that are files to write
(a model module, a training script, a study config) say so, and are only
compiled here; its shell blocks are the commands that test runs::

    <!-- docs-test: file mynet.py -->
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
HEADING = re.compile(r"^##\s+(.*?)\s*$")
MAX_ILLUSTRATIVE = 2
#: Sections whose blocks are run as a whole by a test of their own: (file, "## " heading) -> that test.
WALKTHROUGHS = {("README.md", "Your own model"): "tests/test_readme_own_model.py"}


def code_blocks(path: Path) -> list[dict]:
    """The fenced blocks of a markdown file: language, line, code, the docs-test marker before the fence,
    and the "## " section they are in."""
    lines = path.read_text().splitlines()
    out, i, section = [], 0, None
    while i < len(lines):
        h = HEADING.match(lines[i])
        if h:
            section = h.group(1)
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: a code fence is never closed")
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        mk = MARKER.match(prev.strip())
        out.append({"file": path.name, "line": start + 1, "lang": lang, "code": "\n".join(lines[start + 1:j]),
                    "marker": mk.group(1) if mk else None, "section": section})
        i = j + 1
    return out


def python_blocks(path: Path) -> list[dict]:
    """The ```python blocks of a markdown file: line, code, and the docs-test marker before the fence."""
    return [{k: b[k] for k in ("file", "line", "code", "marker", "section")}
            for b in code_blocks(path) if b["lang"] in ("python", "py")]


BLOCKS = [b for p in DOCS for b in python_blocks(p)]


# -- contexts: what a block's reader is assumed to hold ---------------------------------------------
def _two_checkpoints(request) -> dict:
    """One small CNN after 'epoch 1' and 'epoch 3' (weights moved in between) and a pool of generated images."""
    from conceptevo.data import open_dataset
    from conceptevo.models import build_model

    dataset = open_dataset("synthetic", n=240, size=32, seed=0)
    torch.manual_seed(0)
    model_e1 = build_model("vgg_like", in_channels=3, num_classes=len(dataset.classes), width=4).eval()
    model_e3 = build_model("vgg_like", in_channels=3, num_classes=len(dataset.classes), width=4).eval()
    model_e3.load_state_dict(model_e1.state_dict())
    with torch.no_grad():
        for p in model_e3.parameters():
            p.add_(0.3 * p.std().clamp_min(1e-3) * torch.randn_like(p))
    return {"dataset": dataset, "model_e1": model_e1, "model_e3": model_e3}


def _demo_study(request) -> dict:
    """A finished study at ./demo-out/study (the fabricated one, patches and an image embedding included),
    with tensorboard and wandb installed and wandb offline, its folders under the test's own."""
    import shutil

    import numpy as np

    import fabricated
    from conceptevo.embedding import ImageEmbedding
    from conceptevo.workspace import Workspace

    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch = request.getfixturevalue("monkeypatch")
    here = Path.cwd()
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DIR", "runs")):
        monkeypatch.setenv(var, str(here / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    # the block leaves the run it opened open (a reader finishes it later); finish it, or the next
    # wandb.init of this process (tests/test_exports.py) is handed that same run
    request.addfinalizer(lambda: wandb.run is not None and wandb.finish())
    src = fabricated.shared(request.getfixturevalue("tmp_path_factory")).path
    dst = here / "demo-out" / "study"
    shutil.copytree(src, dst)
    ws = Workspace(dst)
    n = ws.manifest["data"]["num_images"]
    ImageEmbedding(np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32), np.ones(n, dtype=bool),
                   rmse=0.0).save(ws.path / "embedding" / "images")
    ws.finish("embedding/images", "fabricated", {}, rmse=0.0)
    return {}


CONTEXTS = {"two-checkpoints": _two_checkpoints, "demo-study": _demo_study}


def _kind(marker: str | None) -> tuple[str, str | None]:
    if marker is None:
        return "run", None
    m = re.fullmatch(r"context\s+([\w-]+)", marker)
    if m:
        return "context", m.group(1)
    m = re.fullmatch(r"illustrative:\s*(\S.*)", marker)
    if m:
        return "illustrative", m.group(1)
    m = re.fullmatch(r"file\s+([\w.-]+(?:/[\w.-]+)*)", marker)
    if m:
        return "file", m.group(1)
    return "bad", marker


def test_the_docs_have_python_blocks_and_every_marker_is_known():
    assert any(b["file"] == "README.md" for b in BLOCKS), "README.md lost its Python example"
    for b in BLOCKS:
        kind, arg = _kind(b["marker"])
        assert kind != "bad", f"{b['file']}:{b['line']}: unknown docs-test marker {arg!r}"
        if kind == "context":
            assert arg in CONTEXTS, f"{b['file']}:{b['line']}: no docs-test context {arg!r}; known: {sorted(CONTEXTS)}"
        if kind == "file":  # only where a walk-through test writes and runs it
            assert (b["file"], b["section"]) in WALKTHROUGHS, (
                f"{b['file']}:{b['line']}: a 'file' block outside a walk-through section "
                f"({', '.join(f'{f} {s!r}' for f, s in WALKTHROUGHS)}) would never run")
    illustrative = [b for b in BLOCKS if _kind(b["marker"])[0] == "illustrative"]
    assert len(illustrative) <= MAX_ILLUSTRATIVE, (
        f"{len(illustrative)} Python blocks are marked illustrative (at most {MAX_ILLUSTRATIVE}): "
        + ", ".join(f"{b['file']}:{b['line']}" for b in illustrative) + "; make them runnable")


def test_the_block_reader_finds_fences_markers_and_contexts(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```sh\nls\n```\n<!-- docs-test: context two-checkpoints -->\n```python\na = 1\n```\n"
                   "```py\nb = 2\n```\n<!-- docs-test: illustrative: needs a GPU -->\n\n```python\nc = 3\n```\n")
    got = python_blocks(doc)
    assert [(b["line"], b["code"], b["marker"]) for b in got] == [
        (7, "a = 1", "context two-checkpoints"), (10, "b = 2", None), (15, "c = 3", "illustrative: needs a GPU")]
    assert [_kind(b["marker"]) for b in got] == [("context", "two-checkpoints"), ("run", None),
                                                 ("illustrative", "needs a GPU")]
    doc.write_text("# t\n## One\n```sh\nls\n```\n## Two\n<!-- docs-test: file src/net.py -->\n```toml\nx = 1\n```\n")
    assert [(b["lang"], b["section"], _kind(b["marker"])) for b in code_blocks(doc)] == [
        ("sh", "One", ("run", None)), ("toml", "Two", ("file", "src/net.py"))]
    assert python_blocks(doc) == []
    doc.write_text("```python\nx = 1\n")
    with pytest.raises(AssertionError, match="never closed"):
        python_blocks(doc)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b['file']}:{b['line']}" for b in BLOCKS])
def test_python_block_runs(block, tmp_path, monkeypatch, request):
    kind, arg = _kind(block["marker"])
    code = compile(block["code"], f"{block['file']}:{block['line']}", "exec")
    if kind in ("illustrative", "file"):
        return  # compiled above: at least its syntax is checked (a file block runs in its walk-through's test)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    if kind == "context":
        namespace.update(CONTEXTS[arg](request))
    exec(code, namespace)
