"""Text studies in diagnose and evaluate-alignment: train loss per checkpoint, the context judge, argmax-token coherence."""
import csv
import zlib

import numpy as np
import pytest
from scipy.stats import binom

from conceptevo.alignment.evaluate import argmax_token_concepts, evaluate_alignment
from conceptevo.alignment.intruder import (CHAR_CLASSES, char_class, context_features, description_matrix,
                                           intruder_test, judge_task, neuron_description)
from conceptevo.contexts import load_contexts, workspace_tokenizer
from conceptevo.diagnostics import diagnose
from conceptevo.errors import ConceptEvoError
from conceptevo.models.train_lm import loss_at_step, run_losses


# ------------------------------------------------------------------------------------------------ the judge
def test_char_classes_by_hand():
    got = [CHAR_CLASSES[char_class(c)] for c in ["A", "z", "7", " ", "\t", "\n", ":", "$", "é", "\u00a0", ""]]
    assert got == ["upper", "lower", "digit", "space", "space", "newline", "punctuation", "punctuation", "lower",
                   "space", "none"]


def test_context_features_by_hand():
    f = context_features(["", "a", "B", ":", " ", "x", ""], buckets=64, reach=6)
    b = lambda s: zlib.crc32(s.encode()) % 64  # noqa: E731
    assert np.flatnonzero(f["token"]).tolist() == [b(":")]
    assert f["neighbours"][b("B")] == 1 and f["neighbours"][64 + b(" ")] == 1 and f["neighbours"].sum() == 2
    classes = f["classes"].reshape(3, len(CHAR_CLASSES))
    assert [CHAR_CLASSES[int(np.argmax(r))] for r in classes] == ["punctuation", "upper", "space"]
    want = np.zeros(64)
    for g in ("aB:", "B: ", ": x"):        # the text "aB: x": three trigrams
        want[b(g)] += 1 / 3
    assert np.allclose(f["ngrams"], want)
    start = context_features(["", "", "Q", "u", "e"], buckets=64)   # nothing before: class "none"
    assert CHAR_CLASSES[int(np.argmax(start["classes"].reshape(3, -1)[1]))] == "none"
    with pytest.raises(ConceptEvoError, match="odd number"):
        context_features(["a", "b"])


def _unit(rng, centre, n=8):
    """n random contexts (width 3) of lower-case letters around ``centre``."""
    letters = list("abcdefghijklmnopqrstuvwxyz ")
    return [[str(rng.choice(letters)) for _ in range(3)] + [centre] + [str(rng.choice(letters)) for _ in range(3)]
            for _ in range(n)]


def test_judge_finds_the_odd_argmax_token():
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(20):
        units = [_unit(rng, ":") for _ in range(5)] + [_unit(rng, "a")]
        scores = judge_task(description_matrix([neuron_description(u, context_features) for u in units]))
        found += int(np.argmin(scores) == 5)
    assert found == 20


def test_intruder_test_on_contexts_groups_by_token_vs_random():
    """Groups that share an argmax token are told apart (AUC near 1); random groups are at chance."""
    rng = np.random.default_rng(1)
    tokens = [":", "a", "\n", "T", ",", "e"]
    groups = np.repeat(np.arange(len(tokens)), 10)
    units = [_unit(rng, tokens[g]) for g in groups]
    descs = [neuron_description(u, context_features) for u in units]
    res = intruder_test(groups, np.arange(len(groups)), lambda rows: description_matrix([descs[r] for r in rows]),
                        tasks=60, seed=0, setting="toy")
    assert res.auc > 0.95 and res.intruder_found > 0.9
    assert 0.3 < res.chance_auc < 0.7


# ------------------------------------------------------------------------------------------------ diagnose
def test_loss_at_step_by_hand():
    losses = [float(i) for i in range(30)]          # loss of the weights after i updates is i
    assert loss_at_step(losses, 0) == 0.0
    assert loss_at_step(losses, 1) == 1.0           # h = 0
    assert loss_at_step(losses, 4) == np.mean([2, 3, 4, 5, 6])
    assert loss_at_step(losses, 24, half_window=3) == np.mean(range(21, 28))
    assert loss_at_step(losses, 30, half_window=3) == np.mean([27, 28, 29])   # the last checkpoint: no loss of its own
    assert loss_at_step(losses, 31) is None and loss_at_step([], 0) is None


def test_diagnose_a_text_study_against_its_loss(text_study, tmp_path):
    _, runs, _, ws = text_study
    d = diagnose(ws, out=tmp_path / "d")
    assert d.quality == ("train_loss", "train loss")
    for m, run in zip(("s0", "s1"), runs):
        losses = list(run_losses(run))
        assert d.losses[m] == losses
        cs = d.checkpoints[m]
        assert [c.step for c in cs] == [0, 1, 2, 6, 12]
        assert [c.metrics["train_loss"] for c in cs] == [loss_at_step(losses, s) for s in (0, 1, 2, 6, 12)]
        assert cs[0].moved == {} and all(c.moved["all"] > 0 for c in cs[1:])
        assert set(cs[1].moved) == {"all", "blocks.0.mlp.act", "blocks.1.mlp.act"}
    assert any("record the train loss" in n for n in d.notes) and not d.milestones
    table = d.table()
    assert "train loss" in table.splitlines()[0] and "step" in table.splitlines()[0]
    rows = list(csv.DictReader(open(tmp_path / "d" / "metrics.csv")))
    r = next(r for r in rows if r["model"] == "s1" and r["tag"] == "step6" and r["layer"] == "blocks.1.mlp.act")
    assert int(r["step"]) == 6 and float(r["train_loss"]) == pytest.approx(d.checkpoints["s1"][3].metrics["train_loss"])
    for name in ("diversity", "speed", "collapse", "layers"):
        assert (tmp_path / "d" / f"{name}.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ alignment
def test_argmax_token_concepts_match_brute_force(text_study):
    ws = text_study[3]
    tk = workspace_tokenizer(ws)
    for m, t in (("s0", "step0"), ("s1", "step12")):
        c = argmax_token_concepts(ws, m, t, dominance=0.6)
        centre = load_contexts(ws, m, t)[:, :, 10]
        assert len(c.names) == tk.vocab_size
        assert (np.asarray(ws.stimuli(m, t).indices) >= 0).all()
        prior = np.bincount(centre.ravel(), minlength=tk.vocab_size) / centre.size
        alpha = 0.05 / len(np.unique(centre))          # only the tokens that occur are tested
        for row in range(len(centre)):                 # brute force: of the tokens in >= 60% of the unit's contexts
            counts = np.bincount(centre[row], minlength=tk.vocab_size)  # and rare by chance, the one furthest
            ok = [v for v in range(tk.vocab_size)                      # above its prior
                  if counts[v] >= 3 and binom.sf(counts[v] - 1, 5, prior[v]) <= alpha]
            want = max(ok, key=lambda v: counts[v] / 5 - prior[v]) if ok else -1
            assert c.ids[row] == want
            assert c.shares[row] == pytest.approx(counts[want] / 5 if ok else 0.0)
        assert (c.ids >= 0).any()


def test_evaluate_alignment_reads_contexts(text_study, tmp_path):
    ws = text_study[3]
    res = evaluate_alignment(ws, n_groups=4, tasks=40, cka=False, out=tmp_path / "a")
    assert res["views"] == "contexts" and res["concepts"] == "argmax token"
    assert [r["setting"] for r in res["intruder"]] == ["within base", "across epochs", "across models"]
    for r in res["intruder"]:
        assert 0 <= r["auc"] <= 1 and 0 <= r["chance_auc"] <= 1 and r["tasks"] == 40
    report = (tmp_path / "a" / "report.md").read_text()
    assert "judge sees only the contexts" in report and "argmax token" in report
    with pytest.raises(ConceptEvoError, match="views='contexts'"):
        evaluate_alignment(ws, n_groups=4, tasks=5, cka=False, views="patches", out=tmp_path / "b")


def test_cli_evaluate_alignment_on_a_text_study(text_study, tmp_path, capsys):
    from conceptevo.cli import main

    ws = text_study[3]
    assert main(["evaluate-alignment", str(ws.path), "--groups", "4", "--tasks", "20", "--no-cka", "--views", "contexts",
                 "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "intruder  within base" in out and "intruder  across models" in out
    with pytest.raises(ConceptEvoError, match="'contexts' is for text studies"):
        from conceptevo.alignment.evaluate import _Pictures
        _Pictures(ws, None, "contexts")


def test_a_foreign_train_log_gives_no_loss_and_no_error(text_study, tmp_path):
    import shutil

    from conceptevo.models.checkpoints import Checkpoint
    from conceptevo.diagnostics.diagnose import _with_train_loss

    run = tmp_path / "run"
    shutil.copytree(text_study[1][0] / "step6", run / "step6")
    (run / "train_log.json").write_text('{"loss": "not a list", "epochs": 3}')
    assert _with_train_loss(Checkpoint("step6", str(run / "step6"), step=6), {}) == {}
    (run / "train_log.json").write_text('{"loss": [3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}')
    assert _with_train_loss(Checkpoint("step6", str(run / "step6"), step=6), {}) == {"train_loss": 1.0}
    got = _with_train_loss(Checkpoint("step6", str(run / "step6"), step=6, metrics={"train_top1": 0.5}), {})
    assert got == {"train_top1": 0.5}     # accuracy recorded: the loss is not looked up
