"""Issue 24.5: class readiness on a hand-made case, in the contract, and on the board (a class not ready goes to
review whatever its probability)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from semhinet_tf.artifacts.contract import ContractError, embed_sealed, load_tflite_contract, validate_contract
from semhinet_tf.evaluate import class_readiness, evaluate
from semhinet_tf.taxonomy import Taxonomy

LEAVES = ["a", "b", "c", "d"]


def _onehotish(pred: list[int], conf: list[float]) -> np.ndarray:
    """Leaf probabilities whose argmax is `pred` with top probability `conf` (the rest shared out)."""
    out = np.zeros((len(pred), len(LEAVES)))
    for i, (j, p) in enumerate(zip(pred, conf, strict=True)):
        out[i] = (1 - p) / (len(LEAVES) - 1)
        out[i, j] = p
    return out


def test_readiness_figures_on_a_hand_made_case():
    # a: 40 frames, all called a confidently -> ready (precision 1.0)
    # b: 40 frames; 30 called b confidently, plus 2 frames of d called b confidently -> precision 30/32 < 0.95
    # c: 10 frames, all right and confident, but too few -> not ready
    # d: 40 frames; 2 called b (above), 38 called d but all under the threshold -> no automatic verdict
    true = [0] * 40 + [1] * 40 + [2] * 10 + [3] * 40
    pred = [0] * 40 + [1] * 30 + [0] * 10 + [2] * 10 + [1] * 2 + [3] * 38
    conf = [0.9] * 40 + [0.9] * 30 + [0.4] * 10 + [0.95] * 10 + [0.8] * 2 + [0.5] * 38
    r = class_readiness(np.array(true), _onehotish(pred, conf), LEAVES, threshold=0.6, target=0.95, min_frames=30)
    c = r["classes"]
    assert r["ready"] == ["a"]
    assert c["a"] == {"labelled": 40, "automatic": 40, "precision": 1.0,
                      "precision_ci": [pytest.approx(0.9124, abs=1e-3), 1.0], "ready": True, "why_not": None}
    assert r["min_automatic"] == 10
    assert c["b"]["labelled"] == 40 and c["b"]["automatic"] == 32 and c["b"]["precision"] == pytest.approx(30 / 32)
    assert "under the target" in c["b"]["why_not"]
    assert c["c"]["precision"] == 1.0 and not c["c"]["ready"] and "10 labelled frames, needs 30" in c["c"]["why_not"]
    assert c["d"]["automatic"] == 0 and c["d"]["precision"] is None and "no verdict" in c["d"]["why_not"]
    # the threshold decides what is automatic: at 0.35 the 10 unsure a-calls of b frames count against a
    low = class_readiness(np.array(true), _onehotish(pred, conf), LEAVES, threshold=0.35, target=0.95, min_frames=30)
    assert low["classes"]["a"]["automatic"] == 50 and low["classes"]["a"]["precision"] == pytest.approx(0.8)
    assert low["ready"] == ["d"]  # and d, now automatic, is always right
    loose = class_readiness(np.array(true), _onehotish(pred, conf), LEAVES, threshold=0.6, target=0.9, min_frames=5)
    assert loose["ready"] == ["a", "b", "c"]
    none = class_readiness(np.array(true), _onehotish(pred, conf), LEAVES, threshold=None, target=0.9, min_frames=5)
    assert none["ready"] == []


def test_a_class_is_not_ready_on_a_handful_of_automatic_verdicts():
    """40 labelled frames of a, one confident verdict (right): 100% precision on one frame proves nothing."""
    true = [0] * 40 + [1] * 40
    pred = [0] * 40 + [1] * 40
    conf = [0.9] + [0.3] * 39 + [0.9] * 40
    r = class_readiness(np.array(true), _onehotish(pred, conf), LEAVES, threshold=0.6, target=0.95, min_frames=30)
    a = r["classes"]["a"]
    assert a["automatic"] == 1 and a["precision"] == 1.0 and not a["ready"] and r["ready"] == ["b"]
    assert "1 automatic verdict of it, needs 10" in a["why_not"]
    assert a["precision_ci"][0] < 0.25  # the interval says how little one verdict shows


def test_eval_results_carry_readiness_at_the_given_threshold():
    tax = Taxonomy.default()
    rng = np.random.default_rng(1)
    n = 200
    true = rng.integers(0, len(tax.leaves), n)
    heads = {h.name: rng.dirichlet(np.ones(h.num_classes), n) for h in tax.heads}
    r = evaluate(true, heads, tax, "m", "tflite", purity_target=0.9, review_threshold=0.3, ready_min_frames=10)
    assert r["readiness"]["threshold"] == 0.3 and r["readiness"]["target_purity"] == 0.9
    assert set(r["readiness"]["classes"]) == set(tax.leaves)
    assert sum(c["labelled"] for c in r["readiness"]["classes"].values()) == n
    json.dumps(r["readiness"])


def test_the_contract_validates_ready_classes(tiny_run):
    contract = load_tflite_contract(tiny_run.tflite.read_bytes(), tiny_run.tflite)
    assert contract.ready_classes is None and contract.is_ready("crack")  # an older contract: every class ready
    raw = {k: v for k, v in contract.raw.items() if k != "digest"}
    ok = validate_contract({**raw, "ready_classes": ["normal", "bogus"]}, "m.tflite")
    assert ok.ready_classes == ("normal", "bogus") and ok.is_ready("normal") and not ok.is_ready("crack")
    for bad in (["normal", "scratch"], "normal", ["normal", "normal"], [3]):
        with pytest.raises(ContractError, match="ready_classes"):
            validate_contract({**raw, "ready_classes": bad}, "m.tflite")


def _model_with_ready(tiny_run, tmp_path, ready, threshold=0.0):
    from semhinet_tf.export.convert import run_contract

    config = json.loads((tiny_run.dir / "config.json").read_text())
    tax = Taxonomy.default()
    contract = run_contract(tiny_run.dir, config, tax.to_spec(), img_size=32, io_type="uint8",
                            quantization={"source": "float", "granularity": "per-channel", "io": "uint8",
                                          "float_heads": False}, review_threshold=threshold, ready_classes=ready)
    path = tmp_path / f"m{len(list(tmp_path.glob('m*.tflite')))}.tflite"
    path.write_bytes(embed_sealed(tiny_run.bare, contract))
    return path


def test_the_board_sends_a_class_that_is_not_ready_to_review(tiny_run, tmp_path, capsys):
    from semhinet_tf.board.__main__ import main as board_main

    images = tmp_path / "images"
    images.mkdir()
    for i, frame in enumerate(tiny_run.frames(16, 21)):
        Image.fromarray(frame).save(images / f"i{i:02d}.png")

    def board(model):
        out = tmp_path / f"{model.stem}.jsonl"
        assert board_main([str(model), str(images), "--out", str(out)]) == 0
        capsys.readouterr()
        return [json.loads(s) for s in out.read_text().splitlines()]

    everything = board(_model_with_ready(tiny_run, tmp_path, list(Taxonomy.default().leaves)))
    assert not any(r["review"] for r in everything) and all(r["ready"] for r in everything)  # threshold 0
    classes = sorted({r["class"] for r in everything})
    nothing = board(_model_with_ready(tiny_run, tmp_path, []))
    assert all(r["review"] and not r["ready"] for r in nothing)
    assert [r["class"] for r in nothing] == [r["class"] for r in everything]  # the verdict stays; review is added
    ready = classes[:1]
    mixed = board(_model_with_ready(tiny_run, tmp_path, ready))
    for row in mixed:
        assert row["review"] == (row["class"] not in ready) == (not row["ready"])
    # the summary line says why verdicts went to review: with few classes ready, most of them for that reason
    model = _model_with_ready(tiny_run, tmp_path, [])
    assert board_main([str(model), str(images), "--out", str(tmp_path / "why.jsonl")]) == 0
    assert "16 for review (16 of a class not ready for automatic classification)" in capsys.readouterr().err


def test_the_review_summary_counts_each_verdict_once_by_its_first_reason():
    from semhinet_tf.board.output import review_reason, review_summary

    rows = [{"review": False, "ready": True}, {"review": True, "ready": True},
            {"review": True, "ready": False, "unfamiliar": True}, {"review": True, "ready": False},
            {"review": True, "ready": False, "unfamiliar": False}]
    reasons = [review_reason(r) for r in rows]
    assert reasons == [None, "threshold", "unfamiliar", "not-ready", "not-ready"]
    counts = {k: reasons.count(k) for k in set(reasons) - {None}}
    assert review_summary(counts) == ("4 for review (1 unfamiliar, 2 of a class not ready for automatic "
                                      "classification, 1 under the review threshold)")
    assert review_summary({}) == "0 for review"


def test_the_report_has_a_readiness_section(tmp_path):
    from semhinet_tf.report import write_report

    tax = Taxonomy.default()
    rng = np.random.default_rng(2)
    n = 120
    true = rng.integers(0, len(tax.leaves), n)
    heads = {h.name: rng.dirichlet(np.ones(h.num_classes), n) for h in tax.heads}
    r = evaluate(true, heads, tax, "m", "tflite", purity_target=0.9, review_threshold=0.2, ready_min_frames=10)
    write_report(tmp_path / "rep", r, [f"f{i}.png" for i in range(n)], true, heads, tax,
                 image_loader=lambda p: np.zeros((8, 8), np.uint8))
    md = (tmp_path / "rep" / "README.md").read_text()
    assert "## Class readiness" in md and "why not" in md
    for leaf, c in r["readiness"]["classes"].items():
        assert f"| {leaf} | {c['labelled']} | {c['automatic']} |" in md


def test_the_review_queue_takes_every_verdict_of_a_class_not_ready(tiny_run, tmp_path):
    from semhinet_tf.review.queue import build_queue

    images = tmp_path / "images"
    images.mkdir()
    for i, frame in enumerate(tiny_run.frames(10, 4)):
        Image.fromarray(frame).save(images / f"i{i}.png")
    info = build_queue(_model_with_ready(tiny_run, tmp_path, []), images, tmp_path / "R", audit=0.5, boundary=3,
                       progress=False)
    entries = [json.loads(s) for s in (tmp_path / "R" / "queue.jsonl").read_text().splitlines()]
    assert info["n_confident"] == 0 and info["n_audit"] == 0 and info["n_not_ready"] == 10  # threshold 0
    assert len(entries) == 10 and all(e["why"] == ["not-ready"] for e in entries)


def test_verdicts_on_frames_a_user_decoded_apply_readiness_as_the_board_does(tiny_run, tmp_path):
    import semhinet_tf

    frames = np.stack(tiny_run.frames(6, 22))
    everything = semhinet_tf.load_model(_model_with_ready(tiny_run, tmp_path, list(Taxonomy.default().leaves)))
    rows = everything.verdicts(frames)
    assert len(rows) == 6 and not any(r["review"] for r in rows) and all(r["ready"] for r in rows)
    nothing = semhinet_tf.load_model(_model_with_ready(tiny_run, tmp_path, []))
    gated = nothing.verdicts(frames)
    assert [r["class"] for r in gated] == [r["class"] for r in rows]
    assert all(r["review"] and not r["ready"] for r in gated)
    plain = semhinet_tf.decode_predictions(nothing.predict(frames), nothing.taxonomy, nothing.review_threshold)
    assert not any(r["review"] for r in plain)  # the bare decoding knows the threshold only (README says so)
