"""Issue 24.3-24.4: retraining from the reviewer's answers (`train --from --labels`) and promotion only when the
new run is not worse (`promote`), float and int8, on the old run's held-out frames."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from semhinet_tf.cli import main
from semhinet_tf.promote import decide
from semhinet_tf.review.labels import Answer, append_answer
from semhinet_tf.taxonomy import IGNORE, Taxonomy

TAX = Taxonomy.default()


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _probs(pred_leaves: list[str]) -> dict[str, np.ndarray]:
    """Head probabilities whose hierarchical argmax is each given leaf (0.9 along its path, uniform elsewhere)."""
    out = {h.name: np.full((len(pred_leaves), h.num_classes), 1.0 / h.num_classes) for h in TAX.heads}
    for i, leaf in enumerate(pred_leaves):
        for head, cls in TAX.leaf_targets(leaf).items():
            if cls != IGNORE:
                k = TAX.head(head).num_classes
                out[head][i] = 0.1 / (k - 1)
                out[head][i, cls] = 0.9
    return out


# ---------------------------------------------------------------------------------------------- decide
TRUTH = [leaf for leaf in TAX.leaves for _ in range(8)]  # 64 frames, 8 a leaf


def _with_errors(wrong: set[int]) -> list[str]:
    """The truth, except frames in `wrong`, which are called `normal` (or `bogus` when they are normal)."""
    return [("bogus" if t == "normal" else "normal") if i in wrong else t for i, t in enumerate(TRUTH)]


def test_decide_refuses_a_worse_model_and_names_the_figures():
    truth = np.array([TAX.leaf_index(t) for t in TRUTH])
    old = _probs(_with_errors({0, 1}))
    new = _probs(_with_errors({0, 1} | set(range(16, 64, 3))))  # 16 more defect frames called normal
    d = decide(truth, old, new, TAX, tolerance=1.0, paired=True)
    assert not d["passed"]
    failed = {r["figure"] for r in d["figures"] if r["failed"]}
    assert {"leaf accuracy", "h1 recall defect"} <= failed
    leaf = next(r for r in d["figures"] if r["figure"] == "leaf accuracy")
    assert leaf["delta_points"] == pytest.approx(-100 * 16 / 64)
    assert leaf["p_worse"] == pytest.approx(0.5 ** 16)  # 16 discordant frames, all against the new model
    assert leaf["before_ci"][0] < leaf["before"] < leaf["before_ci"][1]


def test_decide_accepts_a_better_model_and_weighs_small_falls_with_the_paired_test():
    truth = np.array([TAX.leaf_index(t) for t in TRUTH])
    old = _probs(_with_errors({3, 20, 30, 40, 50}))
    better = _probs(_with_errors({3}))
    assert decide(truth, old, better, TAX, tolerance=0.0)["passed"]
    slightly_worse = _probs(_with_errors({3, 20, 30, 40, 50, 60, 61}))  # two more wrong: -3.1 points
    assert decide(truth, old, slightly_worse, TAX, tolerance=1.0, paired=True)["passed"]  # p = 0.25: chance
    refused = decide(truth, old, slightly_worse, TAX, tolerance=1.0, paired=False)
    assert not refused["passed"]
    assert decide(truth, old, slightly_worse, TAX, tolerance=5.0, paired=False)["passed"]


def test_a_precision_fall_is_tested_on_its_false_alarms_and_hits():
    truth = np.array([TAX.leaf_index(t) for t in TRUTH])
    normal = [i for i, t in enumerate(TRUTH) if t == "normal"]
    perfect = _probs(TRUTH)

    def calling_bridge(frames):
        return _probs(["bridge" if i in frames else t for i, t in enumerate(TRUTH)])

    d = decide(truth, perfect, calling_bridge(set(normal[:6])), TAX, tolerance=1.0, paired=True)
    row = next(r for r in d["figures"] if r["figure"] == "precision bridge")
    assert row["after"] == pytest.approx(8 / 14) and row["failed"]
    assert row["p_worse"] == pytest.approx(2 * 0.5 ** 6)  # 6 new false alarms, hits unchanged; Bonferroni x2
    one = decide(truth, perfect, calling_bridge({normal[0]}), TAX, tolerance=1.0, paired=True)
    row = next(r for r in one["figures"] if r["figure"] == "precision bridge")
    assert row["delta_points"] == pytest.approx(-100 / 9) and not row["failed"]  # one frame: could be chance
    assert not decide(truth, perfect, calling_bridge({normal[0]}), TAX, tolerance=1.0, paired=False)["passed"]


# ---------------------------------------------------------------------------------------------- promote
def _run_cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def promote_case(tiny_run, tmp_path_factory):
    """tiny_run as the current model, labelled data on which its float model is right on every frame, and a copy
    with damaged float weights (same int8 model): promote must refuse the copy and accept an identical one."""
    from semhinet_tf.engines import load_model
    from semhinet_tf.model.io import save_model

    home = tmp_path_factory.mktemp("promote")
    old = tiny_run.copy_to(home / "old")
    stage, data = home / "stage", home / "data"
    stage.mkdir()
    for i, frame in enumerate(tiny_run.frames(48, seed=21)):
        Image.fromarray(frame).save(stage / f"f{i:03d}.png")
    engine = load_model(old / "float.keras", progress=False)
    from semhinet_tf.data.decode import load_frame

    files = sorted(stage.glob("*.png"))
    frames = np.stack([load_frame(p, engine.preprocess) for p in files])
    pred = TAX.leaf_probabilities(engine.predict(frames)).argmax(1)
    for p, leaf in zip(files, pred, strict=True):  # the truth is what the old float model says
        (data / TAX.leaves[leaf]).mkdir(parents=True, exist_ok=True)
        shutil.move(p, data / TAX.leaves[leaf] / p.name)
    split = {"root": str(data.resolve()), "train": [], "val": sorted(str(p.relative_to(data).as_posix())
                                                                     for p in data.rglob("*.png"))}
    (old / "split.json").write_text(json.dumps(split))
    same = shutil.copytree(old, home / "same")
    damaged = shutil.copytree(old, home / "damaged")
    model = tiny_run.float_model
    clone = type(model).from_config(model.get_config())
    clone.set_weights(model.get_weights())
    for h in TAX.heads:  # each head's leaning (its bias, see conftest) turned around
        kernel, bias = clone.get_layer(h.name).get_weights()
        clone.get_layer(h.name).set_weights([kernel, -bias])
    save_model(clone, damaged / "float.keras")
    return {"home": home, "old": old, "same": same, "damaged": damaged, "data": data}


def test_promote_refuses_a_worse_run_with_one_line_per_figure(promote_case):
    c = promote_case
    result = _run_cli("promote", c["damaged"], "--over", c["old"], "--data", c["data"], code=1)
    assert "refused" in result.output and "float: leaf accuracy 1.000 ->" in result.output
    assert "McNemar p=" in result.output
    assert "int8:" not in result.output  # the int8 model is the same file: no figure of it got worse
    assert not (c["home"] / "promoted.json").exists()
    log = [json.loads(line) for line in (c["home"] / "CHANGELOG.jsonl").read_text().splitlines()]
    assert log[-1]["decision"] == "refused" and log[-1]["frames"] == 48
    assert "refused over old" in (c["home"] / "CHANGELOG.md").read_text()


def test_promote_accepts_a_run_that_is_not_worse_and_records_it(promote_case):
    c = promote_case
    _run_cli("promote", c["same"], "--over", c["old"], "--data", c["data"], "--tolerance", "0")
    record = json.loads((c["home"] / "promoted.json").read_text())
    assert record["current"] == "same" and record["previous"] == str(c["old"].resolve())
    log = [json.loads(line) for line in (c["home"] / "CHANGELOG.jsonl").read_text().splitlines()]
    assert log[-1]["decision"] == "promoted"
    assert log[-1]["int8"]["figures"][0]["before"] == log[-1]["int8"]["figures"][0]["after"]
    # the current model is now `same`: promoting something over `old` again is refused unless --overwrite
    result = _run_cli("promote", c["damaged"], "--over", c["old"], "--data", c["data"], code=2)
    assert "the current model is" in result.output and "--overwrite" in result.output


def test_promote_refuses_a_run_without_int8_model_and_a_leak(promote_case, tmp_path):
    c = promote_case
    bare = shutil.copytree(c["old"], tmp_path / "bare")
    (bare / "model_int8.tflite").unlink()
    result = _run_cli("promote", bare, "--over", c["old"], "--data", c["data"], code=2)
    assert "semhinet convert" in result.output
    leaky = shutil.copytree(c["old"], tmp_path / "leaky")
    split = json.loads((leaky / "split.json").read_text())
    split["train"], split["val"] = split["val"][:5], split["val"][5:]
    (leaky / "split.json").write_text(json.dumps(split))
    result = _run_cli("promote", leaky, "--over", c["old"], "--data", c["data"], "--dry-run", code=2)
    assert "held-out frames" in result.output and len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- train --from
@pytest.fixture(scope="module")
def source_run(tiny_run, tmp_path_factory):
    """tiny_run made into a finished run of a synthetic data folder (full config, manifest, split) without
    training one: the fine-tuning starts from its weights all the same."""
    from semhinet_tf.data.decode import Preprocess
    from semhinet_tf.data.discover import discover, save_split, stratified_split
    from semhinet_tf.data.synth import generate

    home = tmp_path_factory.mktemp("from")
    data, new = home / "data", home / "new"
    generate(data, per_class=4, size=40, seed=3, workers=1)
    generate(new, per_class=1, size=40, seed=4, workers=1)
    run = tiny_run.copy_to(home / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"].update({"img_size": 32, "alpha": 0.35, "head_units": 16, "epochs": 3, "qat_epochs": 0,
                            "batch_size": 8, "steps_per_epoch": 2, "weights": "none", "lr": 1e-3, "seed": 1})
    config["model"] = {"img_size": 32, "backbone": {"alpha": 0.35, "bn_momentum": 0.9}, "head_units": 16}
    (run / "config.json").write_text(json.dumps(config))
    (run / "train_result.json").write_text(json.dumps({"seconds": 100.0}))
    manifest = discover(data, TAX, pre=Preprocess(size=32), progress=False)
    manifest.save(run)
    save_split(stratified_split(manifest, 0.25, seed=1), run)
    return {"home": home, "run": run, "data": data, "new": new}


def test_a_file_the_run_could_not_read_is_not_called_a_new_frame(source_run, tmp_path):
    """train --from warned "1 frame(s) ... are in neither side of the run's split (added since)" for a truncated
    JPEG the run had skipped: its scan does not decode, so the file looked new."""
    import shutil

    from semhinet_tf.data.decode import Preprocess
    from semhinet_tf.training.from_run import SourceRun, plan_data

    data = Path(shutil.copytree(source_run["data"], tmp_path / "data"))
    run = Path(shutil.copytree(source_run["run"], tmp_path / "run"))
    split = json.loads((run / "split.json").read_text())
    (run / "split.json").write_text(json.dumps({**split, "root": str(data.resolve())}))
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / "t.jpg")
    whole = (tmp_path / "t.jpg").read_bytes()
    (data / "crack" / "trunc.jpg").write_bytes(whole[: len(whole) // 2])  # its header (size) still reads
    (run / "skipped.csv").write_text("path,reason\ncrack/trunc.jpg,truncated image file\n")
    _, plan, _ = plan_data(data, SourceRun.load(run), TAX, None, Preprocess(size=32), progress=False)
    assert not any("neither side" in w for w in plan["warnings"]), plan["warnings"]
    (data / "crack" / "new.png").write_bytes((data / "crack" / sorted(os.listdir(data / "crack"))[0]).read_bytes())
    _, plan, _ = plan_data(data, SourceRun.load(run), TAX, None, Preprocess(size=32), progress=False)
    assert any("1 frame(s)" in w and "neither side" in w for w in plan["warnings"]), plan["warnings"]


@pytest.mark.slow
def test_train_from_a_run_with_reviewed_labels(source_run, tmp_path):
    s = source_run
    split = json.loads((s["run"] / "split.json").read_text())
    corrected = split["train"][0]  # a bogus training frame, reviewed as crack
    held_out = split["val"][0]
    new_frames = sorted(s["new"].rglob("*.png"))[:2]
    log = tmp_path / "review" / "labels.jsonl"
    log.parent.mkdir()
    append_answer(log, Answer("label", str(s["data"] / corrected), _sha(s["data"] / corrected), label="crack"))
    held_label = "open" if held_out.split("/")[0] != "open" else "crack"  # its folder's label was wrong
    append_answer(log, Answer("label", str(s["data"] / held_out), _sha(s["data"] / held_out), label=held_label))
    for p in new_frames:
        append_answer(log, Answer("label", str(p), _sha(p), label=p.parent.name))
    changed = sorted(s["new"].rglob("*.png"))[-1]
    append_answer(log, Answer("label", str(changed), "0" * 64, label="bridge"))  # edited since it was reviewed
    run2 = tmp_path / "run2"
    result = _run_cli("train", s["data"], "--from", s["run"], "--labels", log, "--out", run2)
    out = result.output
    assert "2 reviewed frame(s) added to training, 1 training label(s) corrected" in out
    assert "held-out frames of the run" in out and "changed since it was reviewed" in out
    assert "fine-tuning took" in out and "full training of" in out and "1.7 min" in out
    split2 = json.loads((run2 / "split.json").read_text())
    assert split2["val"] == split["val"]  # the same held-out frames: old and new compare on them
    assert held_out not in split2["train"] and corrected in split2["train"]
    assert {str(p.resolve()) for p in new_frames} <= set(split2["train"])
    assert str(changed.resolve()) not in split2["train"]
    rows = {r.split(",")[0]: r.split(",") for r in (run2 / "manifest.csv").read_text().splitlines()[1:]}
    assert rows[corrected][1] == "crack" and rows[corrected][-1] == corrected.split("/")[0]  # reviewed, folder
    # the held-out frame's correction is not lost: it stays held out, and is scored against the reviewed label
    assert "1 held-out label(s) corrected" in out
    assert rows[held_out][1] == held_label and rows[held_out][-1] == held_out.split("/")[0]
    from semhinet_tf.data.dataset import eval_items

    items, split_used, notes = eval_items(s["data"], TAX, run2, "val")
    assert split_used == "val" and dict((str(p), leaf) for p, leaf in items)[str(s["data"] / held_out)] == held_label
    assert any("1 frame(s) scored against their reviewed label" in n for n in notes)
    old_items, _, _ = eval_items(s["data"], TAX, s["run"], "val")  # the old run's own manifest has no review
    assert dict((str(p), leaf) for p, leaf in old_items)[str(s["data"] / held_out)] == held_out.split("/")[0]
    config = json.loads((run2 / "config.json").read_text())
    assert config["from"]["labels_sha256"] == _sha(log) and config["from"]["run"] == str(s["run"].resolve())
    assert config["train"]["epochs"] == 1 and config["train"]["alpha"] == 0.35  # a third; RUN's architecture
    assert config["from"]["base"] == {"lr": 1e-3, "epochs": 3, "qat_epochs": 0}  # RUN is the chain's full training
    assert (run2 / "float.keras").exists()


def test_promote_scores_both_runs_against_the_new_runs_reviewed_labels(source_run, tmp_path):
    """A held-out frame whose folder label RUN2's review corrected counts with the reviewed label for both runs."""
    from dataclasses import replace

    from semhinet_tf.data.discover import Manifest
    from semhinet_tf.promote import _with_reviewed_labels

    s = source_run
    split = json.loads((s["run"] / "split.json").read_text())
    held_out = split["val"][0]
    folder = held_out.split("/")[0]
    reviewed = "open" if folder != "open" else "crack"
    run2 = tmp_path / "run2"
    run2.mkdir()
    manifest = Manifest.load(s["run"])
    manifest.entries = [replace(e, leaf=reviewed, folder_leaf=folder) if e.path == held_out else e
                        for e in manifest.entries]
    manifest.save(run2)
    items = [(s["data"] / p, p.split("/")[0]) for p in split["val"]]
    notes: list[str] = []
    out = _with_reviewed_labels(items, s["data"], run2, notes)
    assert [leaf for _, leaf in out] == [reviewed if p == held_out else p.split("/")[0] for p in split["val"]]
    assert len(notes) == 1 and notes[0].startswith("1 held-out frame(s) scored against the label")
    assert _with_reviewed_labels(items, s["data"], s["run"], []) == items  # a run without a review changes nothing


def test_train_from_refuses_unknown_labels_and_other_architectures(source_run, tmp_path):
    s = source_run
    log = tmp_path / "labels.jsonl"
    frame = sorted(s["new"].rglob("*.png"))[0]
    append_answer(log, Answer("label", str(frame), _sha(frame), label="bridge"))
    append_answer(log, Answer("label", str(frame), _sha(frame), label="scratch"))
    result = _run_cli("train", s["data"], "--from", s["run"], "--labels", log, "--out", tmp_path / "r", code=2)
    assert f"{log} line 2" in result.output and "'scratch'" in result.output
    assert not (tmp_path / "r").exists()
    result = _run_cli("train", s["data"], "--from", s["run"], "--out", tmp_path / "r", "--img-size", "64", code=2)
    assert "img_size 32 -> 64" in result.output
    result = _run_cli("train", s["data"], "--labels", log, "--out", tmp_path / "r", code=2)
    assert "--from" in result.output
    result = _run_cli("train", s["new"], "--from", s["run"], "--out", tmp_path / "r", code=2)
    assert "validation frames, which live in its own data folder" in result.output
    assert not (tmp_path / "r").exists()


def test_compare_tests_int8_against_float_on_the_same_images(promote_case, tmp_path):
    """Issue 26.3: compare's float-vs-int8 difference as a paired test, and its gate's 'not significantly worse'."""
    from semhinet_tf import stats

    c = promote_case
    out_json = tmp_path / "compare.json"
    result = CliRunner().invoke(main, ["compare", str(c["old"]), "--data", str(c["data"]), "--not-worse",
                                       "--json", str(out_json)])
    report = json.loads(out_json.read_text())
    int8 = next(m for m in report["models"] if m["format"] == "tflite")
    lost, gained = int8["leaf_discordant"]
    # the truth is the float model's answer, so every int8 flip is a frame lost and none is gained
    assert (lost, gained) == (len(int8["flips"]), 0)
    assert int8["leaf_p_worse"] == pytest.approx(0.5 ** lost)
    assert int8["leaf_mcnemar_p"] == pytest.approx(stats.mcnemar(lost, 0))
    significant = 0.5 ** lost < 0.05
    assert report["gate"]["passed"] == (not significant)
    assert result.exit_code == (1 if significant else 0) and "McNemar p(worse)=" in result.output
    assert int8["leaf_accuracy_ci"][0] <= int8["leaf_accuracy"] <= int8["leaf_accuracy_ci"][1]


def test_fine_tuning_defaults_to_a_third_of_what_the_run_ran(source_run, tmp_path):
    from semhinet_tf.training.config import TrainConfig
    from semhinet_tf.training.from_run import SourceRun, fine_tune_config

    run = shutil.copytree(source_run["run"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"].update(epochs=30, qat_epochs=6)
    (run / "config.json").write_text(json.dumps(config))
    (run / "train_state.json").write_text(json.dumps({"float": {"epoch": 17, "stopped": True},
                                                      "qat": {"epoch": 6}}))
    cfg = fine_tune_config(SourceRun.load(run), TrainConfig(img_size=999, epochs=50), given={"sampler"})
    assert (cfg.epochs, cfg.qat_epochs) == (6, 2)  # 17 float epochs ran (early stop), 6 QAT
    assert cfg.img_size == 32 and cfg.alpha == 0.35 and cfg.lr == pytest.approx(1e-3 / 3)  # not given: RUN's
    assert cfg.weights.endswith("float.keras") and cfg.bn_momentum == 0.9
    given = fine_tune_config(SourceRun.load(run), TrainConfig(epochs=4, sampler="natural"), given={"epochs", "sampler"})
    assert given.epochs == 4 and given.sampler == "natural"

    # RUN fine-tuned from a full training: a third of that training's, not a third of a third (a review loop's
    # fourth round trained at 1/81 of the rate and learned nothing)
    config["train"].update(lr=1e-3 / 3, epochs=10)
    config["from"] = {"run": "/elsewhere/run0", "base": {"lr": 1e-3, "epochs": 30, "qat_epochs": 6}}
    (run / "config.json").write_text(json.dumps(config))
    chained = fine_tune_config(SourceRun.load(run), TrainConfig(), given=set())
    assert chained.lr == pytest.approx(1e-3 / 3) and (chained.epochs, chained.qat_epochs) == (10, 2)
    del config["from"]["base"]  # fine-tuned before the base was recorded: its own figures were a third of it
    (run / "config.json").write_text(json.dumps(config))
    legacy = fine_tune_config(SourceRun.load(run), TrainConfig(), given=set())
    assert legacy.lr == pytest.approx(1e-3 / 3) and (legacy.epochs, legacy.qat_epochs) == (17, 6)


def test_an_unreadable_promotion_record_is_refused_not_replaced(tmp_path):
    from semhinet_tf.artifacts.run import RunDirError
    from semhinet_tf.promote import PROMOTED, _current

    assert _current(tmp_path) is None  # no record yet
    (tmp_path / PROMOTED).write_text("{not json")
    with pytest.raises(RunDirError, match="not a promotion record.*--overwrite") as err:
        _current(tmp_path)
    assert str(tmp_path / PROMOTED) in str(err.value) and "\n" not in str(err.value)
    assert _current(tmp_path, overwrite=True) is None
    assert (tmp_path / PROMOTED).read_text() == "{not json"  # reading never changes it
