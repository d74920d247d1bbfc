"""Text studies in the groups figure, the static explorer export, the TensorBoard projector and the W&B tables:
contexts instead of patches, and text that can never break a figure, a page or a TSV."""
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from conceptevo.contexts import context_strings, draw_context_line, load_contexts, workspace_tokenizer
from conceptevo.report import analysis
from test_explorer import browser, page, wait_ready  # noqa: F401  (fixtures)

NASTY = ["</script><script>alert(1)</script>", "$\\frac{ x$", "\n", "<!--", "a\tb", "&amp;", "'\"", "x"]


class NastyTokenizer:
    """Every token id decodes to one of :data:`NASTY`: markup, mathtext, newlines, tabs, entities, quotes."""

    vocab_size = len(NASTY)

    def token_str(self, i):
        return NASTY[int(i) % len(NASTY)]


def _shown(before, tok, after):
    return f"{before}[{tok}]{after}"


# ------------------------------------------------------------------------------------------------ figures
def test_a_context_line_is_drawn_as_it_is():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    draw_context_line(ax, 0.5, "<script><b>$\\frac{ x", "$", "\u23ce$y$ and more", chars=12)
    fig.canvas.draw()            # mathtext would raise on "$\frac{ x$"
    assert [t.get_text() for t in ax.texts] == ["$", "<b>$\\frac{ x", "\u23ce$y$ and more"[:12]]
    assert not any(t.get_parse_math() for t in ax.texts)


def test_text_groups_figure_shows_each_group_units_contexts(text_study, tmp_path):
    from conceptevo.report.text import plot_text_groups

    ws = text_study[3]
    tk = workspace_tokenizer(ws)
    vectors = analysis.unified_vectors(ws)
    fig = plot_text_groups(ws, tmp_path / "groups.png", groups=2, per_model=2, k=4, contexts_shown=2, chars=8,
                           vectors=vectors)
    assert (tmp_path / "groups.png").stat().st_size > 0
    labels, _ = analysis.kmeans_groups(vectors, k=4, seed=0)
    panels = [ax for ax in fig.axes if ax.texts]
    assert len(panels) == 2 * 2                                  # 2 groups x 2 models
    seen = 0
    for ax in panels:
        texts = [t.get_text() for t in ax.texts]
        assert len(texts) % 7 == 0                               # per unit: its id, then 2 x (token, before, after)
        group = set()
        for u in range(0, len(texts), 7):
            nid = texts[u]
            model = next(m for m in ws.models if ax.get_subplotspec().colspan.start == ws.models.index(m))
            tag = ws.tags(model)[-1]
            row = ws.stimuli(model, tag).neuron_ids.index(nid)
            group.add(int(labels[(model, tag)][row]))
            for j, c in enumerate(load_contexts(ws, model, tag)[row][:2]):
                before, tok, after = context_strings(tk, c)
                assert texts[u + 1 + 3 * j:u + 4 + 3 * j] == [tok, before[-8:] if len(before) > 8 else before, after[:8]]
            seen += 1
        assert len(group) == 1                                   # one K-means group per panel
    assert seen == 8


# ------------------------------------------------------------------------------------------------ explorer
def _script_obj(raw: bytes, key: str):
    text = raw.decode()
    prefix = f"window.__ceLoad({json.dumps(key)},"
    assert text.startswith(prefix) and text.rstrip().endswith(");")
    return json.loads(text[len(prefix):text.rstrip().rindex(")")].replace("<\\!--", "<!--"))


def test_static_export_carries_every_units_contexts(text_study, tmp_path):
    from conceptevo.explorer import ExplorerData, export_site

    ws = text_study[3]
    tk = workspace_tokenizer(ws)
    data = ExplorerData(ws, kmeans=4, public=True)
    export_site(ws, tmp_path / "site", data=data)
    for mi, m in enumerate(ws.models):
        ti = len(ws.tags(m)) - 1
        key = f"stim-{mi}-{ti}"
        got = _script_obj((tmp_path / "site" / "data" / f"{key}.js").read_bytes(), key)["contexts"]
        want = [[list(context_strings(tk, c)) for c in unit] for unit in load_contexts(ws, m, ws.tags(m)[-1])]
        assert got == want
    page = (tmp_path / "site" / "index.html").read_text()
    assert "st.contexts" in page and "createTextNode(x[0])" in page   # shown as text nodes, never as HTML


def test_explorer_context_data_cannot_break_out_of_its_script(text_study, monkeypatch):
    import conceptevo.contexts as contexts
    from conceptevo.explorer import ExplorerData

    ws = text_study[3]
    monkeypatch.setattr(contexts, "workspace_tokenizer", lambda ws: NastyTokenizer())
    raw = ExplorerData(ws, kmeans=4).script("stim-0-0")
    assert b"</script" not in raw.lower() and b"<!--" not in raw
    got = _script_obj(raw, "stim-0-0")["contexts"]
    ctx = load_contexts(ws, ws.models[0], ws.tags(ws.models[0])[0])
    assert got == [[list(context_strings(NastyTokenizer(), c)) for c in unit] for unit in ctx]
    assert any("</script>" in "".join(c) for unit in got for c in unit)     # the text itself survives
    assert not any("\n" in s for unit in got for c in unit for s in c)       # newlines are marks


# ------------------------------------------------------------------------------------------------ exports
def _expected(ws, tk, m, t):
    """Brute force: each unit's commonest argmax tokens (ties: lower id first) and its strongest context."""
    ctx = load_contexts(ws, m, t)
    out = []
    for unit in ctx:
        counts = Counter(int(c[len(c) // 2]) for c in unit)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        names = [context_strings(tk, np.array([i]))[1].replace(" ", "\u2423") for i, _ in ranked]   # spaces as a mark
        out.append((names[0], ", ".join(f"{n} {k}" for n, (_, k) in zip(names, ranked)),
                    _shown(*context_strings(tk, unit[0]))))
    return out


def test_tensorboard_export_gives_text_units_token_and_context_columns(text_study, tmp_path):
    pytest.importorskip("tensorboard")
    from google.protobuf import text_format
    from tensorboard.plugins.projector import ProjectorConfig

    from conceptevo.exports.projector import TEXT_UNIT_COLUMNS, export_tensorboard

    ws = text_study[3]
    tk = workspace_tokenizer(ws)
    export_tensorboard(ws, tmp_path / "tb")
    config = ProjectorConfig()
    text_format.Parse((tmp_path / "tb" / "projector_config.pbtxt").read_text(), config)
    emb = {e.tensor_name: e for e in config.embeddings}
    assert "images" not in emb and "units: all checkpoints" in emb
    assert all(not e.sprite.image_path for e in emb.values())            # no pictures: dots
    m, t = "s1", "step6"
    lines = (tmp_path / "tb" / emb[f"units: {m} {t}"].metadata_path).read_text().rstrip("\n").split("\n")
    assert lines[0].split("\t") == TEXT_UNIT_COLUMNS
    rows = [dict(zip(TEXT_UNIT_COLUMNS, line.split("\t"))) for line in lines[1:]]
    ids = ws.stimuli(m, t).neuron_ids
    assert [r["unit"] for r in rows] == list(ids) and {r["step"] for r in rows} == {"6"}
    clean = lambda s: " ".join(s.split())  # noqa: E731  (a TSV cell holds no tabs or line breaks)
    for r, (top, tops, line) in zip(rows, _expected(ws, tk, m, t)):
        assert (r["top_token"], r["top_tokens"], r["top_context"]) == (clean(top) or "?", clean(tops) or "?", clean(line))


def test_tensorboard_metadata_of_nasty_contexts_stays_one_row_per_unit(text_study, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import conceptevo.contexts as contexts
    from conceptevo.exports.projector import TEXT_UNIT_COLUMNS, export_tensorboard

    ws = text_study[3]
    monkeypatch.setattr(contexts, "workspace_tokenizer", lambda ws: NastyTokenizer())
    export_tensorboard(ws, tmp_path / "tb", combined=False)
    m, t = ws.models[0], ws.tags(ws.models[0])[0]
    lines = (tmp_path / "tb" / "units" / m / t / "metadata.tsv").read_text().rstrip("\n").split("\n")
    assert len(lines) == 1 + len(ws.stimuli(m, t))
    assert all(len(line.split("\t")) == len(TEXT_UNIT_COLUMNS) for line in lines)


def test_wandb_tables_give_text_units_their_contexts(text_study):
    from conceptevo.exports.wandb_export import TEXT_UNIT_COLUMNS, unit_tables

    ws = text_study[3]
    tk = workspace_tokenizer(ws)
    fake = SimpleNamespace(Table=lambda columns, data: (columns, data), Image=None)   # no wandb process needed
    tables = unit_tables(ws, fake)
    assert set(tables) == {f"units/{m}/{t}" for m in ws.models for t in ws.tags(m)}
    cols, rows = tables["units/s0/step12"]
    assert cols == TEXT_UNIT_COLUMNS
    c = {name: j for j, name in enumerate(cols)}
    assert {r[c["step"]] for r in rows} == {12}
    for r, (top, tops, line) in zip(rows, _expected(ws, tk, "s0", "step12")):
        assert (r[c["top_token"]], r[c["top_tokens"]], r[c["top_context"]]) == (top, tops, line)


def test_static_text_export_shows_contexts_as_text_in_a_browser(text_study, tmp_path, monkeypatch, page):  # noqa: F811
    """From file://, selecting a unit lists its contexts; markup in them is shown as text, never run or parsed."""
    import conceptevo.contexts as contexts
    from conceptevo.explorer import ExplorerData, export_site

    ws = text_study[3]
    monkeypatch.setattr(contexts, "workspace_tokenizer", lambda ws: NastyTokenizer())
    index = export_site(ws, tmp_path / "site", data=ExplorerData(ws, kmeans=4, public=True))
    m = ws.models[0]
    tag = ws.tags(m)[-1]
    nid = ws.stimuli(m, tag).neuron_ids[3]
    page.goto(index.as_uri() + f"?panels={m}")
    wait_ready(page)
    page.evaluate(f"window.__conceptevo.select({json.dumps(m)}, {json.dumps(nid)})")
    page.wait_for_selector("#tab-neuron ol li mark")
    items = page.evaluate("[...document.querySelectorAll('#tab-neuron ol li')].map(li => "
                          "[li.childNodes[0].textContent, li.querySelector('mark').textContent, li.childNodes[2].textContent])")
    want = [list(context_strings(NastyTokenizer(), c)) for c in load_contexts(ws, m, tag)[3]]
    assert items == want
    # across training: the unit's strongest context at every checkpoint
    page.wait_for_function(f"document.querySelectorAll('#trajrows .row mark').length === {len(ws.tags(m))}")
    rows = page.evaluate("[...document.querySelectorAll('#trajrows .row .ctx')].map(s => s.textContent)")
    assert rows == ["".join(context_strings(NastyTokenizer(), load_contexts(ws, m, t)[3][0])) for t in ws.tags(m)]
    assert page.evaluate("document.querySelectorAll('#tab-neuron script, #tab-neuron b').length") == 0
    # hovering a unit shows its strongest context, not a missing-patches note
    page.evaluate("window.__conceptevo.setStep(0)")
    page.wait_for_timeout(200)
    row = page.evaluate("window.__conceptevo.isolated(0, 4)")
    pos = page.evaluate(f"window.__conceptevo.screenPos(0, {row})")
    page.mouse.move(pos["x"] + 1, pos["y"])
    page.wait_for_selector("#tooltip:not([hidden]) .tc mark")
    first = ws.tags(m)[0]
    want = "".join(context_strings(NastyTokenizer(), load_contexts(ws, m, first)[row][0]))
    assert page.evaluate("document.querySelector('#tooltip .tc').textContent") == want
    assert "no patches" not in page.evaluate("document.getElementById('tooltip').textContent")
    assert page.errors == []


def test_explorer_meta_of_a_text_study_asks_for_no_patches(text_study):
    from conceptevo.explorer import ExplorerData

    ws = text_study[3]
    data = ExplorerData(ws, kmeans=4)
    meta = data.meta()
    assert meta["text"] is True and not any(x["what"] == "patches" for x in meta["missing"])
    tk = workspace_tokenizer(ws)
    top = data.checkpoint(1, 2)["top"]
    assert top == [list(context_strings(tk, unit[0])) for unit in load_contexts(ws, "s1", ws.tags("s1")[2])]


def test_wandb_diagnostics_of_a_text_study_are_against_the_step_with_the_loss(text_study):
    from conceptevo.diagnostics import diagnose
    from conceptevo.exports.wandb_export import DIAGNOSTICS_COLUMNS, log_diagnostics

    ws = text_study[3]

    class Run:
        def __init__(self):
            self.logged, self.defined = [], []

        def define_metric(self, name, step_metric=None):
            self.defined.append((name, step_metric))

        def log(self, row):
            self.logged.append(row)

    run = Run()
    fake = SimpleNamespace(Table=lambda columns, data: (columns, data))
    assert log_diagnostics(ws, run, fake) == 10
    assert ("s0/*", "s0/step") in run.defined
    d = diagnose(ws, write=False)
    got = [r for r in run.logged if "s1/step" in r]
    assert [r["s1/step"] for r in got] == [0, 1, 2, 6, 12]
    assert [r["s1/train_loss"] for r in got] == [c.metrics["train_loss"] for c in d.checkpoints["s1"]]
    cols, rows = run.logged[-1]["diagnostics"]
    assert cols == DIAGNOSTICS_COLUMNS
    r = next(r for r in rows if r[0] == "s0" and r[1] == "step6" and r[3] == "all")
    assert r[cols.index("step")] == 6 and r[cols.index("train_loss")] == d.checkpoints["s0"][3].metrics["train_loss"]
