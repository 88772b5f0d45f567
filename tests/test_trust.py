"""Nothing the user has is lost (issue 22, points 2-4 and 9): --overwrite and --resume only touch run
directories, every output is checked before the work starts, writes are atomic under unique names, and
Ctrl-C ends a command in one line with exit 130.

Each test here failed on commit 933bc67; none of them trains a model (every refusal comes before any work).
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from semhinet_tf.artifacts.files import OutputError, atomic_open, check_outputs
from semhinet_tf.artifacts.run import LOCK, MARKER, RunDirError, is_run_output, prepare_run_dir
from semhinet_tf.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "semhinet_tf"


def _refused(*args: str) -> str:
    """Run the CLI; assert it refused (exit 2) in one line without a traceback; return that line."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def data(tmp_path) -> Path:
    """A user's data folder: 80 small images in class folders, plus a notes file."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for leaf in ("normal", "bogus", "bridge", "open", "cmp", "crack", "ler", "inc_etch"):
        (root / leaf).mkdir(parents=True)
        for k in range(10):
            Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(root / leaf / f"{k}.png")
    (root / "notes.txt").write_text("the engineer's notes\n")
    return root


# ---------------------------------------------------------------- point 2: --overwrite and --resume
@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_train_overwrite_never_deletes_the_data_it_reads(data, where):
    out = {"same": data, "inside": data / "normal", "parent": data.parent}[where]
    before = _snapshot(data)
    line = _refused("train", str(data), "--out", str(out), "--overwrite", "--epochs", "1")
    assert "input" in line and str(out) in line
    assert _snapshot(data) == before  # all 80 images and the notes are still there


def test_overwrite_never_empties_a_folder_the_project_did_not_write(tmp_path, data):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("months of work")
    line = _refused("train", str(data), "--out", str(mine), "--overwrite", "--epochs", "1")
    assert "not a run directory" in line
    line = _refused("quickstart", "--out", str(mine), "--overwrite")
    assert "not a quickstart folder" in line
    assert (mine / "chapter1.tex").read_text() == "months of work"


def test_files_with_our_names_do_not_make_a_users_folder_a_run_directory(tmp_path, data):
    """A folder holding only a user's config.json and checkpoint/ notes was taken for a failed run's leftovers:
    reused without --overwrite (training replaced the config and removed checkpoint/float) or emptied with it."""
    mine = tmp_path / "experiment"
    (mine / "checkpoint" / "float").mkdir(parents=True)
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "checkpoint" / "float" / "notes.txt").write_text("what I tried")
    before = _snapshot(mine)
    for extra in ([], ["--overwrite"]):
        line = _refused("train", str(data), "--out", str(mine), "--epochs", "1", *extra)
        assert "not a run directory" in line
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["checkpoint", "config.json"]


def test_quickstart_overwrite_keeps_the_review_loop_beside_it(tmp_path):
    """The README's review loop writes review/, run2/ and promote's changelog into the quickstart folder;
    quickstart --overwrite emptied the whole folder, a person's answers with it."""
    from semhinet_tf.artifacts.run import QUICKSTART_FILES, QUICKSTART_MARKER, QUICKSTART_SUMMARY, RunLock

    folder = tmp_path / "semhinet_quickstart"
    prepare_run_dir(folder, marker=QUICKSTART_MARKER).release()
    for name in ("data", "run"):
        (folder / name).mkdir()
    (folder / QUICKSTART_SUMMARY).write_text("{}")
    (folder / "review").mkdir()
    (folder / "review" / "labels.jsonl").write_text('{"label": "open"}\n')
    (folder / "CHANGELOG.jsonl").write_text("{}\n")
    before = _snapshot(folder)
    line = _refused("quickstart", "--out", str(folder), "--overwrite")
    assert "CHANGELOG.jsonl, review" in line and "removed nothing" in line
    assert _snapshot(folder) == before
    # only its own files: replaced, unless its run is being written by another process
    (folder / "review" / "labels.jsonl").unlink()
    (folder / "review").rmdir()
    (folder / "CHANGELOG.jsonl").unlink()
    with RunLock(folder / "run"):
        with pytest.raises(RunDirError, match="in use by another semhinet process"):
            prepare_run_dir(folder, overwrite=True, marker=QUICKSTART_MARKER, replaces=QUICKSTART_FILES)
    assert (folder / "run").is_dir()
    prepare_run_dir(folder, overwrite=True, marker=QUICKSTART_MARKER, replaces=QUICKSTART_FILES).release()
    assert sorted(p.name for p in folder.iterdir()) == sorted([LOCK, QUICKSTART_MARKER])


def test_train_overwrite_refuses_a_run_directory_holding_a_users_notes(tmp_path, data):
    """train --overwrite removed a my_notes.txt the user had put beside the models, without naming it."""
    run = tmp_path / "runs" / "x"
    prepare_run_dir(run).release()
    for name in ("config.json", "float.keras", "model_int8.tflite", "model_int8.onnx", "eval_val.json"):
        (run / name).write_text("ours")
    (run / "report").mkdir()
    (run / "report" / "index.html").write_text("<html>")
    (run / "checkpoint").mkdir()
    (run / "my_notes.txt").write_text("keep me")
    (run / "signoff").mkdir()
    (run / "signoff" / "ok.md").write_text("signed")
    before = _snapshot(run)
    line = _refused("train", str(data), "--out", str(run), "--overwrite", "--epochs", "1")
    assert "also holds my_notes.txt, signoff, not outputs of the run directory" in line
    assert "removed nothing" in line and _snapshot(run) == before
    (run / "my_notes.txt").unlink()
    (run / "signoff" / "ok.md").unlink()
    (run / "signoff").rmdir()
    prepare_run_dir(run, overwrite=True, replaces=is_run_output).release()
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK, MARKER])


def test_a_finished_quickstart_folder_suggests_only_the_options_quickstart_has(tmp_path):
    """The refusal said "use --resume to continue it", an option the quickstart does not have."""
    from semhinet_tf.artifacts.run import QUICKSTART_MARKER

    folder = tmp_path / "semhinet_quickstart"
    prepare_run_dir(folder, marker=QUICKSTART_MARKER).release()
    (folder / "quickstart_summary.json").write_text("{}")
    line = _refused("quickstart", "--out", str(folder))
    assert "exists and is not empty (use --overwrite to replace it)" in line and "--resume" not in line


def test_quickstart_overwrite_refuses_a_data_folder(data):
    before = _snapshot(data)
    _refused("quickstart", "--out", str(data), "--overwrite")
    assert _snapshot(data) == before


def test_overwrite_replaces_a_run_directory_it_recognises(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run)
    assert (run / MARKER).is_file()
    (run / "history.csv").write_text("epoch\n1\n")
    with pytest.raises(RunDirError, match="--overwrite"):
        prepare_run_dir(run)
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK, MARKER])  # emptied; the claim's file stays
    # a run made before the marker existed is recognised by its config and taxonomy
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"train": {}}))
    (old / "taxonomy.json").write_text("{}")
    (old / "float.keras").write_text("model")
    prepare_run_dir(old, overwrite=True)
    assert not (old / "float.keras").exists()


_HOLD = """
import sys, time
from pathlib import Path
from semhinet_tf.artifacts.run import prepare_run_dir
claim = prepare_run_dir(Path(sys.argv[1]), overwrite=True)
(Path(sys.argv[1]) / "history.csv").write_text("epoch\\n1\\n")
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_run_being_written_is_never_entered_by_a_second_command(tmp_path, data):
    """Two trainings into one folder mixed their checkpoints, and --overwrite of a run still training emptied it
    under the first: the writing process holds the run's lock, so train (new, --resume, --overwrite), quickstart
    and convert are refused in one line naming the holder; the lock dies with its process (kill -9 included)."""
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        before = _snapshot(run)
        for args in (["train", str(data), "--out", str(run), "--epochs", "1"],
                     ["train", str(data), "--out", str(run), "--overwrite", "--epochs", "1"],
                     ["train", str(data), "--out", str(run), "--resume"]):
            line = _refused(*args)
            assert "in use by another semhinet process" in line and f"pid {holder.pid}" in line, line
        with pytest.raises(RunDirError, match=f"in use by another semhinet process \\(pid {holder.pid}"):
            prepare_run_dir(run, overwrite=True, kind="quickstart folder")
        _fake_convertible_run_files(run)
        line = _refused("convert", str(run), "--out", str(tmp_path / "m.tflite"))
        assert "in use by another semhinet process" in line and "when that training has ended" in line
        line = _refused("train", str(data), "--from", str(run), "--out", str(tmp_path / "run2"))
        assert "--from needs a finished run, and this one is in use" in line and f"pid {holder.pid}" in line
        prepare_run_dir(tmp_path / "other").release()
        line = _refused("promote", str(run), "--over", str(tmp_path / "other"), "--data", str(data))
        assert "is in use by another semhinet process" in line and "when its training has ended" in line
        assert {k: v for k, v in _snapshot(run).items() if k in before} == before
        from semhinet_tf.workflow import still_training_warning  # what eval and compare add to their notes

        (warning,) = still_training_warning(run)
        assert f"pid {holder.pid}" in warning and "training may still replace them" in warning
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert still_training_warning(run) == []
    with prepare_run_dir(run, overwrite=True):  # the killed holder left no stale lock
        assert sorted(p.name for p in run.iterdir()) == sorted([LOCK, MARKER])
    prepare_run_dir(run, overwrite=True).release()  # and a released claim can be taken again


def test_the_lock_touches_no_finished_run_and_never_stops_work_where_flock_is_missing(tmp_path, data,
                                                                                      monkeypatch):
    """A refused train leaves a finished run byte for byte (no lock file written into it); a file system without
    flock (some network mounts: ENOLCK) trains unlocked instead of calling every run busy; a lock file naming a
    process that has ended is not quoted as the holder."""
    import errno
    import fcntl

    run = tmp_path / "run"
    prepare_run_dir(run).release()
    (run / LOCK).unlink()
    (run / "history.csv").write_text("epoch\n1\n")
    before = _snapshot(run)
    _refused("train", str(data), "--out", str(run), "--epochs", "1")
    assert _snapshot(run) == before and not (run / LOCK).exists()

    (run / LOCK).write_text(json.dumps({"pid": 2 ** 22 + 12345, "since": "yesterday", "command": "semhinet train"}))
    with open(run / LOCK) as other:
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held by something that wrote no pid of its own
        with pytest.raises(RunDirError) as refused:
            prepare_run_dir(run, overwrite=True)
    assert "in use by another semhinet process;" in str(refused.value) and "yesterday" not in str(refused.value)

    from semhinet_tf.artifacts import run as run_module

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(run_module, "open", read_only, raising=False)  # a read-only run folder (root ignores chmod)
    with pytest.raises(RunDirError, match=r"run: cannot be written \(Permission denied\); choose another --out"):
        prepare_run_dir(run, overwrite=True)
    monkeypatch.undo()

    def no_flock(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with prepare_run_dir(run, overwrite=True):
        assert (run / MARKER).is_file() and not (run / "history.csv").exists()


def test_resume_only_continues_a_run_directory(tmp_path, data):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"jpeg bytes")
    line = _refused("train", str(data), "--out", str(folder), "--resume", "--epochs", "1")
    assert "not a run directory" in line
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


def _fake_run(run: Path, data: Path, **train) -> None:
    from semhinet_tf.taxonomy import Taxonomy
    from semhinet_tf.train import TrainConfig

    prepare_run_dir(run)
    cfg = TrainConfig(**train)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "data_dir": str(data.resolve())}))
    (run / "taxonomy.json").write_text(json.dumps(Taxonomy.default().to_spec()))
    (run / "train_state.json").write_text(json.dumps({"float": {"epoch": 1}}))


def test_resume_with_changed_options_names_each_difference(tmp_path, data):
    run = tmp_path / "run"
    _fake_run(run, data, img_size=64, batch_size=16, lr=1e-3)
    line = _refused("train", str(data), "--out", str(run), "--resume", "--img-size", "32", "--batch-size", "8",
                    "--epochs", "3")
    assert "img_size 64 -> 32" in line and "batch_size 16 -> 8" in line and "epochs" not in line.split("but:")[1]
    other = tmp_path / "other_data"
    other.mkdir()
    line = _refused("train", str(other), "--out", str(run), "--resume")
    assert "data " in line and str(other.resolve()) in line


def test_resume_keeps_the_runs_options_and_takes_new_epoch_counts(tmp_path, data):
    from semhinet_tf.train import TrainConfig, resumed_config

    run = tmp_path / "run"
    _fake_run(run, data, img_size=64, batch_size=16, lr=1e-3, epochs=5)
    asked = TrainConfig(epochs=9, qat_epochs=2)  # only the epoch counts typed: everything else from the run
    cfg = resumed_config(run, asked, data, given={"epochs", "qat_epochs"})
    assert (cfg.img_size, cfg.batch_size, cfg.lr, cfg.epochs, cfg.qat_epochs) == (64, 16, 1e-3, 9, 2)
    same = TrainConfig(img_size=64, batch_size=16, lr=1e-3, epochs=7)  # the whole original command again
    assert resumed_config(run, same, data).epochs == 7
    bare = resumed_config(run, TrainConfig(), data, given=set())  # `train DATA --out RUN --resume` alone
    assert (bare.epochs, bare.img_size) == (5, 64), bare  # was 30, the default: a resume that trained 10x longer


def test_resume_says_where_each_phase_starts():
    """A run interrupted before its first epoch ended has nothing saved: --resume says so instead of silently
    training from the start; a missing checkpoint is named; a finished phase is skipped."""
    from semhinet_tf.training.loop import resume_point

    assert resume_point("float", {}, False, 5, resume=False) == (0, "")
    start, said = resume_point("float", {}, False, 5, resume=True)
    assert start == 0 and "no epoch of this phase had finished" in said
    assert resume_point("float", {"epoch": 2}, True, 5, resume=True) == (2, "resuming after epoch 2")
    start, said = resume_point("float", {"epoch": 2}, False, 5, resume=True)
    assert start == 0 and "checkpoint of epoch 2 is missing" in said
    assert resume_point("qat", {"epoch": 5}, True, 5, resume=True)[0] is None
    assert resume_point("qat", {"epoch": 3, "stopped": True}, True, 5, resume=True)[0] is None


def test_resume_and_overwrite_together_are_refused(tmp_path, data):
    result = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "r"), "--resume", "--overwrite"])
    assert result.exit_code == 2 and "give one of them" in result.output


# ---------------------------------------------------------------- point 3: outputs checked before the work
def _fake_convertible_run(run: Path) -> None:
    prepare_run_dir(run)
    _fake_convertible_run_files(run)


def _fake_convertible_run_files(run: Path) -> None:
    from semhinet_tf.taxonomy import Taxonomy

    (run / "config.json").write_text(json.dumps({"train": {"granularity": "per-channel", "seed": 0},
                                                 "model": {"img_size": 32}, "preprocess": {}}))
    (run / "taxonomy.json").write_text(json.dumps(Taxonomy.default().to_spec()))
    (run / "qat.h5").write_bytes(b"never loaded: the outputs are refused first")


def test_convert_refuses_to_clobber_the_contract_and_npu_report_beside_out(tmp_path):
    run, deploy = tmp_path / "run", tmp_path / "deploy"
    _fake_convertible_run(run)
    deploy.mkdir()
    (deploy / "model.json").write_text("the user's own model.json")
    (deploy / "model.npu.json").write_text("the user's own notes")
    line = _refused("convert", str(run), "--out", str(deploy / "model.tflite"))
    assert "model.json" in line and "model.npu.json" in line and "--overwrite" in line
    assert (deploy / "model.json").read_text() == "the user's own model.json"
    assert not (deploy / "model.tflite").exists()


def test_eval_refuses_to_clobber_a_report_or_json_before_loading_anything(tmp_path, data):
    model = tmp_path / "never_loaded.keras"
    model.write_text("the outputs are refused before the model is opened")
    report = tmp_path / "report"
    report.mkdir()
    (report / "README.md").write_text("my own report")
    line = _refused("eval", str(model), "--data", str(data), "--report", str(report))
    assert "README.md" in line
    assert (report / "README.md").read_text() == "my own report"
    (tmp_path / "metrics.json").write_text("{}")
    assert "metrics.json" in _refused("eval", str(model), "--data", str(data), "--json", str(tmp_path / "metrics.json"))


@pytest.mark.parametrize("command", ["npu-check", "bench"])
def test_json_outputs_of_npu_check_and_bench_are_checked_first(tmp_path, command):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"never read")
    (tmp_path / "out.json").write_text("kept")
    _refused(command, str(model), "--json", str(tmp_path / "out.json"))
    assert (tmp_path / "out.json").read_text() == "kept"


def test_a_path_that_is_no_model_and_a_finished_synth_folder_are_refusals_exit_2(tmp_path, data):
    """README: exit 2 for a bad model or usage, as every refused output. Found by a walkthrough: `predict
    DATA/dataset.json imgs/` and `predict imgs/ imgs/` exited 1 (the code for unreadable images), as did synth
    into its own earlier set, whose message also named the Python argument overwrite=True."""
    (data / "dataset.json").write_text("{}")
    assert "unknown model format" in _refused("predict", str(data / "dataset.json"), str(data))
    assert "not a model: a folder without qat.h5 or float.keras" in _refused("predict", str(data / "normal"), str(data))
    from semhinet_tf.data.synth import generate

    generate(tmp_path / "s", per_class=1, size=40, seed=1, workers=1, progress=False, labels="cause")
    line = _refused("synth", str(tmp_path / "s"), "--per-class", "1", "--size", "40")
    assert line.endswith("holds a synthetic data set (use --overwrite to replace it)"), line


def test_synth_never_writes_into_a_folder_it_did_not_make(data):
    before = _snapshot(data)
    result = CliRunner().invoke(main, ["synth", str(data), "--overwrite", "--per-class", "1"])
    assert result.exit_code != 0 and "not a data set written by synth" in result.output
    assert _snapshot(data) == before


def test_synth_overwrite_never_deletes_frames_it_did_not_write(tmp_path):
    from semhinet_tf.data.synth import generate

    out = tmp_path / "s"
    generate(out, per_class=1, size=40, seed=1, workers=1, progress=False, labels="cause")
    mine = out / "normal" / "lot5" / "real.png"
    mine.parent.mkdir()
    mine.write_bytes(b"a real frame")
    result = CliRunner().invoke(main, ["synth", str(out), "--per-class", "1", "--size", "40", "--overwrite"])
    assert result.exit_code != 0 and "1 file(s) synth did not write (e.g. normal/lot5/real.png)" in result.output
    assert mine.read_bytes() == b"a real frame"
    mine.unlink()
    generate(out, per_class=2, size=40, seed=2, workers=1, progress=False, labels="cause", overwrite=True)
    assert len(list((out / "normal").glob("*.png"))) == 2  # only synth's own frames: replaced


def test_check_outputs_names_every_existing_file_at_once(tmp_path):
    (tmp_path / "a").write_text("")
    (tmp_path / "b").write_text("")
    with pytest.raises(OutputError, match="a, .*b: exist"):
        check_outputs([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    check_outputs([tmp_path / "a", tmp_path / "b"], overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        check_outputs([tmp_path / "file" / "x.json"])


@pytest.mark.parametrize("command", [
    ["npu-check", "{m}", "--json", "{m}"], ["bench", "{m}", "--json", "{m}"],
    ["predict", "{m}", "{img}", "--out", "{m}"], ["predict", "{m}", "{img}", "--out", "{img}"],
    ["export-onnx", "{m}", "--out", "{m}"], ["eval", "{m}", "--data", "{d}", "--json", "{m}"]])
def test_overwrite_never_lets_an_output_replace_the_commands_own_input(tmp_path, command):
    """--overwrite replaces an earlier output, never what the command reads (found: predict --out MODEL.tflite
    --overwrite destroyed the model)."""
    model, image = tmp_path / "m.tflite", tmp_path / "d" / "normal" / "img.png"
    model.write_bytes(b"the only copy")
    image.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    before = image.read_bytes()
    args = [a.format(m=model, img=image, d=tmp_path / "d") for a in command] + ["--overwrite"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "is an input of this command" in result.output, result.output
    assert model.read_bytes() == b"the only copy" and image.read_bytes() == before
    from semhinet_tf.board.__main__ import main as board_main

    assert board_main([str(model), str(image), "--out", str(model), "--overwrite"]) == 2
    assert model.read_bytes() == b"the only copy"


def _run_files(folder: Path) -> Path:
    """A run folder as `semhinet train` leaves it (every trained file a few bytes: each refusal comes first), plus
    a conversion and an earlier eval's JSON."""
    from semhinet_tf.artifacts.run import TRAINED_FILES
    from semhinet_tf.taxonomy import Taxonomy

    folder.mkdir(parents=True)
    for name in TRAINED_FILES:
        (folder / name).write_text(f"the run's {name}")
    (folder / "config.json").write_text(json.dumps({"train": {}, "model": {"img_size": 32}}))
    (folder / "taxonomy.json").write_text(json.dumps(Taxonomy.default().to_spec()))
    for name in ("model_int8.tflite", "model_int8.json", "eval.json"):
        (folder / name).write_text(f"earlier {name}")
    return folder


@pytest.mark.parametrize("command", [
    ["eval", "{run}", "--data", "{d}", "--json", "{run}/float.keras"],
    ["eval", "{run}/model_int8.tflite", "--data", "{d}", "--json", "{run}/split.json"],
    ["compare", "{run}", "--data", "{d}", "--json", "{run}/config.json"],
    ["compare", "{run}", "--data", "{d}", "--json", "{run}/model_int8.tflite"],
    ["export-onnx", "{run}", "--out", "{run}/qat.h5"],
    ["convert", "{run}", "--out", "{run}/config.tflite"],
    ["predict", "{run}/model_int8.tflite", "{d}", "--out", "{run}/taxonomy.json"],
    ["npu-check", "{run}/model_int8.tflite", "--json", "{run}/review_threshold.json"],
    ["bench", "{run}/model_int8.tflite", "--json", "{run}/train_result.json"],
    ["review", "queue", "{run}/model_int8.tflite", "{d}", "--out", "{run}"],  # its review.json? no: queue.jsonl
])
def test_a_model_path_protects_every_file_of_its_run(tmp_path, data, command):
    """A run folder, or a model inside one, stands for the run's trained files: no output may replace one, even
    with --overwrite (found: `eval RUN --json RUN/float.keras --overwrite` would have replaced the model, because
    an input that is a folder protected nothing inside it)."""
    run = _run_files(tmp_path / "run")
    before = _snapshot(run)
    args = [a.format(run=run, d=data) for a in command] + ["--overwrite"]
    result = CliRunner().invoke(main, args)
    if command[0] == "review":  # writes queue.jsonl and review.json, which are not the run's: allowed to start
        assert "is an input of this command" not in result.output, result.output
    else:
        assert result.exit_code == 2 and "is an input of this command" in result.output, result.output
    assert "Traceback" not in result.output
    assert {k: v for k, v in _snapshot(run).items() if k != LOCK} == before  # convert may add its empty lock file


@pytest.mark.parametrize("command", [
    ["predict", "{m}", "{d}", "--out", "{d}/normal/0.png"], ["predict", "{m}", "{d}", "--out", "{d}/normal/new.png"],
    ["predict", "{m}", "{d}/normal", "--out", "{d}/normal/sub/x.TIF"],
    ["eval", "{m}", "--data", "{d}", "--json", "{d}/bogus/3.png"],
    ["eval", "{m}", "--data", "{d}", "--json", "{d}/dataset.json"],
    ["eval", "{m}", "--data", "{d}", "--json", "x.json", "--report", "{d}/report"],
])
def test_no_output_is_written_among_the_frames_a_command_reads(tmp_path, data, command):
    """An image written into a folder of frames the command reads would replace one, or be read as one by the next
    command given the folder; the refusal comes before any work and the folder is unchanged."""
    model = tmp_path / "m.tflite"
    model.write_bytes(b"the only copy")
    (data / "dataset.json").write_text("{}")
    before = _snapshot(data)
    args = [a.format(m=model, d=data) for a in command] + ["--overwrite"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code != 0 and "a folder of frames this command reads" in result.output, result.output
    assert _snapshot(data) == before and model.read_bytes() == b"the only copy"
    from semhinet_tf.board.__main__ import main as board_main

    assert board_main([str(model), str(data), "--out", str(data / "normal" / "0.png"), "--overwrite"]) == 2
    assert _snapshot(data) == before


def test_convert_never_writes_beside_the_frames_it_calibrates_on(tmp_path, data):
    """convert reads the run's data set (calibration, readiness): its contract JSON may not replace the data
    set's dataset.json (`--out DATA/dataset.tflite` writes DATA/dataset.json)."""
    run = _run_files(tmp_path / "run")
    (run / "config.json").write_text(json.dumps({"train": {}, "model": {"img_size": 32}, "data_dir": str(data)}))
    (data / "dataset.json").write_text("{}")
    line = _refused("convert", str(run), "--out", str(data / "dataset.tflite"), "--overwrite")
    assert "a folder of frames this command reads" in line and (data / "dataset.json").read_text() == "{}"


def test_review_queue_never_replaces_the_verdicts_it_reads(tmp_path):
    """`review queue MODEL VERDICTS.jsonl --out FOLDER` writes FOLDER/queue.jsonl: never over its input."""
    model, verdicts = tmp_path / "m.tflite", tmp_path / "queue.jsonl"
    model.write_bytes(b"the only copy")
    verdicts.write_text('{"path": "a.png"}\n')
    line = _refused("review", "queue", str(model), str(verdicts), "--out", str(tmp_path), "--overwrite")
    assert "is an input of this command" in line and verdicts.read_text() == '{"path": "a.png"}\n'


def test_outputs_beside_what_a_command_reads_stay_allowed(tmp_path, data):
    """What the protection must not refuse: eval's JSON beside the model in its run (again, with --overwrite), a
    conversion replaced by convert --overwrite, predict's JSON lines in the image folder, a report beside the data."""
    from semhinet_tf.artifacts.run import model_inputs

    run = _run_files(tmp_path / "run")
    for model in (run, run / "float.keras", run / "model_int8.tflite"):
        check_outputs([run / "eval.json"], overwrite=True, inputs=[*model_inputs(model), data])
    check_outputs([run / "model_int8.tflite", run / "model_int8.json"], overwrite=True, inputs=model_inputs(run))
    check_outputs([run / "model_int8.npu.json"], overwrite=True, inputs=model_inputs(run / "model_int8.tflite"))
    check_outputs([data / "verdicts.jsonl", data / "normal" / "notes.json", tmp_path / "report.png"],
                  inputs=[tmp_path / "m.tflite", data])
    assert sorted(p.name for p in model_inputs(run / "model_int8.tflite"))[:4] == [
        ".semhinet-run", "config.json", "float.keras", "history.csv"]
    assert model_inputs(tmp_path / "elsewhere.onnx") == [tmp_path / "elsewhere.onnx"]


# ---------------------------------------------------------------- point 4: atomic writes, unique names
def test_concurrent_writers_of_one_file_never_mix_their_lines(tmp_path):
    target = tmp_path / "verdicts.jsonl"
    barrier = threading.Barrier(2)

    def write(tag: str) -> None:
        with atomic_open(target) as f:
            barrier.wait()  # both temporary files are open at the same time
            for i in range(2000):
                f.write(json.dumps({"writer": tag, "i": i}) + "\n")

    threads = [threading.Thread(target=write, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 2000 and len({r["writer"] for r in rows}) == 1  # one whole result, the other's replaced
    assert [p.name for p in tmp_path.iterdir()] == ["verdicts.jsonl"]  # no temporary file left


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_open(target) as f:
        f.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_no_module_writes_through_a_fixed_temporary_name():
    """Every atomic write goes through semhinet_tf.artifacts.files (mkstemp: a unique name per writer)."""
    fixed = re.compile(r"""with_name\(f?["'][^"']*\.(tmp|part)|\+ ["']\.tmp|\.tmp\.npz|os\.replace\(""")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "files.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if fixed.search(line)]
    assert offenders == []


def test_board_refuses_a_folder_or_an_existing_out_before_loading_the_model(tmp_path, capsys):
    from semhinet_tf.board.__main__ import main as board_main

    model = tmp_path / "m.tflite"
    model.write_bytes(b"not even read")
    assert board_main([str(model), str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "old.jsonl").write_text("yesterday\n")
    assert board_main([str(model), str(tmp_path), "--out", str(tmp_path / "old.jsonl")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "old.jsonl").read_text() == "yesterday\n"


# ---------------------------------------------------------------- point 9: Ctrl-C
def test_ctrl_c_in_predict_is_one_line_and_exit_130(tmp_path, monkeypatch):
    import semhinet_tf.workflow as workflow

    def interrupted(*args, **kwargs):
        yield {"path": "a.png", "class": "normal"}
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "predict_paths", interrupted)
    model = tmp_path / "m.tflite"
    model.write_bytes(b"")
    result = CliRunner().invoke(main, ["predict", str(model), str(tmp_path)])
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    last = result.output.splitlines()[-1]
    assert last.startswith("interrupted:") and "run again" in last


class _InterruptedBoardModel:
    """Stands in for BoardModel: classifies one image, then the user presses Ctrl-C."""

    path, input_size, input_dtype, views, engine, delegate = Path("m.tflite"), 32, "uint8", ["identity"], "x", None

    def __init__(self, *args, **kwargs):
        pass

    def warm_up(self) -> float:
        return 1.0

    def classify(self, paths, on_missing=None):
        yield {"path": "a.png", "verdict": "normal", "review": False, "infer_ms": 1.0}
        raise KeyboardInterrupt


def test_ctrl_c_on_the_board_is_one_line_exit_130_and_out_untouched(tmp_path, monkeypatch, capsys):
    import semhinet_tf.board.__main__ as board

    monkeypatch.setattr(board, "BoardModel", _InterruptedBoardModel)
    out = tmp_path / "verdicts.jsonl"
    assert board.main(["m.tflite", str(tmp_path), "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted") and "Traceback" not in "\n".join(err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad inputs named in one line (the audit's finds)
def _one_line_error(*args: str) -> str:
    """Run the CLI; assert it failed (exit 1 or 2) in one `error:` line without a traceback; return that line."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_inputs_found_by_the_audit_are_one_line_errors_naming_the_file(tiny_run, tmp_path, data):
    frame = tmp_path / "good.png"
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(frame)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(flat / "a.png")
    line = _one_line_error("eval", str(tiny_run.tflite), "--data", str(flat))  # images but no class folders
    assert str(flat) in line and "no class folders" in line
    line = _one_line_error("review", "queue", str(tiny_run.tflite), str(frame), "--out", str(tmp_path / "R"))
    assert str(frame) in line and "not a text file of JSON lines" in line
    taxonomy = tmp_path / "tax.yaml"
    taxonomy.write_bytes("name: x\n".encode("utf-16"))
    line = _one_line_error("train", str(data), "--out", str(tmp_path / "run"), "--taxonomy", str(taxonomy))
    assert str(taxonomy) in line and "not UTF-8" in line
    truncated = tmp_path / "half.h5"
    truncated.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 2000)
    line = _one_line_error("predict", str(truncated), str(frame))
    assert str(truncated) in line


def test_a_labels_file_without_one_readable_answer_is_refused(tmp_path):
    from semhinet_tf.taxonomy import Taxonomy
    from semhinet_tf.training.from_run import LabelsError, read_answers

    log = tmp_path / "labels.jsonl"
    log.write_bytes(b"\x89PNG\r\n\x1a\n not answers\n{broken\n")
    with pytest.raises(LabelsError, match="not one readable answer") as err:
        read_answers(log, Taxonomy.default())
    assert str(log) in str(err.value) and "\n" not in str(err.value)


def test_eval_on_a_copy_of_the_training_folder_says_so(tiny_run, tmp_path):
    """A copy (or a moved path) of the run's data folder has no saved split: every frame is scored, the training
    frames among them, and the user is told, with how many were trained on."""
    import shutil

    from semhinet_tf.data.decode import Preprocess
    from semhinet_tf.data.discover import discover, save_split, stratified_split
    from semhinet_tf.data.synth import generate
    from semhinet_tf.taxonomy import Taxonomy

    data = tmp_path / "data"
    generate(data, per_class=4, size=40, seed=3, workers=1, progress=False, labels="cause")
    run = tiny_run.copy_to(tmp_path / "run")
    manifest = discover(data, Taxonomy.default(), pre=Preprocess(size=32), progress=False)
    manifest.save(run)
    split = stratified_split(manifest, 0.25, seed=1)
    save_split(split, run)
    copy = Path(shutil.copytree(data, tmp_path / "copy"))
    result = CliRunner().invoke(main, ["eval", str(run / "model_int8.tflite"), "--data", str(copy)])
    assert result.exit_code == 0, result.output
    n_train = len(json.loads((run / "split.json").read_text())["train"])
    assert f"scored 32 frames of {copy} (all split)" in result.output
    assert f"warning: {n_train} of these 32 frames are byte for byte frames the model trained on" in result.output
    own = CliRunner().invoke(main, ["eval", str(run / "model_int8.tflite"), "--data", str(data)])
    assert "(the run's held-out split)" in own.output and "byte for byte" not in own.output


# ---------------------------------------------------------------- exit codes: 2 for a bad model, file or usage
def test_bad_models_files_and_usage_exit_2_in_one_line(tmp_path, data):
    """Each exited 1, the code for "some images could not be read" (or, for npu-check, for a model that fails
    the check), so a script could not tell them apart; a damaged .keras also waited ~10 s for TensorFlow."""
    (tmp_path / "model.keras").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "model.tflite").write_text("not a model")
    (tmp_path / "tax.yaml").write_text("heads: [unclosed\n")
    image = str(data / "normal" / "0.png")
    for args, words in [
        (["predict", str(tmp_path / "model.keras"), image], "model.keras: not a .keras (zip) or .h5"),
        (["npu-check", str(tmp_path / "model.tflite")], "model.tflite: not a TFLite model"),
        (["train", str(data), "--out", str(tmp_path / "run"), "--taxonomy", str(tmp_path / "tax.yaml")],
         "tax.yaml: not valid YAML"),
    ]:
        assert words in _refused(*args)


def test_a_damaged_keras_file_is_refused_before_tensorflow_loads(tmp_path, data):
    import subprocess
    import sys

    (tmp_path / "model.keras").write_bytes(b"PK\x03\x04 not really a zip")
    code = ("import sys; from semhinet_tf.cli import main\n"
            "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
            "except Exception as exc:\n    print(type(exc).__name__)\n"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "predict", str(tmp_path / "model.keras"),
                          str(data / "normal" / "0.png")], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["RefusedError", "False"], (out.stdout, out.stderr)
