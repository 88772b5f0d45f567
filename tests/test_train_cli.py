"""Training from the command line on small synthetic sets, each test its own: bad files skipped and listed, a class
without a usable image refused, the same seed giving the same run, the joint head loss through QAT, the CLI's
defaults and every command's help. (The shared trained run and what is done with it: test_end_to_end.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CAUSE

from semhinet_tf.cli import main

pytestmark = pytest.mark.slow


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _write_bad_files(folder: Path) -> list[str]:
    """One file of each bad kind (empty, truncated, not an image, 1x1, unreadable TIFF); returns their names."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.jpg").write_text("this is not an image\n")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(folder / "dot.png")
    (folder / "garbage.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    return ["empty.png", "truncated.png", "notes.jpg", "dot.png", "garbage.tif"]


def test_training_on_a_messy_folder_skips_and_lists_every_bad_file(tmp_path):
    data, run = tmp_path / "messy", tmp_path / "run"
    run_cli("synth", str(data), "--per-class", "4", "--size", "48", "--seed", "5", *CAUSE,
            "--mixed-formats")
    bad = _write_bad_files(data / "Bridge" / "lot9")
    (data / "misc_notes").mkdir()
    (data / "misc_notes" / "readme.png").write_bytes(b"\x89PNG not really")
    out = run_cli("train", str(data), "--out", str(run), "--img-size", "32", "--epochs", "1", "--qat-epochs", "0",
                  "--batch-size", "8", "--weights", "none", "--val-split", "0.25")
    assert "5 skipped" in out and "unknown folders: misc_notes" in out
    skipped = (run / "skipped.csv").read_text()
    for name in bad:
        assert name in skipped, name
    rows = [line.split(",", 1) for line in skipped.strip().splitlines()[1:]]
    assert len(rows) == 5 and all(len(r) == 2 and r[1].strip() for r in rows)  # every file has its reason
    manifest = (run / "manifest.csv").read_text()
    assert "truncated.png" not in manifest and "misc_notes" not in manifest
    assert (run / "float.keras").exists()


def test_training_refuses_when_a_class_has_no_usable_image(tmp_path):
    data = tmp_path / "data"
    run_cli("synth", str(data), "--per-class", "3", "--size", "32", "--seed", "2", *CAUSE)
    import shutil

    shutil.rmtree(data / "crack")
    _write_bad_files(data / "crack")
    result = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                                       "--img-size", "32", "--weights", "none"])
    assert result.exit_code != 0
    assert "error:" in result.output and "crack" in result.output
    assert "Traceback" not in result.output
    # the failed run left only its data report; fixing the data and training again needs no --overwrite
    assert (tmp_path / "run" / "skipped.csv").exists()
    again = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                                      "--img-size", "32", "--weights", "none"])
    assert "exists and is not empty" not in again.output and "crack" in again.output


def test_same_seed_same_split_sampling_and_metrics(tmp_path):
    data = tmp_path / "data"
    run_cli("synth", str(data), "--per-class", "5", "--size", "32", "--seed", "8", *CAUSE)
    histories, splits = [], []
    for name in ("a", "b"):
        run = tmp_path / name
        run_cli("train", str(data), "--out", str(run), "--img-size", "32", "--epochs", "2", "--qat-epochs", "0",
                "--batch-size", "8", "--weights", "none", "--seed", "11")
        splits.append(json.loads((run / "split.json").read_text()))
        histories.append((run / "history.csv").read_text().splitlines())
    assert splits[0]["train"] == splits[1]["train"] and splits[0]["val"] == splits[1]["val"]
    header = histories[0][0].split(",")
    for row_a, row_b in zip(histories[0][1:], histories[1][1:], strict=True):
        for key, va, vb in zip(header, row_a.split(","), row_b.split(","), strict=True):
            if key not in ("phase", "epoch"):
                assert float(va) == pytest.approx(float(vb), rel=1e-4, abs=1e-5), key


def test_joint_head_loss_trains_through_qat(tmp_path):
    """--head-loss joint (logit-adjusted gatekeeper) runs both phases and is recorded in the run's config."""
    data = tmp_path / "data"
    run_cli("synth", str(data), "--per-class", "4", "--size", "32", "--seed", "9", *CAUSE)
    run = tmp_path / "run"
    run_cli("train", str(data), "--out", str(run), "--img-size", "32", "--epochs", "1", "--qat-epochs", "1",
            "--batch-size", "8", "--weights", "none", "--head-loss", "joint")
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["head_loss"] == "joint"
    assert config["train"]["lr"] == pytest.approx(1e-3)  # from scratch: the from-scratch rate
    rows = (run / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    phases = [r.split(",")[0] for r in rows[1:]]
    assert phases == ["float", "qat"]
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert all(np.isfinite(losses)) and (run / "qat.h5").exists()


def test_train_command_defaults_are_train_config_defaults():
    """The CLI repeats TrainConfig's defaults (it imports no TensorFlow to print its help): keep them equal."""
    import dataclasses

    import click

    from semhinet_tf.cli import main
    from semhinet_tf.train import TrainConfig

    command = main.commands["train"]
    ctx = click.Context(command)
    config = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    shared = [p for p in command.params if p.name in config]
    assert len(shared) >= 20
    for param in shared:
        assert param.get_default(ctx) == config[param.name], param.name


def test_every_command_and_script_prints_its_help():
    """--help is the first thing a new user runs; argparse %-formats help texts, so a stray % crashes it."""
    from semhinet_tf.board.__main__ import parse_args

    for command in main.commands:
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    root = Path(__file__).resolve().parents[1]
    for script in sorted((root / "tools").glob("*.py")) + sorted((root / "experiments").glob("*.py")):
        if script.name.startswith("_") or script.name == "results_file.py":
            continue
        done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (script.name, done.stderr[-500:])
