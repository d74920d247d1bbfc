"""A study on text: [data] kind = "text", two small lm_tiny runs, run_study end to end, contexts checked by brute force."""
import html
import json

import numpy as np
import pytest

from conceptevo.config import StudyConfig
from conceptevo.contexts import (context_html, context_strings, load_contexts, require_images, token_contexts,
                                 workspace_tokenizer)
from conceptevo.data import open_dataset
from conceptevo.data.base import Subset
from conceptevo.data.text import CharTokenizer, TextWindows
from conceptevo.errors import ConceptEvoError, DatasetError
from conceptevo.models.train_lm import load_lm_folder
from text_reference import reference_text_stimuli

@pytest.fixture(scope="module")
def study(text_study):
    return text_study


def test_run_study_on_text_writes_every_stage(study):
    _, _, _, ws = study
    stages = ws.manifest["stages"]
    for m in ("s0", "s1"):
        assert ws.tags(m) == ["step0", "step1", "step2", "step6", "step12"]
        for t in ws.tags(m):
            for kind in ("stimuli", "projection", "contexts"):
                assert f"{kind}/{m}/{t}" in stages
    for name in ("embedding/neurons", "embedding/images", "layout", "figures"):
        assert name in stages
    assert not any(n.startswith("patches/") for n in stages)
    for f in ("space.png", "groups.png", "contexts.png", "contexts.html"):
        assert (ws.figures_dir / f).stat().st_size > 0
    # the sanity check is next-token accuracy against the most frequent next token's share
    rec = ws.sanity_record("s0")
    assert rec["images"] == 150 * 32 and 0 < rec["chance"] < rec["top1"]


def test_stimuli_and_contexts_match_brute_force(study):
    tmp, runs, config, ws = study
    pool = ws.images()
    st = ws.stimuli("s1", "step6", mmap=False)
    sub = sorted(set(int(i) for i in np.asarray(st.indices).ravel()))
    # the pool the study used: every stimulus is in it; recompute the reference on the whole pool
    from conceptevo.study import study_pool
    p = study_pool(config.data)
    assert isinstance(p, Subset) and set(sub) <= set(p.indices.tolist())
    model = load_lm_folder(runs[1] / "step6")
    ref = reference_text_stimuli(model, "blocks.1.mlp.act", [pool[int(i)] for i in p.indices], 5)
    rows = [i for i, n in enumerate(st.neuron_ids) if n.startswith("blocks.1.mlp.act")]
    ctx = load_contexts(ws, "s1", "step6")
    assert ctx.shape == (len(st), 5, 21)
    for c, row in enumerate(rows):
        assert st.indices[row].tolist() == [int(p.indices[w]) for w, _, _ in ref[c]]
        assert st.positions[row].tolist() == [q for _, q, _ in ref[c]]
        for j, (w, q, _) in enumerate(ref[c]):
            window = pool[int(p.indices[w])][0].tolist()
            start = pool.start(int(p.indices[w]))
            want = [window[q + d] if q + d >= 0 else -1 for d in range(-10, 1)]
            want += [int(pool.tokens[start + q + d]) if start + q + d < len(pool.tokens) else -1 for d in range(1, 11)]
            assert ctx[row, j].tolist() == want
    # the tokenizer saved in the workspace decodes the contexts as the study's own
    tk = workspace_tokenizer(ws)
    assert tk.decode([int(t) for t in pool[0][0]]) == pool.tokenizer.decode(pool[0][0].tolist())


def test_image_only_steps_say_so(study):
    ws = study[3]
    with pytest.raises(ConceptEvoError, match="not available for text studies"):
        require_images(ws, "example patches")


def test_token_contexts_by_hand():
    tokens = np.arange(100, 130)
    ds = TextWindows(tokens, context=6, stride=4)   # window w starts at 4w
    got = token_contexts(ds, np.array([[0, 2], [5, 1]]), np.array([[0, 5], [2, 3]]), width=3)
    assert got[0, 0].tolist() == [-1, -1, -1, 100, 101, 102, 103]       # nothing before the window
    assert got[0, 1].tolist() == [110, 111, 112, 113, 114, 115, 116]    # window 2 = 108..113, argmax 113; 114.. past it
    assert got[1, 0].tolist() == [-1, 120, 121, 122, 123, 124, 125]
    assert got[1, 1].tolist() == [104, 105, 106, 107, 108, 109, 110]
    near_end = token_contexts(ds, np.array([len(ds) - 1]), np.array([5]), width=5)[0]  # stream 25; the stream ends at 29
    assert near_end.tolist() == [120, 121, 122, 123, 124, 125, 126, 127, 128, 129, -1]
    with pytest.raises(ConceptEvoError, match="outside the window"):
        token_contexts(ds, np.array([0]), np.array([6]))


def test_contexts_are_escaped():
    tk = CharTokenizer.fit(["<b>&\n'x\"$"])
    ids = tk.encode("<b>&\n'x\"$")
    row = np.array([-1] + ids[:4] + ids[4:5] + ids[5:] + [-1])  # 11 = 2 * 5 + 1: the newline in the middle
    before, tok, after = context_strings(tk, row)
    assert (before, tok, after) == ("<b>&", "\u23ce", "'x\"$")
    out = context_html(tk, row)
    assert "<b>" not in out and html.unescape(out.replace("<mark>", "").replace("</mark>", "")) == "<b>&\u23ce'x\"$"


def test_text_config_errors(tmp_path):
    base = {"study": {"out": str(tmp_path)}, "models": [{"name": "a", "arch": "lm_tiny", "checkpoints": "x"}]}
    with pytest.raises(ConceptEvoError, match="only apply to kind"):
        StudyConfig.from_dict({**base, "data": {"kind": "synthetic", "corpus": "generated"}})
    with pytest.raises(ConceptEvoError, match="exactly one of path"):
        StudyConfig.from_dict({**base, "data": {"kind": "text"}})
    with pytest.raises(ConceptEvoError, match="shakespeare"):
        StudyConfig.from_dict({**base, "data": {"kind": "text", "corpus": "hamlet"}})
    with pytest.raises(DatasetError, match="no 'test' split"):
        open_dataset("text", corpus="generated", split="test")
    with pytest.raises(DatasetError, match="no image option"):
        open_dataset("text", corpus="generated", resize=8)


def test_text_folder_with_a_saved_tokenizer(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("hello world\n" * 20)
    tk = CharTokenizer.fit(["hello world\nxyz"])
    tk.save(tmp_path / "tok.json")
    ds = open_dataset("text", tmp_path / "t", tokenizer=str(tmp_path / "tok.json"), context=8, stride=4)
    assert ds.tokenizer.vocab_size == tk.vocab_size and ds.context == 8 and ds.stride == 4
    assert ds.tokenizer.decode(ds[0][0].tolist()) == "hello wo"


def test_image_only_commands_refuse_text_workspaces(study):
    from conceptevo.importance.commands import importance_command
    from conceptevo.patches import compute_patches
    from conceptevo.report import make_figures

    ws = study[3]
    with pytest.raises(ConceptEvoError, match="example patches is not available for text"):
        compute_patches(ws, progress=False)
    # importance works on text (tests/test_text_importance.py): a class is a target next token, which must be one token
    with pytest.raises(ConceptEvoError, match="'ab' is 2 tokens"):
        importance_command(ws.path, "s0", "step0", "step12", "ab", progress=False)
    # the report's figures on a text workspace are the text figures
    paths = make_figures(ws, out=ws.path / "again", formats=("png",))
    assert {p.name for p in paths} == {"space.png", "groups.png", "contexts.png", "contexts.html"}


def test_cli_train_text_and_quick_text_demo(tmp_path, capsys):
    from conceptevo.cli import main
    from conceptevo.models.train_lm import step_folders

    assert main(["train", "--text", "--corpus", "generated", "--steps", "4", "--every", "2", "--context", "16",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert [s for s, _ in step_folders(tmp_path / "run")] == [0, 1, 2, 4]
    assert (tmp_path / "run" / "tokenizer.json").exists()
    assert main(["demo", "--text", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    ws_dir = tmp_path / "demo" / "workspace"
    manifest = json.loads((ws_dir / "manifest.json").read_text())
    assert {"layout", "figures", "contexts/seed1/step40"} <= set(manifest["stages"])
    for f in ("space.png", "groups.png", "contexts.png", "contexts.html"):
        assert (ws_dir / "figures" / f).stat().st_size > 0
    assert "contexts.html" in capsys.readouterr().out


def test_explorer_neuron_api_gives_contexts(study):
    import threading
    import urllib.request
    from urllib.parse import urlencode

    from conceptevo.explorer import make_server

    ws = study[3]
    server = make_server(ws, port=0, kmeans=4)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        st = ws.stimuli("s0", "step12")
        nid = st.neuron_ids[7]
        q = urlencode({"model": "s0", "tag": "step12", "id": nid})
        got = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/api/neuron?{q}").read())
    finally:
        server.shutdown()
        server.server_close()
    tk = workspace_tokenizer(ws)
    ctx = load_contexts(ws, "s0", "step12")[7]
    assert got["patches"] is None and len(got["contexts"]) == 5
    assert [tuple(c.values()) for c in got["contexts"]] == [context_strings(tk, r) for r in ctx]
