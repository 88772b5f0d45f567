"""The model contract (issue 22, points 6 and 7): validated at load field by field, and the file's digest checked.

A malformed contract must end as exit 2 and one line naming the field (never a traceback and exit 1, which
means "bad images"); a damaged or modified .tflite must be refused before the interpreter sees it, on the
board and in `semhinet predict` / `semhinet eval`; a .tflite without a contract runs only when asked to.
One tiny int8 model (the real architecture, narrow, 32 px, PTQ on random frames) is converted once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from semhinet_tf.artifacts.contract import (
    DIGEST_PLACEHOLDER,
    ContractError,
    ModelRefusedError,
    build_contract,
    digest_with_zeroed,
    embed_sealed,
    validate_contract,
)
from semhinet_tf.board.__main__ import main as board_main
from semhinet_tf.board.runtime import BoardModel
from semhinet_tf.cli import main as cli_main
from semhinet_tf.export.tflite_meta import embed_contract, read_contract, read_model
from semhinet_tf.taxonomy import Taxonomy

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
VIEWS = ["identity", "transpose", "rot180", "anti_transpose"]


def _contract(**changes) -> dict:
    tax = Taxonomy.default()
    contract = build_contract(run_id="tiny", taxonomy_spec=tax.to_spec(), img_size=SIZE, io_type="uint8",
                              preprocess={"databar": "auto", "fit": "crop", "bit_depth_rule": "minmax"},
                              views=VIEWS, review_threshold=0.6, review_threshold_by_views={"2": 0.7},
                              quantization={"source": "float", "granularity": "per-channel", "io": "uint8",
                                            "float_heads": False}, version="test")
    return {**contract, **changes}


@pytest.fixture(scope="module")
def bare(tiny_run) -> bytes:
    """The tiny int8 model's bytes, without a contract."""
    return tiny_run.bare


@pytest.fixture(scope="module")
def sealed(bare, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("contract") / "model_int8.tflite"
    path.write_bytes(embed_sealed(bare, _contract()))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two frames in each default leaf-class folder (so `eval --data` finds a dataset too)."""
    root = tmp_path_factory.mktemp("contract_images")
    rng = np.random.default_rng(0)
    for leaf in Taxonomy.default().leaves:
        (root / leaf).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / leaf / f"{i}.png")
    return root


def _board(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "semhinet_tf.board", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _one_error_line(text: str) -> str:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


# ---------------------------------------------------------------- (6) a malformed contract
@pytest.mark.parametrize("changes, field, says", [
    ({"preprocess": 5}, "preprocess", "must be an object, got 5"),
    ({"review_threshold": [1]}, "review_threshold", "must be a number in 0..1, got [1]"),
    ({"views": ["evil"]}, "views", "unknown views [\"evil\"]"),
    ({"review_threshold": -0.1}, "review_threshold", "must be a number in 0..1, got -0.1"),
    ({"taxonomy": "default"}, "taxonomy", "must be an object"),
    ({"format": "semhinet-contract/2"}, "format", "written by a newer semhinet"),
    ({"review_threshold_by_views": {"3": 0.5}}, "review_threshold_by_views", "keys are view counts"),
    ({"preprocess": {"fit": "stretch"}}, "preprocess", "fit must be one of"),
    ({"review_treshold": 0.9}, "review_treshold", "is unknown"),
    ({"outputs": ["h1", "h2"]}, "outputs", "the taxonomy's heads are"),
])
def test_a_malformed_contract_exits_2_with_one_line_naming_the_field(bare, images, tmp_path, changes, field, says):
    path = tmp_path / "model.tflite"
    path.write_bytes(embed_sealed(bare, _contract(**changes)))
    proc = _board(path, images)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert f"model.tflite: contract field '{field}'" in line and says in line, line
    assert proc.stdout == ""  # no verdicts


def test_validation_keeps_what_old_models_carry_and_drops_max_pixels():
    old = _contract(preprocess={"size": 160, "databar": "auto", "fit": "crop", "bit_depth_rule": "minmax",
                                "max_pixels": 100_000_000})
    for key in ("views", "review_threshold_by_views", "digest"):  # converted before these existed
        del old[key]
    spec = validate_contract(json.loads(json.dumps(old)), "old.tflite")
    assert "max_pixels" not in spec.preprocess and spec.views is None and spec.digest is None
    assert spec.threshold(1) == spec.threshold(8) == 0.6
    assert spec.preprocessing(SIZE).size == SIZE  # the model's input decides the size
    with pytest.raises(ContractError, match=r"^x\.tflite: contract field '\(contract\)'"):
        validate_contract([1], "x.tflite")


# ---------------------------------------------------------------- (7) the digest
def test_the_digest_covers_the_whole_file_with_its_own_value_zeroed(sealed):
    data = sealed.read_bytes()
    value = read_contract(data)["digest"]["value"]
    assert value != DIGEST_PLACEHOLDER and data.count(value.encode()) == 1
    assert digest_with_zeroed(data, data.index(value.encode())) == value
    BoardModel(sealed)  # loads


def _weights_span(path: Path) -> tuple[int, int]:
    """(start, size) of the largest constant buffer: the weights of a convolution."""
    model = read_model(path)
    return max(model.buffer_spans, key=lambda span: span[1])


def test_one_flipped_weight_byte_is_refused_by_board_predict_and_eval(sealed, images, tmp_path):
    start, size = _weights_span(sealed)
    data = bytearray(sealed.read_bytes())
    data[start + size // 2] ^= 0x01
    damaged = tmp_path / "damaged.tflite"
    damaged.write_bytes(bytes(data))
    proc = _board(damaged, images)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "damaged.tflite: damaged or modified: its weights digest does not match" in _one_error_line(proc.stderr)
    runner = CliRunner()
    for args in (["predict", str(damaged), str(images)], ["eval", str(damaged), "--data", str(images)]):
        result = runner.invoke(cli_main, args)
        assert result.exit_code == 2, result.output
        assert "damaged or modified" in _one_error_line(result.output)
        assert '"verdict"' not in result.output


def _flipped_copies(data: bytes, copies: int, flips: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(copies):
        copy = np.frombuffer(data, np.uint8).copy()
        at = rng.choice(len(copy), flips, replace=False)
        copy[at] ^= rng.integers(1, 256, flips, dtype=np.uint8)
        yield copy.tobytes()


def test_no_damaged_copy_gives_verdicts_on_the_board(sealed, images, tmp_path, capsys):
    """The issue's experiment: 30 copies with 20 bytes flipped each; before, 10 of them loaded and classified."""
    path = tmp_path / "copy.tflite"
    refused_by_digest = 0
    for content in _flipped_copies(sealed.read_bytes(), 30, 20, seed=22):
        path.write_bytes(content)
        assert board_main([str(path), str(images / "normal")]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        refused_by_digest += "damaged or modified" in err
    assert refused_by_digest >= 5  # most flips land in the weights: loadable before, refused now


def test_no_damaged_copy_gives_verdicts_in_predict(sealed, images, tmp_path):
    path = tmp_path / "copy.tflite"
    runner = CliRunner()
    for content in _flipped_copies(sealed.read_bytes(), 30, 20, seed=7):
        path.write_bytes(content)
        result = runner.invoke(cli_main, ["predict", str(path), str(images / "normal")])
        assert result.exit_code == 2, result.output
        _one_error_line(result.output)
        assert '"verdict"' not in result.output


def test_a_modified_contract_is_refused_too(sealed, images, tmp_path):
    """Editing the contract (here: a laxer review threshold) and re-embedding it keeps the old digest."""
    path = tmp_path / "edited.tflite"
    path.write_bytes(embed_contract(sealed.read_bytes(), {**read_contract(sealed), "review_threshold": 0.1}))
    with pytest.raises(ModelRefusedError, match="edited.tflite: damaged or modified"):
        BoardModel(path)


def test_a_contract_without_digest_loads_with_a_warning(bare, tmp_path):
    old = {k: v for k, v in _contract().items() if k != "digest"}
    path = tmp_path / "old.tflite"
    path.write_bytes(embed_contract(bare, old))
    warnings = []
    model = BoardModel(path, warn=warnings.append)
    assert model.review_threshold == 0.6
    assert len(warnings) == 1 and "old.tflite: no weights digest" in warnings[0] and "convert again" in warnings[0]


# ---------------------------------------------------------------- (7) a .tflite without a contract
def test_a_model_without_contract_is_refused_unless_allowed_on_the_board(bare, images, tmp_path):
    path = tmp_path / "bare.tflite"
    path.write_bytes(bare)
    proc = _board(path, images / "normal")
    assert proc.returncode == 2 and proc.stdout == ""
    line = _one_error_line(proc.stderr)
    assert "bare.tflite: no contract" in line and "--allow-no-contract" in line
    proc = _board(path, images / "normal", "--allow-no-contract")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2
    said = [line for line in proc.stderr.splitlines() if "no contract; running with defaults" in line]
    assert len(said) == 1 and "review threshold 0.5" in said[0] and "one view" in said[0]
    assert "heads h1, h2, h3, h4, h5" in said[0] and '"fit": "crop"' in said[0]


def test_a_model_without_contract_is_refused_unless_allowed_in_predict_and_eval(bare, images, tmp_path):
    path = tmp_path / "bare.tflite"
    path.write_bytes(bare)
    runner = CliRunner()
    for args in (["predict", str(path), str(images / "normal")], ["eval", str(path), "--data", str(images)]):
        refused = runner.invoke(cli_main, args)
        assert refused.exit_code == 2 and "no contract" in _one_error_line(refused.output)
        allowed = runner.invoke(cli_main, [*args, "--allow-no-contract"])
        assert allowed.exit_code == 0, allowed.output
        assert "no contract; running with defaults" in allowed.output
