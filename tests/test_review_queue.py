"""Issue 24.1: the review queue's selection on hand-made probabilities (which frames, why, budget, audit, seed),
and `semhinet review queue` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semhinet_tf.review.queue import head_margins, select
from semhinet_tf.taxonomy import Taxonomy

TAX = Taxonomy.default()


def _frames(rows):
    """rows: dicts head -> probabilities (missing heads uniform-ish but irrelevant: their leaves are not chosen)."""
    heads = {h.name: np.array([r.get(h.name, [1.0 / h.num_classes] * h.num_classes) for r in rows], float)
             for h in TAX.heads}
    return TAX.leaf_probabilities(heads), heads


# h1: bogus normal defect; h2: line area edge; h3: bridge open; h4: cmp crack; h5: ler inc_etch
CASE = [
    {"h1": [0.30, 0.35, 0.35]},                                              # 0 unsure: review (top 0.35)
    {"h1": [0.05, 0.90, 0.05]},                                              # 1 normal, h1 margin 0.85
    {"h1": [0.02, 0.03, 0.95], "h2": [0.55, 0.45, 0.0], "h3": [0.99, 0.01]},  # 2 bridge 0.517, h2 margin 0.10
    {"h1": [0.00, 0.40, 0.60], "h2": [0.0, 0.0, 1.0], "h5": [0.0, 1.0]},      # 3 inc_etch 0.60, h1 margin 0.20
    {"h1": [0.45, 0.10, 0.45]},                                              # 4 unsure: review (top 0.45)
    {"h1": [0.0, 0.0, 1.0], "h2": [0.0, 1.0, 0.0], "h4": [0.52, 0.48]},       # 5 cmp 0.52, h4 margin 0.04
    {"h1": [0.0, 0.97, 0.03]},                                               # 6 normal, h1 margin 0.94
]


def test_margins_only_for_heads_on_the_verdicts_path():
    leaf, heads = _frames(CASE)
    m = head_margins(heads, TAX, leaf.argmax(1))
    assert m["h1"][1] == pytest.approx(0.85) and m["h2"][2] == pytest.approx(0.10)
    assert np.isnan(m["h2"][1]) and np.isnan(m["h3"][5]) and np.isnan(m["h4"][2])  # not on the verdict's path
    assert m["h4"][5] == pytest.approx(0.04) and m["h5"][3] == pytest.approx(1.0)


def test_selection_says_which_frames_and_why():
    leaf, heads = _frames(CASE)
    sel = select(leaf, heads, TAX, threshold=0.5, audit=0.0, boundary=1)
    assert sel.n_frames == 7 and sel.n_confident == 5 and sel.n_audit == 0
    # under the threshold, least probable first; then the nearest frame of each head in head order
    assert sel.order == [0, 4, 3, 2, 5]
    assert sel.reasons == {0: ["review"], 4: ["review"], 3: ["boundary:h1", "boundary:h5"], 2: ["boundary:h2",
                           "boundary:h3"], 5: ["boundary:h4"]}
    assert sel.margins[5] == {"h1": 1.0, "h2": 1.0, "h4": pytest.approx(0.04)}
    # two a head: the next nearest of h1 is the normal frame 1 (0.85 < 0.94); h2 has two candidates (2, then 3 or 5)
    sel2 = select(leaf, heads, TAX, threshold=0.5, audit=0.0, boundary=2)
    assert "boundary:h1" in sel2.reasons[1] and 6 not in sel2.reasons


def test_budget_keeps_audit_then_review_then_boundary():
    leaf, heads = _frames(CASE)
    full = select(leaf, heads, TAX, threshold=0.5, audit=0.2, boundary=1, seed=3)
    assert full.n_audit == 1  # 20% of 5 confident verdicts
    audited = [i for i, r in full.reasons.items() if "audit" in r]
    assert len(audited) == 1 and leaf[audited[0]].max() >= 0.5 and full.order[0] == audited[0]
    cut = select(leaf, heads, TAX, threshold=0.5, audit=0.2, boundary=1, seed=3, max_items=3)
    assert cut.order == full.order[:3] and cut.dropped == len(full.order) - 3
    assert cut.order == [audited[0], 0, 4]  # the audit sample, then the frames under review; boundary cut

def test_audit_is_the_asked_share_of_confident_verdicts_and_reproducible():
    rng = np.random.default_rng(0)
    n = 1000
    h1 = rng.dirichlet([1, 1, 1], n) * 0.2 + np.array([0.0, 0.8, 0.0])  # normal above 0.8 for every frame ...
    h1[:100] = [0.34, 0.33, 0.33]  # ... but 100 unsure ones
    heads = {h.name: np.full((n, h.num_classes), 1.0 / h.num_classes) for h in TAX.heads}
    heads["h1"] = h1
    leaf = TAX.leaf_probabilities(heads)
    a = select(leaf, heads, TAX, threshold=0.5, audit=0.02, boundary=0, seed=7)
    b = select(leaf, heads, TAX, threshold=0.5, audit=0.02, boundary=0, seed=7)
    c = select(leaf, heads, TAX, threshold=0.5, audit=0.02, boundary=0, seed=8)
    audited = sorted(i for i, r in a.reasons.items() if "audit" in r)
    assert a.n_confident == 900 and a.n_audit == 18 and len(audited) == 18
    assert all(i >= 100 for i in audited)  # only confident verdicts are audited
    assert a.order == b.order and a.reasons == b.reasons
    assert audited != sorted(i for i, r in c.reasons.items() if "audit" in r)
    assert sum(r == ["review"] for r in a.reasons.values()) == 100
    with pytest.raises(ValueError, match="audit"):
        select(leaf, heads, TAX, threshold=0.5, audit=1.5)
    # a budget gives the audit at most a quarter of itself: the rest goes to frames that teach the model
    capped = select(leaf, heads, TAX, threshold=0.5, audit=0.02, boundary=0, seed=7, max_items=40)
    assert capped.audit_asked == 18 and capped.n_audit == 10 and len(capped.order) == 40
    assert sum(r == ["review"] for r in capped.reasons.values()) == 30
    assert select(leaf, heads, TAX, threshold=0.5, audit=0.02, boundary=0, seed=7, max_items=2).n_audit == 1


def test_selection_follows_any_taxonomy():
    tax = Taxonomy.from_spec({"name": "two", "heads": [
        {"name": "top", "classes": ["good", "bad"]},
        {"name": "kind", "parent": "top.bad", "classes": ["scratch", "dust", "stain"]}]})
    heads = {"top": np.array([[0.9, 0.1], [0.05, 0.95], [0.05, 0.95], [0.4, 0.6]]),
             "kind": np.array([[0.3, 0.3, 0.4], [0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]])}
    leaf = tax.leaf_probabilities(heads)
    sel = select(leaf, heads, tax, threshold=0.45, audit=0.0, boundary=1)
    assert sel.reasons == {3: ["review"], 0: ["boundary:top"], 1: ["boundary:kind"]}


def test_review_queue_command_on_the_tiny_model(tiny_run, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from semhinet_tf.cli import main

    images = tmp_path / "new"
    (images / "lot1").mkdir(parents=True)
    for i, frame in enumerate(tiny_run.frames(12, 11)):
        Image.fromarray(frame).save(images / "lot1" / f"f{i:02d}.png")
    (images / "broken.png").write_bytes(b"not an image")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in images.rglob("*"))
    out = tmp_path / "REVIEW"
    runner = CliRunner()
    r = runner.invoke(main, ["review", "queue", str(tiny_run.tflite), str(images), "--out", str(out), "--audit",
                             "0.5", "--boundary", "1", "--seed", "1"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(s) for s in (out / "queue.jsonl").read_text().splitlines()]
    info = json.loads((out / "review.json").read_text())
    assert info["n_frames"] == 12 and info["unreadable"] == 1 and info["n_queued"] == len(lines) > 0
    for entry in lines:
        assert entry["path"].startswith(str(images.resolve())) and len(entry["sha256"]) == 64
        assert entry["verdict"] in TAX.leaves and set(entry["leaf_probabilities"]) == set(TAX.leaves)
        assert entry["why"] and all(w in ("review", "audit") or w.startswith("boundary:") for w in entry["why"])
        assert ("review" in entry["why"]) == (entry["probability"] < info["review_threshold"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in images.rglob("*")) == before  # nothing moved or copied
    assert not list(out.glob("*.png"))
    again = runner.invoke(main, ["review", "queue", str(tiny_run.tflite), str(images), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    # from predict's JSON lines: the same queue without running the model on the frames again
    verdicts = tmp_path / "v.jsonl"
    assert runner.invoke(main, ["predict", str(tiny_run.tflite), str(images), "--out", str(verdicts)]).exit_code == 1
    r2 = runner.invoke(main, ["review", "queue", str(tiny_run.tflite), str(verdicts), "--out", str(tmp_path / "R2"),
                              "--audit", "0.5", "--boundary", "1", "--seed", "1", "--max", "3"])
    assert r2.exit_code == 0, r2.output
    lines2 = [json.loads(s) for s in (tmp_path / "R2" / "queue.jsonl").read_text().splitlines()]
    assert [e["path"] for e in lines2] == [e["path"] for e in lines][:3]


def test_label_issues_finds_the_flipped_labels():
    from semhinet_tf.review.queue import label_issues

    rng = np.random.default_rng(3)
    n, k = 90, 4
    true = np.repeat(np.arange(3), n // 3)  # class 3 has no frame: left out of the columns
    top = rng.uniform(0.55, 0.95, n)  # a model fairly sure of the true class ...
    probs = rng.dirichlet(np.ones(k), n) * (1 - top)[:, None]
    probs[np.arange(n), true] += top
    flipped = np.array([4, 40, 77])  # ... and very sure of it on three frames whose folder says otherwise
    probs[flipped] = 0.01
    probs[flipped, true[flipped]] = 0.97
    given = true.copy()
    given[flipped] = (true[flipped] + 1) % 3
    found = label_issues(given, probs)
    assert sorted(found.tolist()) == flipped.tolist()
    assert label_issues(true, probs).size == 0  # the right labels: nothing disputed
    assert label_issues(np.zeros(5, np.int64), probs[:5]).size == 0  # one class: nothing to dispute


def test_suspects_are_labelled_frames_the_model_disputes(tiny_run, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from semhinet_tf.cli import main

    data = tmp_path / "labelled"
    frames = tiny_run.frames(48, 5)
    for i, frame in enumerate(frames):
        folder = data / TAX.leaves[i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(folder / f"l{i:02d}.png")
    new = tmp_path / "new"
    new.mkdir()
    for i, frame in enumerate(tiny_run.frames(6, 8)):
        Image.fromarray(frame).save(new / f"n{i}.png")
    out = tmp_path / "R"
    r = CliRunner().invoke(main, ["review", "queue", str(tiny_run.tflite), str(new), "--out", str(out),
                                  "--suspects", str(data), "--audit", "0"])
    assert r.exit_code == 0, r.output
    entries = [json.loads(s) for s in (out / "queue.jsonl").read_text().splitlines()]
    info = json.loads((out / "review.json").read_text())
    suspects = [e for e in entries if "suspect" in e["why"]]
    assert info["n_suspects"] == len(suspects) > 0 and info["suspects_split"] == "all"
    for e in suspects:  # a frame of the labelled set, with the folder's label, which the model's output disputes
        assert e["path"].startswith(str(data.resolve())) and e["folder_label"] == Path(e["path"]).parent.name
        assert e["leaf_probabilities"][e["folder_label"]] < max(e["leaf_probabilities"].values())
    assert all(e["path"].startswith(str(new.resolve())) for e in entries if "suspect" not in e["why"])


def test_out_of_fold_probe_finds_flipped_training_labels():
    """Features in four well-separated clusters (one a class), five labels flipped: the probe, never fitted on a
    frame's own label, disputes exactly those five; the labels as given by the clusters: none."""
    from semhinet_tf.review.queue import label_issues, out_of_fold_probabilities

    rng = np.random.default_rng(3)
    true = np.repeat(np.arange(4), 25)
    features = rng.normal(0, 1, (100, 12)) + 10.0 * np.eye(4, 12)[true]
    given = true.copy()
    flipped = np.array([3, 30, 55, 71, 96])
    given[flipped] = (true[flipped] + 1) % 4
    oof = out_of_fold_probabilities(features, given, 8, seed=0)
    assert oof.shape == (100, 8) and np.allclose(oof.sum(1), 1) and np.all(oof[:, 4:] == 0)
    assert oof[flipped, true[flipped]].min() > 0.5  # out of fold: the flipped frame's own label did not teach it
    assert sorted(label_issues(given, oof).tolist()) == flipped.tolist()
    assert label_issues(true, out_of_fold_probabilities(features, true, 8)).size == 0
    assert out_of_fold_probabilities(features[:5], np.array([0, 0, 1, 1, 2]), 8) is None  # class 2: one frame


def test_suspects_on_the_runs_own_folder_judge_training_frames_out_of_fold(tiny_run, tmp_path):
    """DATA is the folder the run was trained on: held-out frames by the model, training frames by the probe."""
    from click.testing import CliRunner

    from semhinet_tf.cli import main
    from semhinet_tf.data.decode import Preprocess
    from semhinet_tf.data.discover import discover, save_split, stratified_split
    from semhinet_tf.data.synth import generate

    data = tmp_path / "data"
    generate(data, per_class=6, size=40, seed=3, workers=1, progress=False)
    run = tiny_run.copy_to(tmp_path / "run")
    manifest = discover(data, TAX, pre=Preprocess(size=32), progress=False)
    manifest.save(run)
    save_split(stratified_split(manifest, 0.25, seed=1), run)
    new = tmp_path / "new"
    generate(new, per_class=1, size=40, seed=4, workers=1, progress=False)
    out = tmp_path / "R"
    r = CliRunner().invoke(main, ["review", "queue", str(run / "model_int8.tflite"), str(new), "--out", str(out),
                                  "--suspects", str(data), "--audit", "0"])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "review.json").read_text())
    assert info["suspects_split"] == "val+train" and "val+train frames" in r.output
    split = json.loads((run / "split.json").read_text())
    train = {str((data / p).resolve()) for p in split["train"]}
    entries = [json.loads(s) for s in (out / "queue.jsonl").read_text().splitlines()]
    judged = [e for e in entries if "suspect" in e["why"] and e["path"] in train]
    # an untrained model's features still separate some frames: the probe disputes some training labels
    assert judged and all(e["judged_by"].startswith("out-of-fold") for e in judged)
    for e in judged:
        assert e["folder_label"] == Path(e["path"]).parent.name != e["verdict"]
        assert e["leaf_probabilities"][e["verdict"]] > e["leaf_probabilities"][e["folder_label"]]


def test_bad_review_inputs_are_one_line_refusals(tiny_run, tmp_path):
    from click.testing import CliRunner

    from semhinet_tf.cli import main

    runner = CliRunner()
    bad = tmp_path / "v.jsonl"
    bad.write_text('{"path": "a.png", "class": "normal"}\n')
    r = runner.invoke(main, ["review", "queue", str(tiny_run.tflite), str(bad), "--out", str(tmp_path / "Q")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "v.jsonl" in r.output and "taxonomy" in r.output
    bad.write_text("{nope\n")
    r = runner.invoke(main, ["review", "queue", str(tiny_run.tflite), str(bad), "--out", str(tmp_path / "Q")])
    assert r.exit_code == 2 and "line 1 is not JSON" in r.output
    assert not (tmp_path / "Q").exists()
    (tmp_path / "empty").mkdir()
    r = runner.invoke(main, ["review", "queue", str(tiny_run.tflite), str(tmp_path / "empty"), "--out",
                             str(tmp_path / "Q")])
    assert r.exit_code == 2 and "no readable image" in r.output and not (tmp_path / "Q").exists()
    r = runner.invoke(main, ["review", "serve", str(tmp_path)])
    assert r.exit_code == 2 and "no review queue here" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["review", "serve", str(tmp_path), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--allow-remote" in r.output


def test_verdicts_of_classes_not_ready_are_queued_whatever_their_probability():
    leaf, heads = _frames(CASE)
    not_ready = leaf.argmax(1) == TAX.leaf_index("normal")  # frames 1 and 6 are confident normal verdicts
    sel = select(leaf, heads, TAX, threshold=0.5, audit=1.0, boundary=0, not_ready=not_ready)
    assert sel.reasons[1] == ["not-ready"] and sel.reasons[6] == ["not-ready"]
    assert sel.n_confident == 3 and all("audit" in sel.reasons[i] for i in (2, 3, 5))  # never audited: not automatic
    assert sel.order[3:] == [0, 4, 1, 6]  # after the audit, by probability: 0.35, 0.45, then 0.90 and 0.97


def test_unfamiliar_frames_are_queued_first_whatever_their_probability():
    """Issue 26.4: a frame the unfamiliar-frame score flags goes to review even when confident, and before the
    frames the model is merely unsure of; a frame both unsure and unfamiliar lists both reasons."""
    leaf, heads = _frames(CASE)
    unfamiliar = np.zeros(len(leaf), dtype=bool)
    unfamiliar[[4, 6]] = True  # 4: probability 0.45 (under the threshold too); 6: a confident 0.97
    sel = select(leaf, heads, TAX, threshold=0.5, audit=0.0, boundary=0, unfamiliar=unfamiliar)
    assert sel.reasons[6] == ["unfamiliar"] and sel.reasons[4] == ["unfamiliar", "review"]
    assert sel.order == [4, 6, 0] and sel.reasons[0] == ["review"]  # unfamiliar first, then by probability
    assert sel.n_confident == 4


def test_a_budget_gives_unfamiliar_frames_a_quarter_and_the_rest_to_the_least_probable():
    """Unfamiliar frames put first without a cap filled a whole --max with mostly right verdicts (the quickstart
    model: 82 of 2,000 new frames flagged, 10 of them wrong; --max 80 found fewer errors than random frames).
    With a budget, the first max(1, a quarter) of them lead; the others keep their place by probability."""
    rng = np.random.default_rng(3)
    n = 40
    leaf = rng.dirichlet(np.ones(len(TAX.leaves)) * 0.3, size=n)
    heads = {h: rng.dirichlet(np.ones(TAX.head(h).num_classes), size=n) for h in TAX.head_names}
    top = leaf.max(axis=1)
    unfamiliar = np.zeros(n, dtype=bool)
    unfamiliar[np.argsort(top)[-12:]] = True  # the twelve most confident verdicts are flagged unfamiliar
    sel = select(leaf, heads, TAX, threshold=1.01, audit=0.0, boundary=0, max_items=8, unfamiliar=unfamiliar)
    assert len(sel.order) == 8 and sum(unfamiliar[sel.order]) == 2  # a quarter of 8
    assert sel.order[:2] == sorted(np.flatnonzero(unfamiliar), key=lambda i: top[i])[:2]
    assert list(sel.order[2:]) == [i for i in np.argsort(top, kind="stable") if not unfamiliar[i]][:6]
    flagged = select(leaf, heads, TAX, threshold=1.01, audit=0.0, boundary=0, unfamiliar=unfamiliar)
    assert set(flagged.order[:12]) == set(np.flatnonzero(unfamiliar))  # without a budget: all of them first
