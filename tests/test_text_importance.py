"""Importance for a target next token and its reversion evaluation, against brute force on a tiny LM."""
import json

import numpy as np
import pytest
import torch

from conceptevo.data.base import Subset
from conceptevo.data.text import CharTokenizer, TextWindows, generated_text
from conceptevo.errors import ConceptEvoError, DatasetError
from conceptevo.hooks import eval_mode
from conceptevo.importance import ReversionResult, bin_labels, combine_reversion
from conceptevo.importance.reversion import reversion_counts
from conceptevo.importance.targets import (TargetOccurrences, evaluate_target_reversion, next_token_outputs,
                                           parse_target, parse_targets, target_importance)
from conceptevo.models.lm import TinyLM

LAYERS = ["blocks.0.mlp.act", "blocks.1.mlp.act"]
CONTEXT = 12


@pytest.fixture(scope="module")
def windows():
    text = generated_text(60, seed=3)
    tk = CharTokenizer.fit([text])
    return TextWindows(tk.encode_array(text), CONTEXT, stride=7, tokenizer=tk)  # overlapping windows


@pytest.fixture(scope="module")
def models(windows, one_thread_module):
    def lm(seed):
        torch.manual_seed(seed)
        return TinyLM(windows.tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=2, d_mlp=24,
                      context=CONTEXT).double().eval()

    return lm(0), lm(1)


def _tok(windows, ch):
    return windows.tokenizer.encode(ch)[0]


# ---------------------------------------------------------------- targets and occurrences
def test_parse_target(windows):
    tk = windows.tokenizer
    nl = _tok(windows, "\n")
    assert parse_target("newline", tk).ids == parse_target("\\n", tk).ids == (nl,)
    assert parse_target("newline", tk).name == "newline" and parse_target(":", tk).name == "':'"
    assert parse_target(":|.", tk).ids == tuple(sorted([_tok(windows, ":"), _tok(windows, ".")]))
    assert parse_target("space", tk).ids == parse_target(" ", tk).ids == (_tok(windows, " "),)
    upper = parse_target("upper", tk)
    assert {tk.token_str(i) for i in upper.ids} == {c for c in tk.chars if c.isupper()} and len(upper.ids) > 5
    assert upper.name == f"upper ({len(upper.ids)} tokens)" and upper.slug == "upper"
    assert [t.ids for t in parse_targets("newline,:|.,upper", tk)] == [(nl,), parse_target(":|.", tk).ids, upper.ids]
    # commas and bars: by name or escaped; a leading = takes the rest literally
    small = CharTokenizer("ab,|=")
    got = [t.ids for t in parse_targets("comma,\\,,pipe,\\|,a|b,=\\,,==", small)]
    c, bar, a_, b_, eq = (small.encode(ch)[0] for ch in ",|ab=")
    assert got == [(c,), (c,), (bar,), (bar,), tuple(sorted([a_, b_])), (c,), (eq,)]
    assert parse_target("a|b", small).slug == "au002bb" and parse_target("newline", tk).slug == "newline"


def test_bad_targets_are_clear_errors(windows):
    tk = windows.tokenizer
    bad = {"ab": r"'ab' is 2 tokens .*give a single token, or several as one set joined by \|",
           "=moon": "'moon' is 4 tokens", "Z": "'Z' is not in the study's vocabulary",
           "comma": "',' is not in the study's vocabulary", "\\x": "unknown escape", "a||b": "empty alternative",
           "digit": "class 'digit' has no token"}
    for spec, message in bad.items():
        with pytest.raises(ConceptEvoError, match=message):
            parse_target(spec, tk)
    with pytest.raises(ConceptEvoError, match="empty target"):
        parse_targets("a,,b", tk)
    small = CharTokenizer("abc")
    ab = TextWindows(small.encode_array("ab" * 20), 4, tokenizer=small)
    with pytest.raises(DatasetError, match="target 'c' is never the next token in the 9 windows"):
        TargetOccurrences(ab, parse_target("c", small))


def test_occurrences_are_every_true_next_token_of_the_target(windows):
    target = parse_target("e|:", windows.tokenizer)
    sub = Subset(windows, [1, 4, 5, 9])
    occ = TargetOccurrences(sub, target)
    want = [(w, p) for w in sub.indices for p in range(CONTEXT)
            if int(windows.tokens[w * windows.stride + p + 1]) in target.ids]
    assert list(zip(occ.window.tolist(), occ.position.tolist())) == want
    assert occ.classes == [target.name] and (occ.targets == 0).all() and occ.num_outputs == windows.tokenizer.vocab_size
    x, label, i = occ[3]
    w, p = want[3]
    assert label == 0 and i == 3
    assert x[:CONTEXT].tolist() == windows[int(w)][0].tolist() and x[CONTEXT] == p
    assert x[CONTEXT + 1] == windows[int(w)][1][p] == occ.next_token[3]
    # the last position's true next token lies just past the window's end
    last = [k for k, (_, q) in enumerate(want) if q == CONTEXT - 1]
    assert all(occ.next_token[k] == windows.tokens[occ.window[k] * windows.stride + CONTEXT] for k in last)


# ---------------------------------------------------------------- the adapter
def test_adapter_outputs_the_true_tokens_log_probability_in_column_zero(windows, models):
    m = models[0]
    occ = TargetOccurrences(windows, parse_target("upper", windows.tokenizer))
    x, _ = occ.batch(np.arange(6))
    before = {k: dict(getattr(m, k)) for k in ("_forward_hooks", "_forward_pre_hooks")}
    with torch.no_grad():
        plain = m(x[:, :CONTEXT])
        with next_token_outputs(m):
            out = m(x)
        again = m(x[:, :CONTEXT])
    for r in range(6):
        p, tok = int(x[r, CONTEXT]), int(x[r, CONTEXT + 1])
        lp = torch.log_softmax(plain[r, p], -1)
        assert out[r, 0] == lp[tok]
        assert torch.equal(torch.sort(out[r]).values, torch.sort(lp).values)  # a permutation
    assert torch.equal(plain, again)
    assert {k: dict(getattr(m, k)) for k in ("_forward_hooks", "_forward_pre_hooks")} == before
    with pytest.raises(RuntimeError, match="boom"), next_token_outputs(m):
        raise RuntimeError("boom")
    assert not m._forward_hooks and not m._forward_pre_hooks
    with next_token_outputs(m), pytest.raises(ConceptEvoError, match="takes next-token occurrences"):
        m(torch.zeros(2, 2, dtype=torch.int64))


# ---------------------------------------------------------------- brute force
def _maps(model, ids, layers, grad_of=None):
    """The layers' outputs [T, C] on one window; with grad_of=(p, tok), also d log p(tok at p) / d output."""
    mods = dict(model.named_modules())
    store, handles = {}, []
    for n in layers:
        def hook(_m, _i, out, n=n):
            store[n] = out  # kept in the graph: the gradient is the total derivative, through later layers too
        handles.append(mods[n].register_forward_hook(hook))
    try:
        with torch.set_grad_enabled(grad_of is not None):
            logits = model(ids[None])[0]
        grads = None
        if grad_of is not None:
            p, tok = grad_of
            lp = torch.log_softmax(logits[p], -1)[tok]
            grads = dict(zip(layers, torch.autograd.grad(lp, [store[n] for n in layers])))
    finally:
        for h in handles:
            h.remove()
    return {n: store[n].detach()[0] for n in layers}, (None if grads is None else {n: g[0] for n, g in grads.items()})


def test_sensitivities_equal_a_per_occurrence_per_unit_loop(windows, models):
    m_from, m_to = models
    imp, occ = target_importance(m_from, m_to, windows, "e|newline", layers=LAYERS, num_occurrences=9, seed=2,
                                 batch_size=4, progress=False)
    assert imp.num_images == 9 and set(imp.image_indices) <= set(range(len(occ)))
    for row, i in enumerate(imp.image_indices):
        w, p, tok = int(occ.window[i]), int(occ.position[i]), int(occ.next_token[i])
        ids = windows[w][0]
        z_from, g = _maps(m_from, ids, LAYERS, grad_of=(p, tok))
        z_to, _ = _maps(m_to, ids, LAYERS)
        col = 0
        for n in LAYERS:
            for c in range(z_from[n].shape[-1]):  # one unit at a time: its whole token map
                s = float((g[n][:, c] * (z_to[n][:, c] - z_from[n][:, c])).sum())
                assert imp.sensitivities[row, col] == pytest.approx(s, rel=1e-4, abs=1e-9)
                col += 1
            assert (g[n][p + 1:] == 0).all()  # causal: later tokens cannot change the prediction at p
    np.testing.assert_array_equal(imp.scores, (imp.sensitivities > 0).mean(axis=0).astype(np.float32))
    assert 0 < imp.scores.mean() < 1


def test_reversion_counts_equal_a_per_variant_loop(windows, models):
    m_from, m_to = models
    occ = TargetOccurrences(windows, parse_target(":|e", windows.tokenizer))
    pos = np.arange(0, len(occ), max(1, len(occ) // 11))[:11]
    rng = np.random.default_rng(0)
    masks = {n: rng.random((5, 24)) < 0.4 for n in LAYERS}
    masks[LAYERS[0]][0] = False  # one variant reverts nothing: no change
    with eval_mode(m_from, m_to), torch.no_grad(), next_token_outputs(m_from, m_to):
        clean, rev, n = reversion_counts(m_from, m_to, occ, pos, masks, batch_size=4, log_loss=True)
        clean_d, rev_d, _ = reversion_counts(m_from, m_to, occ, pos, masks, batch_size=4, log_loss=True, fork=False)
        plain_clean, plain_rev, _ = reversion_counts(m_from, m_to, occ, pos, masks, batch_size=4)
    assert n == len(pos) and rev.shape == (2, 5, 3)
    np.testing.assert_allclose(rev, rev_d, rtol=1e-10)
    np.testing.assert_array_equal(rev[..., :2], plain_rev)  # the hits do not depend on measuring log-loss too
    np.testing.assert_array_equal(clean[:2], plain_clean)
    mods = dict(m_to.named_modules())
    ref = np.zeros((2, 5, 3))
    ref_clean = np.zeros(3)
    with torch.no_grad():
        for i in pos:
            w, p, tok = int(occ.window[i]), int(occ.position[i]), int(occ.next_token[i])
            ids = windows[w][0][None]

            def measure(logits):
                lp = torch.log_softmax(logits[0, p], -1)
                top = lp.topk(5).indices
                return np.array([float(top[0] == tok), float((top == tok).any()), -float(lp[tok])])

            ref_clean += measure(m_to(ids))
            z_from, _ = _maps(m_from, windows[w][0], LAYERS)
            for li, name in enumerate(LAYERS):
                for v in range(5):
                    keep = torch.as_tensor(masks[name][v])
                    h = mods[name].register_forward_hook(
                        lambda _m, _i, out, z=z_from[name], k=keep: torch.where(k, z, out[0])[None])
                    try:
                        ref[li, v] += measure(m_to(ids))
                    finally:
                        h.remove()
    np.testing.assert_allclose(clean, ref_clean, rtol=1e-10)
    np.testing.assert_allclose(rev, ref, rtol=1e-10)
    np.testing.assert_array_equal(rev[0, 0], clean)


def test_evaluate_target_reversion_adds_log_loss(windows, models, tmp_path):
    m_from, m_to = models
    held = Subset(windows, np.arange(0, len(windows), 5))
    res = evaluate_target_reversion(m_from, m_to, windows, held, "e", layers=LAYERS, num_occurrences=6, repeats=2,
                                    stage=("a", "b"), progress=False)
    assert res.metrics == ("top1", "top5", "logloss") and res.changes.shape == (1, 2, 2, 3, 2, 5)
    assert res.config["num_classes"] == windows.tokenizer.vocab_size  # chance of a top-1 hit: 1 / vocabulary
    assert np.isfinite(res.changes).all() and (res.clean[..., 2] > 0).all()
    back = ReversionResult.load(res.save(tmp_path / "r.npz"))
    assert back.metrics == res.metrics and np.array_equal(back.changes, res.changes)
    md = res.to_markdown()
    assert "| a -> b | train log-loss (lower is better) |" in md and "train log-loss: more important bin -> larger rise" in md
    rows = res.to_table()
    assert [(r["split"], r["metric"]) for r in rows][-1] == ("test", "logloss")
    res.plot_bars(tmp_path / "bars.png")
    untested = evaluate_target_reversion(m_from, m_to, windows, None, "e", layers=LAYERS, num_occurrences=6, repeats=2,
                                         stage=("a", "b"), progress=False)
    assert "No test rows for a -> b: not measured" in untested.to_markdown()
    assert len(untested.to_table()) == 3
    with pytest.raises(ConceptEvoError, match="different metrics"):
        plain = ReversionResult([0], res.layers, res.bins, res.changes[:, :, :, :2], res.clean[..., :2], res.num_images,
                                stage=("a", "b"))
        combine_reversion([res, plain])


def _loss_table(bins, random, noise=0.002, classes=3, repeats=4, seed=0):
    """A result built to a known truth: the log-loss rows' changes are the given means plus noise."""
    rng = np.random.default_rng(seed)
    means = np.array(list(bins) + [random])
    changes = np.zeros((classes, repeats, 2, 3, 2, len(means)))
    changes[..., 0, :, :] = -means  # top-1 falls where the loss rises
    changes[..., 2, :, :] = means + noise * rng.standard_normal((classes, repeats, 2, 2, len(means)))
    clean = np.full((classes, repeats, 2, 3), 0.6)
    return ReversionResult(list(range(classes)), ["l0", "l1"], bin_labels(len(bins)) + ["random"], changes, clean,
                           np.full((classes, repeats, 2), 64), stage=("a", "b"), config={"num_classes": 60},
                           metrics=("top1", "top5", "logloss"))


def test_log_loss_verdicts_read_a_rise_as_a_cost():
    good = _loss_table([0.20, 0.12, 0.06, 0.01], 0.09).check_claim(metric="logloss")
    assert good["monotonic"].answer == good["random_between"].answer == "yes"
    assert "changes +0.200 / +0.120 / +0.060 / +0.010" in good["monotonic"].reason
    assert "0-25 minus 75-100 +0.19" in good["monotonic"].reason
    bad = _loss_table([-0.05, 0.12, 0.06, 0.01], 0.09).check_claim(metric="logloss")["monotonic"]
    assert bad.answer == "no" and "reverting 0-25 cost less than reverting 25-50" in bad.reason
    lowered = _loss_table([-0.10, -0.10, -0.10, -0.10], -0.10).check_claim(metric="logloss")["monotonic"]
    assert lowered.answer == "no" and "lowered log-loss (-0.100" in lowered.reason
    with pytest.raises(ConceptEvoError, match="'logloss' was not measured"):
        _loss_table([0.2] * 4, 0.1).__class__([0], ["l"], bin_labels(4) + ["random"], np.zeros((1, 2, 2, 2, 1, 5)),
                                               np.ones((1, 2, 2, 2)), np.ones((1, 2, 2))).check_claim(metric="logloss")


# ---------------------------------------------------------------- the commands on a text workspace
@pytest.fixture(scope="module")
def text_demo(tmp_path_factory):
    from conceptevo.demo_text import run_text_demo

    before = torch.get_num_threads()
    ws = run_text_demo(tmp_path_factory.mktemp("textdemo"), quick=True, progress=False)
    torch.set_num_threads(before)
    return ws


def test_cli_importance_and_evaluation_on_a_text_workspace(text_demo, capsys):
    from conceptevo.cli import main
    from conceptevo.importance import EvolutionImportance
    from conceptevo.workspace import Workspace

    ws = text_demo
    path = str(ws.path)
    assert main(["importance", path, "--model", "seed0", "--from", "step4", "--to", "step40", "--class", "newline",
                 "--images", "12", "--top", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "for next token newline (score = share of 12 of its" in out
    folder = ws.path / "importance" / "seed0" / "step4__step40" / "target-newline"
    imp = EvolutionImportance.load(folder / "importance.npz")
    assert imp.num_images == 12 and (folder / "evolutions.png").stat().st_size > 0
    assert (folder / "scores.csv").read_text().splitlines()[1].startswith("newline,1,")
    assert main(["evaluate-importance", path, "--model", "seed0", "--stages", "step4:step40", "--classes", "newline,:",
                 "--repeats", "2", "--images", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train log-loss (lower is better)" in out and "(newline; ':')" in out
    assert "step4 -> step40 test top-1: more important bin -> larger drop: cannot tell: not measured on this split" in out
    rec = Workspace(ws.path).manifest["stages"]["evaluation/seed0"]
    assert set(rec["claims_logloss"]["step4->step40"]["train"]) == {"monotonic", "random_between", "holds"}
    res = ReversionResult.load(ws.path / "evaluation" / "seed0" / "step4__step40.npz")
    assert res.class_indices == [0, 1] and res.metrics[-1] == "logloss" and np.isnan(res.changes[:, :, 1]).all()
    assert [t["name"] for t in res.config["targets"]] == ["newline", "':'"]
    # bad input: a target of two tokens, none given, auto stages the run does not reach
    assert main(["importance", path, "--model", "seed0", "--from", "step4", "--to", "step40", "--class", "AL"]) == 2
    assert "'AL' is 2 tokens" in capsys.readouterr().err
    assert main(["evaluate-importance", path, "--model", "seed0", "--stages", "step4:step40"]) == 2
    assert "--classes 'newline,upper,comma'" in capsys.readouterr().err


def test_auto_stages_for_text_follow_the_loss(text_demo, capsys):
    from conceptevo.cli import main
    from conceptevo.importance.commands import evaluate_command, loss_drop_shares

    ws = text_demo
    shares = loss_drop_shares(ws, "seed0", ws.dataset("train"))
    assert list(shares) == ws.tags("seed0") and shares["step0"] == 0 and max(shares.values()) == 1
    # the quick run's loss falls from 8% to 58% of its drop between step4 and step20: no checkpoint near 25%
    assert main(["evaluate-importance", str(ws.path), "--model", "seed0", "--classes", "newline", "--repeats", "2",
                 "--images", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint has share of the loss drop near 0.25" in err and "--stages step0:" in err
    r = evaluate_command(ws.path, "seed0", classes="newline", repeats=2, images=4, progress=False, milestones=(0.5, 1.0))
    assert r["stages"] == [("step20", "step40")]


def test_revert_with_model_t_as_the_source_under_the_adapter(windows, models):
    """revert() runs model t on model t''s input from inside its forward: the stripped ids are not stripped again."""
    from conceptevo.hooks import capture
    from conceptevo.importance import revert

    m_from, m_to = models
    occ = TargetOccurrences(windows, parse_target("e", windows.tokenizer))
    x, _ = occ.batch(np.arange(5))
    mask = np.arange(24) % 3 == 0
    with torch.no_grad(), next_token_outputs(m_from, m_to):
        with revert(m_to, LAYERS[1], mask, m_from):
            by_model = m_to(x)
        with capture(m_from, [LAYERS[1]], lambda _n, o: o.detach().clone()) as acts:
            m_from(x)
        with revert(m_to, LAYERS[1], mask, acts[LAYERS[1]]):
            by_tensor = m_to(x)
        clean = m_to(x)
    assert by_model.shape == (5, windows.tokenizer.vocab_size)
    assert torch.equal(by_model, by_tensor) and not torch.equal(by_model, clean)


def test_a_text_study_without_held_out_windows_is_told_what_evaluate_importance_will_measure(caplog):
    # text: evaluate-importance still runs (training occurrences only); images: it cannot, and is warned
    import logging
    from types import SimpleNamespace

    from conceptevo.config import DataConfig
    from conceptevo.preflight import check_test_split

    data = DataConfig(kind="text", corpus="generated", context=32, pool=50, seed=0)
    with caplog.at_level(logging.INFO):
        assert check_test_split(SimpleNamespace(data=data)) is None
    assert "training windows only" in caplog.text and "holdout = 0.2" in caplog.text
    assert "will not be possible" not in caplog.text
