"""Issue 26.4: the unfamiliar-frame score, fitted on hand-made features, in the int8 graph, in the contract and on
the board (a frame above the threshold goes to review; a bogus verdict is never sent by it)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from semhinet_tf.artifacts.contract import ContractError, embed_sealed, validate_contract
from semhinet_tf.data.views import log_average
from semhinet_tf.model.ood import CAP_FACTOR, fit_ood, pooled_features, recall_at, threshold_at
from semhinet_tf.taxonomy import Taxonomy

LEAVES = ["bogus", "normal", "a", "b"]


def _features(rng, n_per_class: int = 200, width: int = 40, nuisance=None):
    """Three tight classes in `width` dims (a few directions of large nuisance spread) and a scattered bogus."""
    nuisance = rng.normal(0, 1, (width, 3)) if nuisance is None else nuisance
    centres = {1: np.zeros(width), 2: np.r_[8.0, np.zeros(width - 1)], 3: np.r_[0, 8.0, np.zeros(width - 2)]}
    x, y = [], []
    for leaf, centre in centres.items():
        x.append(centre + rng.normal(0, 0.3, (n_per_class, width)) + rng.normal(0, 3, (n_per_class, 3)) @ nuisance.T)
        y += [leaf] * n_per_class
    x.append(rng.normal(0, 20, (50, width)))
    y += [0] * 50
    return np.concatenate(x), np.array(y), centres, nuisance


def test_familiar_frames_score_about_one_and_unfamiliar_ones_far_above():
    rng = np.random.default_rng(0)
    x, y, centres, nuisance = _features(rng)
    fit = fit_ood(x, y, LEAVES, dims=8)
    assert fit.leaves == ("normal", "a", "b") and fit.frames == 600 and fit.dims == 8  # bogus left out
    held_out, _, _, _ = _features(np.random.default_rng(1), nuisance=nuisance)
    familiar = fit.score(held_out[:600])
    assert 1.0 < np.median(familiar) < 3.0  # two terms, each about 1
    # along the nuisance directions a frame may wander far and stay familiar; off them it may not
    wander = centres[1] + 6 * nuisance[:, 0]
    off = centres[1] + 3.0 * np.eye(40)[5]
    s_wander, s_off = fit.score(np.stack([wander, off]))
    assert s_wander < threshold_at(familiar) < s_off
    assert recall_at(familiar, fit.score(off[None] + rng.normal(0, 0.3, (20, 40)))) == 1.0
    assert recall_at(familiar, familiar[:50]) <= 0.02
    # the caps: CAP_FACTOR times each term's 99th percentile on the training frames
    assert fit.score(np.full((1, 40), 1e6))[0] == pytest.approx(fit.cap)
    for term, cap in zip(fit.terms(x[y > 0]), fit.caps, strict=True):
        assert cap == pytest.approx(CAP_FACTOR * max(np.quantile(term, 0.99), 1.0), rel=1e-6)
    two = fit_ood(x, y, LEAVES, dims=8, widths=(25, 15))  # two feature blocks: a residual term each
    assert len(two.caps) == 3 and two.residual_scales != fit.residual_scales
    assert all(t.mean() <= 1.0 + 1e-9 for t in two.terms(x[y > 0])[1:])  # 1, or less where the floor holds
    with pytest.raises(ValueError, match="do not add up"):
        fit_ood(x, y, LEAVES, widths=(10, 10))


def test_threshold_is_the_share_of_familiar_frames_let_through():
    scores = np.arange(1, 201, dtype=float)  # 200 frames: 1% = 2 frames above the threshold
    assert threshold_at(scores, 0.01) == 198.0 and np.sum(scores > threshold_at(scores, 0.01)) == 2
    assert recall_at(scores, np.array([150.0, 199.0, 250.0, 300.0])) == 0.75
    assert recall_at(scores, np.array([])) is None
    with pytest.raises(ValueError, match="no frames"):
        threshold_at(np.array([]))


def test_few_frames_keep_a_residual_and_bounded_terms():
    """28 frames in 1152 dims: the basis must not span the training frames (their residual would vanish and its
    scale with it, which gave the int8 graph a weight of 1e12 that XNNPACK refused)."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (28, 1152)) + np.repeat(rng.normal(0, 3, (7, 1152)), 4, axis=0)
    y = np.repeat(np.arange(1, 8), 4)
    fit = fit_ood(x, y, ["bogus", *"abcdefg"], widths=(576, 576))
    assert fit.dims == 7 and fit.basis.shape[1] < 28
    assert all(s > 1.0 for s in fit.residual_scales) and all(c >= CAP_FACTOR for c in fit.caps)
    familiar = fit.score(x + rng.normal(0, 1, x.shape))
    assert np.all(np.isfinite(familiar)) and np.all(familiar < fit.cap)


def test_fit_needs_two_frames_outside_bogus():
    with pytest.raises(ValueError, match="two or more training frames outside bogus, got 1"):
        fit_ood(np.zeros((5, 3)), np.array([0, 0, 0, 0, 1]), LEAVES)


def test_views_average_the_score_plainly():
    probs = [{"h1": np.array([[0.5, 0.5]]), "ood": np.array([[1.0]])},
             {"h1": np.array([[0.9, 0.1]]), "ood": np.array([[3.0]])}]
    out = log_average(probs)
    assert out["ood"][0, 0] == pytest.approx(2.0) and out["h1"].sum() == pytest.approx(1.0)


def _raw(tiny_run):
    from semhinet_tf.artifacts.contract import load_tflite_contract

    contract = load_tflite_contract(tiny_run.tflite.read_bytes(), tiny_run.tflite)
    return {k: v for k, v in contract.raw.items() if k != "digest"}


def test_the_contract_validates_the_ood_block(tiny_run):
    raw = _raw(tiny_run)
    good = {"output": "ood", "threshold": 2.5, "false_alarm": 0.01, "leaves": ["normal", "crack"], "dims": 32}
    spec = validate_contract({**raw, "ood": good}, "m.tflite")
    assert spec.is_unfamiliar("crack", 3.0) and not spec.is_unfamiliar("crack", 2.0)
    assert not spec.is_unfamiliar("bogus", 99.0)  # not a fitted leaf: a bogus verdict needs no second opinion
    assert not spec.is_unfamiliar("crack", None)
    assert not validate_contract(raw, "m.tflite").is_unfamiliar("crack", 99.0)  # no score in the contract
    for bad, field in (({**good, "threshold": -1}, "ood.threshold"), ({**good, "threshold": "2"}, "ood.threshold"),
                       ({**good, "leaves": ["scratch"]}, "ood.leaves"), ({**good, "leaves": []}, "ood.leaves"),
                       ({**good, "colour": 1}, "ood.colour"), ({"threshold": 1.0}, "ood"),
                       ({**good, "false_alarm": 2}, "ood.false_alarm")):
        with pytest.raises(ContractError, match=field.replace(".", r"\.")):
            validate_contract({**raw, "ood": bad}, "m.tflite")


def _small_model():
    """A small untrained classifier of the default taxonomy with the layers the score reads (`pool`,
    `pool_max`): random convolutions give features that vary from frame to frame, which the untrained
    MobileNetV3 of `tiny_run` does not (its pooled features are ~1e-9 everywhere)."""
    from semhinet_tf.model import keras

    layers = keras.layers
    keras.utils.set_random_seed(3)
    image = keras.Input((32, 32, 1), name="image")
    x = layers.Rescaling(1 / 128.0, offset=-1.0)(image)
    x = layers.Conv2D(12, 3, strides=2, activation="relu")(x)
    x = layers.Conv2D(24, 3, strides=2, activation="relu")(x)
    pooled = [layers.GlobalAveragePooling2D(name="pool")(x), layers.GlobalMaxPooling2D(name="pool_max")(x)]
    joined = layers.Concatenate()(pooled)
    tax = Taxonomy.default()
    return keras.Model(image, {h.name: layers.Dense(h.num_classes, activation="softmax", name=h.name)(joined)
                               for h in tax.heads})


@pytest.fixture(scope="module")
def ood_model(tiny_run, tmp_path_factory):
    """A small model with the score: the float graph, and the int8 .tflite with and without it."""
    from semhinet_tf.export.tflite import convert_int8, serving_function
    from semhinet_tf.model.ood import feature_tap

    tax = Taxonomy.default()
    model = _small_model()
    tap = feature_tap(model)
    frames = tiny_run.frames(96, 11)
    leaf_ids = np.arange(len(frames)) % len(tax.leaves)
    features, widths = pooled_features(tap.predict(frames[..., None], verbose=0))
    # 5 directions: fewer than an int8 FULLY_CONNECTED may read on the ARM boards (the graph pads them)
    fit = fit_ood(features, leaf_ids, tax.leaves, dims=5, widths=widths)
    calibration = tiny_run.frames(16, 3)
    folder = tmp_path_factory.mktemp("ood")
    (folder / "bare_ood.tflite").write_bytes(convert_int8(tap, 32, tax.head_names, lambda: iter(calibration), ood=fit))
    (folder / "plain.tflite").write_bytes(convert_int8(model, 32, tax.head_names, lambda: iter(calibration)))
    return {"fit": fit, "serve": serving_function(tap, 32, tax.head_names, fit), "tap": tap,
            "bare": folder / "bare_ood.tflite", "plain": folder / "plain.tflite"}


def test_the_graph_computes_the_fitted_score(tiny_run, ood_model):
    from semhinet_tf.model.ood import pooled_features

    frames = tiny_run.frames(6, 12)
    reference = ood_model["fit"].score(pooled_features(ood_model["tap"].predict(frames[..., None], verbose=0))[0])
    graph = [float(ood_model["serve"](frame[None, ..., None].astype(np.float32))["ood"][0, 0]) for frame in frames]
    # the graph's terms carry their int8 ranges (fake quantization to 256 steps of [0, cap])
    np.testing.assert_allclose(graph, reference, atol=2 * ood_model["fit"].cap / 255)


def test_the_int8_model_carries_the_score_and_keeps_its_heads(tiny_run, ood_model):
    from semhinet_tf.board.runtime import BoardModel
    from semhinet_tf.export.npu import check_npu, check_target
    from semhinet_tf.export.tflite_meta import read_model

    assert sorted(read_model(ood_model["bare"]).signature_list()["serving_default"]["outputs"]) == \
        ["h1", "h2", "h3", "h4", "h5", "ood"]
    assert ood_model["fit"].dims == 5
    assert check_npu(ood_model["bare"]).ok and check_target(ood_model["bare"], "cora-z7").ok  # no shallow FC
    frames = tiny_run.frames(24, 13)
    engine = BoardModel(ood_model["bare"], allow_no_contract=True, warn=lambda _: None)
    probs, scores = engine.predict_with_ood(frames)
    assert set(probs) == set(Taxonomy.default().head_names) and scores.shape == (24,)
    same = BoardModel(ood_model["plain"], allow_no_contract=True, warn=lambda _: None).predict(frames)
    for head, p in probs.items():
        assert np.array_equal(p, same[head]), head  # the score's operators leave the heads' int8 bytes alone
    reference = ood_model["fit"].score(pooled_features(ood_model["tap"].predict(frames[..., None], verbose=0))[0])
    assert np.corrcoef(reference, scores)[0, 1] > 0.9


def test_the_board_sends_unfamiliar_frames_to_review(tiny_run, ood_model, tmp_path, capsys):
    from semhinet_tf.board.__main__ import main as board_main
    from semhinet_tf.board.runtime import BoardModel
    from semhinet_tf.export.convert import run_contract

    frames = tiny_run.frames(12, 14)
    images = tmp_path / "images"
    images.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(images / f"i{i:02d}.png")
    scores = BoardModel(ood_model["bare"], allow_no_contract=True, warn=lambda _: None).predict_with_ood(frames)[1]
    threshold = round(float(np.median(scores)), 6)  # as convert writes it; int8 scores tie, the median among them
    tax = Taxonomy.default()
    fitted = [leaf for leaf in tax.leaves if leaf != "bogus"]
    config = json.loads((tiny_run.dir / "config.json").read_text())
    contract = run_contract(tiny_run.dir, config, tax.to_spec(), img_size=32, io_type="uint8", review_threshold=0.0,
                            quantization={"source": "float", "granularity": "per-channel", "io": "uint8",
                                          "float_heads": False}, ready_classes=list(tax.leaves),
                            ood={"output": "ood", "threshold": threshold, "leaves": fitted})
    model = tmp_path / "m.tflite"
    model.write_bytes(embed_sealed(ood_model["bare"].read_bytes(), contract))
    out = tmp_path / "rows.jsonl"
    assert board_main([str(model), str(images), "--out", str(out)]) == 0
    rows = [json.loads(s) for s in out.read_text().splitlines()]
    assert len(rows) == 12
    for row, score in zip(rows, scores, strict=True):
        assert row["ood"] == pytest.approx(score, abs=1e-3)
        expected = bool(round(float(score), 6) > threshold and row["class"] != "bogus")
        assert row["unfamiliar"] == expected and row["review"] == expected  # review threshold 0, all ready
    assert any(r["unfamiliar"] for r in rows) and not all(r["unfamiliar"] for r in rows)
    csv_out = tmp_path / "rows.csv"
    assert board_main([str(model), str(images), "--out", str(csv_out), "--format", "csv"]) == 0
    capsys.readouterr()
    table = list(csv.DictReader(csv_out.open()))
    assert [r["unfamiliar"] for r in table] == [str(r["unfamiliar"]) for r in rows]


def test_eval_figures_and_report_of_the_score(tmp_path):
    from semhinet_tf.evaluate import evaluate, unfamiliar_section
    from semhinet_tf.report import write_report

    tax = Taxonomy.default()
    leaves = list(tax.leaves)
    true = np.repeat(np.arange(len(leaves)), 40)
    scores = np.full(true.size, 2.0)
    scores[true == 1] = np.linspace(1, 3, 40)  # normal frames: 1..3
    scores[true == 0] = np.r_[np.full(30, 50.0), np.full(10, 1.5)]  # bogus: 30 far, 10 look normal
    block = unfamiliar_section(true, scores, {"threshold": 2.5, "leaves": leaves[1:]}, leaves)
    bogus, normal = block["classes"]["bogus"], block["classes"]["normal"]
    assert bogus["n"] == 40 and bogus["above"] == 30 and bogus["share"] == 0.75 and bogus["median"] == 50.0
    assert bogus["recall_at_1pct_normal"] == 0.75  # 1% of 40 normal frames: none above the highest
    assert "recall_at_1pct_normal" not in normal and "recall_at_1pct_normal" not in block["classes"]["crack"]
    assert normal["share_ci"][0] < normal["share"] < normal["share_ci"][1]
    rng = np.random.default_rng(0)
    heads = {h.name: rng.dirichlet(np.ones(h.num_classes), true.size) for h in tax.heads}
    result = evaluate(true, heads, tax, "m", "tflite")
    result["unfamiliar"] = {**block, "scores": scores.tolist()}
    write_report(tmp_path / "rep", result, [f"f{i}.png" for i in range(true.size)], true, heads, tax,
                 image_loader=lambda p: np.zeros((8, 8), np.uint8))
    md = (tmp_path / "rep" / "README.md").read_text()
    assert "## Unfamiliar frames" in md and "unfamiliar.png" in md
    assert (tmp_path / "rep" / "unfamiliar.png").stat().st_size > 1000
    assert "| bogus | 40 | 0.75" in md
