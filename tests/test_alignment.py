"""Alignment without people: coherence on known concepts, the picture-only intruder judge, CKA, the report."""
from __future__ import annotations

import numpy as np
import pytest

from conceptevo.alignment import (coherence_test, description_matrix, dominant_concepts, evaluate_alignment,
                                  intruder_test, judge_task, kmeans_groups, linear_cka, picture_features)
from conceptevo.alignment.intruder import sample_tasks
from conceptevo.data import ConceptShapes
from conceptevo.errors import ConceptEvoError



@pytest.fixture(scope="module")
def shapes():
    return ConceptShapes(n=3000, size=28, seed=1)  # concepts are known without rendering


def _planted(shapes, attr, per_group=8, k=10, seed=0):
    """Neurons whose stimuli all share one value of ``attr`` (one planted group per value)."""
    rng = np.random.default_rng(seed)
    values = shapes.concepts[attr]
    idx, groups = [], []
    for v in range(len(shapes.concept_names[attr])):
        pool = np.flatnonzero(values == v)
        for _ in range(per_group):
            idx.append(rng.choice(pool, k, replace=False))
            groups.append(v)
    return np.stack(idx), np.array(groups)


def test_planted_groups_are_more_coherent_than_random(shapes):
    idx, groups = _planted(shapes, "shape")
    code = dominant_concepts(idx, shapes.concepts, shapes.concept_names, pool=np.arange(shapes.n))
    assert all(code.names[i].startswith("shape=") for i in code.ids)
    res = coherence_test(code.ids, groups, code.names, random_groups=200, seed=0, setting="planted")
    assert res.coherence == pytest.approx(1.0)
    assert res.random_mean < 0.5 and res.p_value < 0.01
    assert set(res.top_concepts.values()) == {f"shape={s}" for s in shapes.concept_names["shape"]}
    # the same neurons in random groups: no better than the random baseline
    rnd = coherence_test(code.ids, np.random.default_rng(1).permutation(groups), code.names, random_groups=200)
    assert rnd.coherence < res.coherence - 0.3 and rnd.p_value > 0.05


def test_dominant_concept_prefers_the_specific_and_ignores_chance(shapes):
    red = np.flatnonzero(shapes.concepts["colour"] == shapes.concept_names["colour"].index("red"))[:10]
    code = dominant_concepts(red[None], shapes.concepts, shapes.concept_names)
    assert code.names[code.ids[0]] == "colour=red"  # not "family=warm", which is as pure but less surprising
    rng = np.random.default_rng(3)
    random = np.stack([rng.choice(shapes.n, 10, replace=False) for _ in range(200)])
    assert np.mean(dominant_concepts(random, shapes.concepts, shapes.concept_names).ids >= 0) < 0.15
    with pytest.raises(ConceptEvoError, match="dominance"):
        dominant_concepts(red[None], shapes.concepts, dominance=0)


def _pictures(shapes, indices):
    from conceptevo.patches import to_uint8_image

    return [to_uint8_image(x) for x in shapes.images_tensor(indices)]


def test_judge_sees_pictures_only_and_spots_planted_intruders(shapes):
    idx, groups = _planted(shapes, "colour", per_group=6)
    descs = [{key: np.mean([f[key] for f in map(picture_features, _pictures(shapes, row))], axis=0)
              for key in ("colour", "gradient", "thumbnail")} for row in idx]
    F = description_matrix(descs)
    res = intruder_test(groups, np.arange(len(groups)), lambda rows: F[rows], tasks=80, seed=0, setting="planted")
    assert res.auc > 0.8 and res.intruder_found > 0.5, (res.auc, res.intruder_found)
    assert abs(res.chance_auc - 0.5) < 0.12 and res.chance_found < 0.4
    # judge_task alone: the odd row gets the lowest score
    f = np.r_[np.zeros((5, 3)), [[4.0, 4.0, 4.0]]] + np.random.default_rng(0).normal(0, 0.1, (6, 3))
    assert np.argmin(judge_task(f)) == 5


def test_intruder_tasks_bad_input():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 3)  # no group has 5 members
    with pytest.raises(ConceptEvoError, match="no K-means group has 5"):
        sample_tasks(groups, np.arange(12), 5, rng)
    groups = np.repeat(np.arange(2), 6)
    mixing = np.zeros(12)
    with pytest.raises(ConceptEvoError, match="at least 2 different"):
        sample_tasks(groups, np.arange(12), 5, rng, mixing=mixing)
    with pytest.raises(ConceptEvoError, match="cannot form 50"):
        kmeans_groups(np.zeros((20, 3)), 50)
    with pytest.raises(ConceptEvoError, match="n_groups"):
        kmeans_groups(np.zeros((20, 3)), 1)


def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 12))
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(X, 3.0 * X @ Q + 5.0) == pytest.approx(1.0)
    Y = rng.normal(size=(400, 7))
    assert linear_cka(X, Y) < 0.1
    assert linear_cka(X, Y) == pytest.approx(linear_cka(Y, X))
    with pytest.raises(ConceptEvoError, match="same images"):
        linear_cka(X, Y[:10])


def test_evaluate_alignment_writes_a_report(tmp_path, fabricated_copy):
    from conceptevo.io import read_json

    path = fabricated_copy
    res = evaluate_alignment(path, tasks=30, random_groups=30, cka_images=120)
    assert [r["setting"] for r in res["intruder"]] == ["within base", "across epochs", "across models"]
    assert [r["paper_auc"] for r in res["intruder"]] == [0.90, 0.86, 0.86]
    for r in res["intruder"]:
        assert 0 <= r["auc"] <= 1 and 0 <= r["chance_auc"] <= 1
    assert res["known_concepts"] and len(res["coherence"]) == 3
    assert len(res["layers"]) == 3 and res["layers"][0]["diagonal_cka"] is not None
    report = (path / "alignment" / "report.md").read_text()
    assert "Intruder test" in report and "linear CKA" in report and "0.90" in report
    assert read_json(path / "alignment" / "results.json")["views"] == "images"
    assert (path / "alignment" / "roc.png").exists() and (path / "alignment" / "layers.png").exists()


def test_evaluate_alignment_cli(tmp_path, fabricated_copy, capsys):
    from conceptevo.cli import build_parser

    path = fabricated_copy
    p = build_parser()
    args = p.parse_args(["evaluate-alignment", str(path), "--tasks", "20", "--no-cka", "--groups", "6",
                         "--out", str(tmp_path / "out")])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "ROC AUC" in out and (tmp_path / "out" / "report.md").exists()
    args = p.parse_args(["evaluate-alignment", str(path), "--groups", "100000", "--no-cka"])
    with pytest.raises(ConceptEvoError, match="K-means groups"):
        args.fn(args)
