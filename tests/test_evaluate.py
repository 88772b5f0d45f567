"""Metrics, schema, review thresholds and the summary table of semhinet_tf.evaluate."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from semhinet_tf.evaluate import (
    EvaluationError,
    coverage_curve,
    evaluate,
    format_summary_table,
    headline_metrics,
    threshold_for_purity,
    write_json,
)
from semhinet_tf.taxonomy import Taxonomy

TAX = Taxonomy.default()
LEAF = {name: i for i, name in enumerate(TAX.leaves)}


def head_probs_from_choices(choices: dict[str, list[int]], conf: float = 0.9, seed: int = 0) -> dict[str, np.ndarray]:
    """Head probabilities whose argmax is the given class index per image (rest spread at random)."""
    rng = np.random.default_rng(seed)
    out = {}
    for head in TAX.heads:
        idx = np.asarray(choices[head.name])
        k = head.num_classes
        rest = rng.dirichlet(np.ones(k - 1), size=idx.size) * (1 - conf)
        p = np.zeros((idx.size, k))
        for r, c in enumerate(idx):
            p[r, c] = conf
            p[r, [j for j in range(k) if j != c]] = rest[r]
        out[head.name] = p
    return out


def perfect_choices(leaves: list[str]) -> dict[str, list[int]]:
    """Per-head class indices that route every image to its own leaf (0 where a head does not apply)."""
    targets = [TAX.leaf_targets(leaf) for leaf in leaves]
    return {h: [max(t[h], 0) for t in targets] for h in TAX.head_names}


def random_case(n: int = 300, seed: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, len(TAX.leaves), n)
    return true, {h.name: rng.dirichlet(np.ones(h.num_classes), n) for h in TAX.heads}


def without_coverage(result: dict) -> dict:
    """What depends on the argmaxes only: coverage and class readiness move with the probabilities themselves."""
    return {k: v for k, v in result.items() if k not in ("coverage", "readiness")}


def test_schema_keys_exact_and_json_plain():
    true, probs = random_case()
    r = evaluate(true, probs, TAX, "m", "tflite")
    assert set(r) == {"model", "format", "n", "leaf", "heads", "summary", "per_class", "missing_classes", "coverage",
                      "readiness"}
    assert r["format"] == "tflite" and r["n"] == 300
    assert set(r["leaf"]) == {"labels", "accuracy", "accuracy_ci", "confusion"}  # each figure with its interval
    assert r["leaf"]["labels"] == list(TAX.leaves)
    assert np.array(r["leaf"]["confusion"]).shape == (8, 8) and np.array(r["leaf"]["confusion"]).sum() == 300
    assert list(r["heads"]) == ["h1", "h2", "h3", "h4", "h5"]
    for name, m in r["heads"].items():
        assert set(m) == {"labels", "n", "accuracy", "accuracy_ci", "recall", "recall_ci", "precision",
                          "precision_ci", "confusion"} | \
            (set() if name == "h1" else {"reached"})
        assert m["labels"] == list(TAX.head(name).classes)
        assert set(m["recall"]) == set(m["precision"]) == set(m["labels"])
    assert set(r["summary"]) == {"h1_recall", "h2_router_accuracy", "specialist_precision"}
    assert list(r["summary"]["h1_recall"]) == ["bogus", "normal", "defect"]
    assert list(r["summary"]["specialist_precision"]) == ["bridge", "open", "cmp", "crack", "ler", "inc_etch"]
    assert set(r["per_class"]["bridge"]) == {"precision", "precision_ci", "recall", "recall_ci", "f1", "support"}
    assert set(r["coverage"]["operating_point"]) == {"target", "threshold", "coverage", "review_share", "purity",
                                                     "reached", "automatic_n", "purity_ci"}
    assert len(r["coverage"]["curve"]["thresholds"]) <= 101

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (int, float, str, bool)

    assert plain(r)
    json.dumps(r, allow_nan=False)
    # same keys whatever the format
    assert json.dumps(without_coverage(r)) == json.dumps(without_coverage(
        evaluate(true, probs, TAX, "m", "onnx") | {"format": "tflite"}))


def test_passed_accuracy_scores_a_head_only_on_what_the_heads_above_sent_it():
    """Router right on every defect the gatekeeper passes, wrong on the two it calls normal."""
    leaves = ["bridge", "bridge", "cmp", "ler", "ler", "normal"]
    choice = perfect_choices(leaves)
    choice["h1"] = [2, 2, 2, 1, 1, 1]  # the two ler frames called normal
    choice["h2"] = [0, 0, 1, 0, 0, 0]  # ... and routed to line
    true, probs = np.array([LEAF[leaf] for leaf in leaves]), head_probs_from_choices(choice)
    r = evaluate(true, probs, TAX, "m", "keras")
    assert r["heads"]["h2"]["accuracy"] == pytest.approx(3 / 5)
    assert r["heads"]["h2"]["reached"] == {"n": 3, "accuracy": 1.0,
                                           "accuracy_ci": [pytest.approx(0.4385, abs=1e-4), 1.0]}
    assert r["heads"]["h3"]["reached"] == {"n": 2, "accuracy": 1.0,
                                           "accuracy_ci": [pytest.approx(0.3424, abs=1e-4), 1.0]}
    assert r["heads"]["h5"]["reached"] == {"n": 0, "accuracy": None, "accuracy_ci": None}  # no ler reached it
    rows = dict(headline_metrics(r))
    assert rows["h2 router accuracy"] == pytest.approx(0.6) and rows["h2 router accuracy, passed defects"] == 1.0
    # a taxonomy file may list a head before its parent: same figures
    spec = TAX.to_spec()
    reordered = Taxonomy.from_spec({**spec, "heads": spec["heads"][::-1]})
    r2 = evaluate(true, probs, reordered, "m", "keras")
    assert {h: r2["heads"][h].get("reached") for h in TAX.head_names} == \
        {h: r["heads"][h].get("reached") for h in TAX.head_names}


def test_metrics_match_a_direct_count():
    true, probs = random_case(400, seed=3)
    r = evaluate(true, probs, TAX, "m", "keras")
    leaf_pred = TAX.leaf_probabilities(probs).argmax(1)
    assert r["leaf"]["accuracy"] == pytest.approx(np.mean(leaf_pred == true))
    defect = np.isin(true, [LEAF[c] for c in ("bridge", "open", "cmp", "crack", "ler", "inc_etch")])
    h2_true = np.array([TAX.leaf_targets(TAX.leaves[t])["h2"] for t in true])
    assert r["heads"]["h2"]["n"] == defect.sum()
    h2_acc = np.mean(probs["h2"].argmax(1)[defect] == h2_true[defect])
    assert r["summary"]["h2_router_accuracy"] == pytest.approx(h2_acc)
    normal = true == LEAF["normal"]
    assert r["summary"]["h1_recall"]["normal"] == pytest.approx(np.mean(probs["h1"].argmax(1)[normal] == 1))
    crack_pred = leaf_pred == LEAF["crack"]
    assert r["summary"]["specialist_precision"]["crack"] == pytest.approx(np.mean(true[crack_pred] == LEAF["crack"]))
    f1 = r["per_class"]["crack"]["f1"]
    p, rc = r["per_class"]["crack"]["precision"], r["per_class"]["crack"]["recall"]
    assert f1 == pytest.approx(2 * p * rc / (p + rc))


def test_missing_classes_give_zero_rows_and_null_recall():
    leaves = ["bogus", "normal", "bridge", "bridge", "normal", "bogus"]
    true = np.array([LEAF[c] for c in leaves])
    r = evaluate(true, head_probs_from_choices(perfect_choices(leaves)), TAX, "m", "keras")
    assert r["missing_classes"] == ["open", "cmp", "crack", "ler", "inc_etch"]
    cm = np.array(r["leaf"]["confusion"])
    for c in r["missing_classes"]:
        assert cm[LEAF[c]].sum() == 0
        assert r["per_class"][c] == {"precision": None, "recall": None, "f1": None, "support": 0,
                                     "precision_ci": None, "recall_ci": None}
    assert r["leaf"]["accuracy"] == 1.0
    for h in ("h4", "h5"):  # no area or edge defect at all: nothing to score
        assert r["heads"][h]["n"] == 0 and r["heads"][h]["accuracy"] is None
        assert r["heads"][h]["confusion"] == [[0, 0], [0, 0]]
        assert set(r["heads"][h]["recall"].values()) == {None}
    assert r["heads"]["h2"]["recall"] == {"line": 1.0, "area": None, "edge": None}
    assert r["summary"]["specialist_precision"]["cmp"] is None
    assert r["summary"]["specialist_precision"]["bridge"] == 1.0


def test_empty_split_does_not_raise():
    probs = {h.name: np.zeros((0, h.num_classes)) for h in TAX.heads}
    r = evaluate(np.zeros(0, dtype=int), probs, TAX, "m", "onnx")
    assert r["n"] == 0 and r["leaf"]["accuracy"] is None and r["coverage"]["operating_point"]["threshold"] is None
    json.dumps(r, allow_nan=False)


def test_same_argmaxes_give_identical_metrics():
    rng = np.random.default_rng(7)
    true = rng.integers(0, 8, 250)
    choices = {h.name: rng.integers(0, h.num_classes, 250).tolist() for h in TAX.heads}
    a = head_probs_from_choices(choices, conf=0.99, seed=1)
    b = head_probs_from_choices(choices, conf=0.9, seed=2)
    assert not np.allclose(a["h1"], b["h1"])
    assert np.array_equal(TAX.leaf_probabilities(a).argmax(1), TAX.leaf_probabilities(b).argmax(1))
    ra, rb = evaluate(true, a, TAX, "m", "keras"), evaluate(true, b, TAX, "m", "keras")
    assert without_coverage(ra) == without_coverage(rb)
    assert ra["coverage"] != rb["coverage"]  # the threshold curve does depend on the values


def test_specialist_precision_is_end_to_end():
    # two true bridges routed correctly; two true normals the gatekeeper wrongly sends down to bridge
    leaves = ["bridge", "bridge", "normal", "normal"]
    true = np.array([LEAF[c] for c in leaves])
    d, line, bridge = 2, 0, 0
    probs = head_probs_from_choices({"h1": [d] * 4, "h2": [line] * 4, "h3": [bridge] * 4, "h4": [0] * 4,
                                     "h5": [0] * 4})
    r = evaluate(true, probs, TAX, "m", "keras")
    assert r["heads"]["h3"]["precision"]["bridge"] == 1.0  # the specialist itself is right on what it sees
    assert r["summary"]["specialist_precision"]["bridge"] == 0.5  # but half the "bridge" verdicts are normals
    assert r["summary"]["h1_recall"] == {"bogus": None, "normal": 0.0, "defect": 1.0}
    assert r["per_class"]["normal"]["recall"] == 0.0 and r["per_class"]["normal"]["precision"] is None
    assert r["per_class"]["normal"]["f1"] == 0.0


def known_curve_case():
    """Ten images, top probabilities 0.55..1.00; the three least confident and the 0.95 one are wrong."""
    top = np.round(np.arange(0.55, 1.0001, 0.05), 2)
    pred = np.zeros(10, dtype=int)
    leaf_probs = np.zeros((10, 2))
    leaf_probs[:, 0] = top
    true = np.zeros(10, dtype=int)
    true[[0, 1, 2, 8]] = 1
    return true, leaf_probs, pred


def test_coverage_curve_known_values():
    true, leaf_probs, _ = known_curve_case()
    c = coverage_curve(true, leaf_probs)
    assert np.allclose(c["thresholds"], np.round(np.arange(0.55, 1.0001, 0.05), 2))
    assert np.allclose(c["coverage"], np.arange(10, 0, -1) / 10)
    assert np.allclose(c["purity"][:4], [6 / 10, 6 / 9, 6 / 8, 6 / 7])
    assert c["purity"][-1] == 1.0 and c["purity"][-2] == 0.5


def test_threshold_for_purity_known_answer():
    true, leaf_probs, _ = known_curve_case()
    c = coverage_curve(true, leaf_probs)
    p = threshold_for_purity(c, 0.8)  # purity first >= 0.8 at t=0.70 (6/7 = 0.857), 7 of 10 kept
    assert p["reached"] and p["threshold"] == pytest.approx(0.70)
    assert p["coverage"] == pytest.approx(0.7) and p["review_share"] == pytest.approx(0.3)
    assert p["purity"] == pytest.approx(6 / 7)
    # the lowest threshold is chosen even when a higher one is purer
    assert threshold_for_purity(c, 0.59)["threshold"] == pytest.approx(0.55)
    # 0.99 is reached only by the single most confident image
    assert threshold_for_purity(c, 0.99)["threshold"] == pytest.approx(1.0)


def test_threshold_unreachable_returns_best_point():
    true = np.array([1, 0, 0, 1])  # the most confident image (0.9) is wrong
    leaf_probs = np.array([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.6, 0.0]])
    c = coverage_curve(true, leaf_probs)  # purity at 0.6..0.9: 2/4, 2/3, 1/2, 0
    p = threshold_for_purity(c, 0.9)
    assert p["reached"] is False
    assert p["threshold"] == pytest.approx(0.7) and p["purity"] == pytest.approx(2 / 3)
    assert p["coverage"] == pytest.approx(0.75)


def test_ties_in_top_probability_are_one_threshold():
    true = np.array([0, 0, 1, 0])
    leaf_probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.8, 0.2], [0.6, 0.4]])
    c = coverage_curve(true, leaf_probs)
    assert np.allclose(c["thresholds"], [0.6, 0.8])
    assert np.allclose(c["coverage"], [1.0, 0.75]) and np.allclose(c["purity"], [0.75, 2 / 3])


def test_curve_downsampled_in_results():
    true, probs = random_case(1000, seed=5)
    cov = evaluate(true, probs, TAX, "m", "keras")["coverage"]
    t = cov["curve"]["thresholds"]
    assert 50 < len(t) <= 101 and t == sorted(t)
    assert cov["curve"]["coverage"][0] == 1.0


@pytest.mark.parametrize("bad, message", [
    (dict(fmt="pt"), "format"),
    (dict(true=np.array([0, 8, 1])), "0..7"),
    (dict(true=np.array([[0, 1, 2]])), "1-D"),
    (dict(drop="h4"), "h4"),
    (dict(shape="h2"), "h2"),
])
def test_bad_inputs_raise_one_clear_error(bad, message):
    true = bad.get("true", np.array([0, 1, 2]))
    probs = {h.name: np.full((3, h.num_classes), 1.0 / h.num_classes) for h in TAX.heads}
    if "drop" in bad:
        del probs[bad["drop"]]
    if "shape" in bad:
        probs[bad["shape"]] = probs[bad["shape"]][:, :2]
    with pytest.raises(EvaluationError, match=message):
        evaluate(true, probs, TAX, "m", bad.get("fmt", "keras"))


def test_format_summary_table_side_by_side():
    true, probs = random_case()
    leaves = ["bridge", "normal"]
    perfect = evaluate(np.array([LEAF[c] for c in leaves]), head_probs_from_choices(perfect_choices(leaves)), TAX,
                       "b", "tflite")
    text = format_summary_table({"float": evaluate(true, probs, TAX, "a", "keras"), "int8": perfect})
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["metric", "float", "int8"]
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert len({len(line) for line in lines}) == 1  # aligned columns
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert row["format"] == ["keras", "tflite"]
    assert row["leaf accuracy"][1] == "1.000"
    assert row["h1 recall bogus"][1] == "-"  # no bogus image in the second split
    assert row["h2 router accuracy"][1] == "1.000"
    assert "precision inc_etch" in row and row["specialist precision min"][1] == "1.000 (bridge)"


def test_write_json_atomic_and_converts_numpy(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json({"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"), "d": np.bool_(True)}, path)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": True}
    write_json({"x": 1}, path)
    assert json.loads(path.read_text()) == {"x": 1}
    assert os.listdir(path.parent) == ["r.json"]  # no temporary file left behind


def test_absent_but_predicted_class():
    # no crack in the split, yet one cmp image is called crack: a false alarm
    leaves = ["cmp", "cmp", "bogus"]
    true = np.array([LEAF[c] for c in leaves])
    choices = perfect_choices(leaves)
    choices["h4"][1] = 1  # crack
    r = evaluate(true, head_probs_from_choices(choices), TAX, "m", "keras")
    assert r["per_class"]["crack"] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0,
                                       "precision_ci": [0.0, pytest.approx(0.7935, abs=1e-4)], "recall_ci": None}
    assert r["summary"]["specialist_precision"]["crack"] is None  # absent: the split cannot judge it
    assert r["summary"]["specialist_precision"]["cmp"] == 1.0
    assert r["per_class"]["cmp"]["recall"] == 0.5
    assert "crack" in r["missing_classes"]


# ---------------------------------------------------------------- scikit-learn's metrics, our numbers
def _counted_by_hand(true: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, list[dict]]:
    """The formulas evaluate.py used before scikit-learn took over: bincount and ratios of counts."""
    cm = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    ratio = lambda a, b: None if b == 0 else float(a) / float(b)  # noqa: E731
    scores = [{"precision": ratio(tp[i], predicted[i]), "recall": ratio(tp[i], support[i]),
               "f1": ratio(2 * tp[i], 2 * tp[i] + (predicted[i] - tp[i]) + (support[i] - tp[i])),
               "support": int(support[i])} for i in range(k)]
    return cm, scores


@pytest.mark.parametrize("seed", range(40))
def test_sklearn_metrics_give_the_numbers_counted_by_hand(seed):
    from semhinet_tf.evaluate import confusion_matrix, per_class_scores

    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    n = 0 if seed == 0 else int(rng.integers(1, 30))  # seed 0: no image at all
    # few classes in play, so some are absent, some never predicted, some neither
    true = rng.choice(rng.choice(k, size=max(1, k // 2), replace=False), size=n)
    pred = np.where(rng.random(n) < 0.5, true, rng.integers(0, k, n))
    labels = [f"c{i}" for i in range(k)]
    cm, scores = _counted_by_hand(true, pred, k)
    got_cm = confusion_matrix(true, pred, k)
    assert got_cm.dtype == np.int64 and got_cm.shape == (k, k) and np.array_equal(got_cm, cm)
    assert per_class_scores(true, pred, labels) == dict(zip(labels, scores, strict=True))  # exactly, not approx
