"""The board runtime (python -m semhinet_tf.board): no TensorFlow, the training decode, bad files, CSV.

One tiny int8 model (the real architecture, narrow, 32 px, PTQ on random frames) with its contract is
built once; the images are mixed on purpose: 8-bit PNG, 16-bit TIFF, RGB JPEG, a frame with a data bar,
non-square frames, a nested folder.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from semhinet_tf.board.__main__ import CSV_FIELDS, main
from semhinet_tf.board.runtime import BoardModel, iter_image_paths
from semhinet_tf.data.decode import Preprocess, find_databar, load_frame, read_grey
from semhinet_tf.taxonomy import Taxonomy

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
TIMING = ("decode_ms", "infer_ms")

# Runs the board's main with TensorFlow (and tf-keras) unimportable, and proves both.
NO_TF = """
import sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization"):
            raise ImportError(f"{name} is blocked: the board has no TensorFlow")
sys.meta_path.insert(0, NoTensorFlow())
try:
    import tensorflow
    sys.exit("the blocker does not block")
except ImportError:
    pass
from semhinet_tf.board.__main__ import main
rc = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras"))
sys.exit(f"imported {leaked}" if leaked else rc)
"""


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_path(tiny_run) -> Path:
    """The session's tiny int8 model with its contract (eight views offered); tests only read it."""
    return tiny_run.tflite


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """Lines with noise, in 0..1: something SEM-like with structure at several scales."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    lines = 0.5 + 0.35 * np.sin(2 * np.pi * (x * np.cos(seed) + y * np.sin(seed)) / (6 + seed % 5))
    return np.clip(lines + rng.normal(0, 0.08, (h, w)), 0, 1)


def _with_databar(img: np.ndarray) -> np.ndarray:
    """Append an instrument data bar (dark band, white text, scale bar) below an 8-bit frame."""
    h, w = img.shape
    bar = Image.new("L", (w, 14), 10)
    draw = ImageDraw.Draw(bar)
    draw.text((3, 2), "5.0kV x20.0k WD 4mm", fill=255)
    draw.rectangle([w - 30, 6, w - 4, 7], fill=255)
    return np.vstack([img, np.asarray(bar)])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("board_images")
    (root / "nested").mkdir()
    u8 = lambda a: (a * 255).round().astype(np.uint8)  # noqa: E731
    Image.fromarray(u8(_texture(80, 80, 1))).save(root / "grey8.png")
    Image.fromarray((1000 + _texture(72, 96, 2) * 2000).astype(np.uint16)).save(root / "deep16_wide.tiff")
    rgb = np.stack([u8(_texture(100, 100, s)) for s in (3, 4, 5)], axis=-1)
    Image.fromarray(rgb, "RGB").save(root / "colour.jpg", quality=85)
    Image.fromarray(_with_databar(u8(_texture(96, 96, 6)))).save(root / "databar.png")
    Image.fromarray(u8(_texture(120, 64, 7))).save(root / "nested" / "tall.bmp")
    Image.fromarray(u8(_texture(64, 90, 8))).save(root / "nested" / "wide8.tif")
    return root


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory, images) -> Path:
    root = tmp_path_factory.mktemp("board_bad")
    Image.fromarray(np.asarray(Image.open(images / "grey8.png"))).save(root / "good.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image\n")
    (root / "truncated.png").write_bytes((images / "grey8.png").read_bytes()[:120])
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "tiny.png")
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ---------------------------------------------------------------- (1) no TensorFlow
def test_board_runs_without_tensorflow_and_matches_in_process(model_path, images, tmp_path, capsys):
    sub_out, here_out = tmp_path / "sub.jsonl", tmp_path / "here.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", NO_TF, str(model_path), str(images), "--format", "jsonl",
                           "--out", str(sub_out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "engine ai_edge_litert" in proc.stderr or "engine tflite_runtime" in proc.stderr
    assert main([str(model_path), str(images), "--format", "jsonl", "--out", str(here_out)]) == 0
    sub, here = _rows(sub_out), _rows(here_out)
    assert len(sub) == 6 and all("error" not in r for r in sub)
    assert _untimed(sub) == _untimed(here)
    leaves = set(Taxonomy.default().leaves)
    assert all(r["class"] in leaves and 0 <= r["probability"] <= 1 for r in sub)


# ---------------------------------------------------------------- (2) the training decode
def test_board_sees_the_pixels_training_saw(model_path, images):
    from semhinet_tf.data.pipeline import decode_frames

    model = BoardModel(model_path)
    train_pre = Preprocess.from_dict(model.contract["preprocess"])
    assert model.preprocess == train_pre  # the model file decides, and it says what training used
    paths = list(iter_image_paths([images]))
    assert {p.suffix for p in paths} == {".png", ".tiff", ".jpg", ".bmp", ".tif"}
    trained, bad = decode_frames([str(p) for p in paths], train_pre, workers=1, progress=False)
    board = np.stack([load_frame(p, model.preprocess) for p in paths])
    assert bad == []
    assert trained.dtype == board.dtype == np.uint8 and trained.shape == (len(paths), SIZE, SIZE)
    assert np.array_equal(trained, board)
    assert len({f.tobytes() for f in board}) == len(paths)  # every file made its own frame


def test_mixed_inputs_exercise_what_they_claim(images):
    assert read_grey(images / "deep16_wide.tiff").dtype == np.uint16
    assert find_databar(read_grey(images / "databar.png")) == 14
    assert not np.array_equal(load_frame(images / "databar.png", Preprocess(size=SIZE, databar="off")),
                              load_frame(images / "databar.png", Preprocess(size=SIZE, databar="auto")))


# ---------------------------------------------------------------- (3) bad files
def test_bad_images_are_reported_per_file_and_the_rest_classified(model_path, bad_images, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    missing = tmp_path / "gone.png"
    assert main([str(model_path), str(bad_images), str(missing), "--out", str(out)]) == 1
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert set(rows) == {"good.png", "empty.png", "text.jpg", "truncated.png", "tiny.png"}
    assert "error" not in rows["good.png"] and rows["good.png"]["class"] in Taxonomy.default().leaves
    assert "empty" in rows["empty.png"]["error"]
    assert "not an image" in rows["text.jpg"]["error"]
    assert "truncated" in rows["truncated.png"]["error"] or "decode" in rows["truncated.png"]["error"]
    assert "smaller than the minimum" in rows["tiny.png"]["error"]
    err = capsys.readouterr().err
    for name in ("empty.png", "text.jpg", "truncated.png", "tiny.png"):
        assert f"skipped {bad_images / name}: " in err
    assert f"skipped {missing}: no such file or folder" in err
    assert "1 classified" in err and "5 unreadable" in err


def test_bad_model_is_a_usage_error(tmp_path, images, capsys):
    bad = tmp_path / "broken.tflite"
    bad.write_bytes(b"\0" * 64)
    kept = tmp_path / "verdicts.jsonl"
    kept.write_text("yesterday's verdicts\n")
    assert main([str(bad), str(images), "--out", str(kept), "--overwrite"]) == 2
    assert "broken.tflite" in capsys.readouterr().err
    assert kept.read_text() == "yesterday's verdicts\n"  # replaced only by a complete result
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_model_of_another_project_is_refused_in_one_line(tmp_path, images, capsys):
    import tensorflow as tf

    from semhinet_tf.model import keras

    for name, shape in (("one_output.tflite", (SIZE, SIZE, 1)), ("rgb.tflite", (SIZE, SIZE, 3))):
        foreign = keras.Sequential([keras.Input(shape, batch_size=1), keras.layers.Flatten(), keras.layers.Dense(3)])
        (tmp_path / name).write_bytes(tf.lite.TFLiteConverter.from_keras_model(foreign).convert())
    assert main([str(tmp_path / "one_output.tflite"), str(images)]) == 2  # no contract: refused first
    assert "one_output.tflite: no contract" in capsys.readouterr().err
    # even when a contract-less model is allowed, its outputs and input must be a SEM-HiNet model's
    assert main([str(tmp_path / "one_output.tflite"), str(images), "--allow-no-contract"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "one_output.tflite: not a SEM-HiNet model" in err and "h1" in err
    assert main([str(tmp_path / "rgb.tflite"), str(images), "--allow-no-contract"]) == 2
    assert "rgb.tflite: input shape [1, 32, 32, 3]" in capsys.readouterr().err


# ---------------------------------------------------------------- (4) delegate fallback
# LiteRT's Delegate.__del__ trips over the half-built object its failed constructor leaves behind (harmless)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_delegate_warns_and_falls_back_to_the_cpu(model_path, images, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert main([str(model_path), str(images), "--delegate", "/nonexistent/libvx_delegate.so", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: cannot load delegate /nonexistent/libvx_delegate.so" in err and "running on the CPU" in err
    assert len(_rows(out)) == 6
    not_a_library = tmp_path / "libnot_a_delegate.so"
    not_a_library.write_text("not a shared library")
    assert main([str(model_path), str(images), "--delegate", str(not_a_library), "--out", str(out),
                 "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"warning: cannot load delegate {not_a_library}" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_require_delegate_stops_instead_of_falling_back(model_path, images, tmp_path, capsys):
    """A line whose budget only the NPU meets asks for an error, and nothing is written."""
    out = tmp_path / "rows.jsonl"
    args = [str(model_path), str(images), "--out", str(out), "--require-delegate"]
    assert main([*args, "--delegate", "/nonexistent/libvx_delegate.so"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: cannot load delegate /nonexistent/libvx_delegate.so (no such file) and "
                       "--require-delegate is set")
    not_a_library = tmp_path / "libnot_a_delegate.so"
    not_a_library.write_text("not a shared library")
    assert main([*args, "--delegate", str(not_a_library)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot load delegate {not_a_library}" in err and "Traceback" not in err
    assert main(args) == 2
    assert "--require-delegate needs --delegate" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- (5) CSV
def test_csv_output(model_path, images, bad_images, tmp_path):
    out = tmp_path / "rows.csv"
    assert main([str(model_path), str(images), str(bad_images), "--format", "csv", "--out", str(out)]) == 1
    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == CSV_FIELDS
    ok = [r for r in rows if not r["error"]]
    assert len(rows) == 11 and len(ok) == 7
    leaves = set(Taxonomy.default().leaves)
    for r in ok:
        assert r["class"] in leaves and 0.0 <= float(r["probability"]) <= 1.0
        assert r["review"] in ("True", "False") and float(r["infer_ms"]) >= 0
    assert all(not r["class"] for r in rows if r["error"])
    jsonl = tmp_path / "rows.jsonl"
    main([str(model_path), str(images), "--out", str(jsonl)])
    by_path = {r["path"]: r for r in _rows(jsonl)}
    for r in ok[:6]:
        assert r["class"] == by_path[r["path"]]["class"]
        assert float(r["probability"]) == pytest.approx(by_path[r["path"]]["probability"])


# ---------------------------------------------------------------- views chosen from the latency budget
@pytest.mark.parametrize("infer_ms, budget_ms, expected", [
    (4.0, 50.0, 8),    # 8 x 4 = 32 ms within 80% of 50
    (6.0, 50.0, 4),    # 8 x 6 = 48 ms is over 40; 4 x 6 = 24 is not
    (10.0, 50.0, 4),   # exactly 40
    (15.0, 50.0, 2),
    (45.0, 50.0, 1),   # even one view is over: one view, and the caller warns
])
def test_views_for_budget_takes_the_most_views_that_fit(infer_ms, budget_ms, expected):
    from semhinet_tf.board.runtime import views_for_budget

    assert views_for_budget([1, 2, 4, 8], infer_ms, budget_ms) == expected
    assert views_for_budget([1], infer_ms, budget_ms) == 1  # a model that offers one view


def test_views_auto_measures_here_and_picks_from_what_the_model_offers(model_path, images, tmp_path, capsys):
    out = tmp_path / "auto.jsonl"
    assert main([str(model_path), str(images), "--views", "auto", "--budget-ms", "100000", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "views: auto -> 8 of 1/2/4/8" in err and "8 view(s) per image" in err
    fixed = tmp_path / "eight.jsonl"
    assert main([str(model_path), str(images), "--views", "8", "--out", str(fixed)]) == 0
    assert _untimed(_rows(out)) == _untimed(_rows(fixed))
    assert main([str(model_path), str(images), "--views", "auto", "--budget-ms", "0.0001", "--out", str(out),
                 "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "warning: views: auto -> 1 of 1/2/4/8" in err and "1 view(s) per image" in err
    assert main([str(model_path), str(images), "--views", "3", "--out", str(out), "--overwrite"]) == 2
    assert "3 test-time views asked; this model offers 1, 2, 4, 8" in capsys.readouterr().err


def test_views_auto_on_a_model_converted_before_views_uses_one(model_path, images, tmp_path, capsys):
    from semhinet_tf.artifacts.contract import embed_sealed
    from semhinet_tf.export.tflite_meta import read_contract

    content = model_path.read_bytes()
    contract = read_contract(content)
    del contract["views"], contract["review_threshold_by_views"]
    old = tmp_path / "old.tflite"
    old.write_bytes(embed_sealed(content, contract))
    model = BoardModel(old)
    assert model.offered_views() == [1]
    assert model.auto_views(budget_ms=100000)[0] == 1 and model.views == ["identity"]
    assert main([str(old), str(images), "--views", "auto", "--out", str(tmp_path / "o.jsonl")]) == 0
    assert "views: auto -> 1 of 1 " in capsys.readouterr().err


# ---------------------------------------------------------------- the board's own world (opt-in)
@pytest.mark.board_venv
@pytest.mark.skipif(not os.environ.get("SEMHINET_BOARD_VENV"),
                    reason="set SEMHINET_BOARD_VENV=/path/to/venv to build or reuse the numpy<2 + tflite-runtime venv")
def test_board_venv_agrees_with_the_host(model_path, images, tmp_path):
    env = {**os.environ, "BOARD_VENV": os.environ["SEMHINET_BOARD_VENV"], "HOST_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "tools" / "board_venv_check.sh"), str(model_path), str(images),
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "board agreement: 6/6 images" in proc.stdout
    assert "board frames: 6/6 byte-identical" in proc.stdout
    assert "engine tflite_runtime" in proc.stderr and "tflite-runtime 2.14.0" in proc.stdout


# ---------------------------------------------------------------- tools/board_compare.py
def _board_compare():
    import importlib.util

    spec = importlib.util.spec_from_file_location("board_compare", REPO / "tools" / "board_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(path: str, cls: str, probs: dict[str, float], review: bool = False) -> dict:
    return {"path": path, "class": cls, "leaf_probabilities": probs, "heads": {"h1": {"x": probs["bogus"]}},
            "review": review}


@pytest.mark.parametrize("board, cls, review, agree, flip", [
    ({"bogus": 0.50, "normal": 0.30}, "bogus", False, True, False),
    ({"bogus": 0.40, "normal": 0.30}, "bogus", False, True, False),    # moved: judged in bulk, not per frame
    ({"bogus": 0.48, "normal": 0.49}, "normal", False, False, True),   # a confident verdict changed
    ({"bogus": 0.48, "normal": 0.49}, "normal", True, False, True),    # the host decided it without review
    ({"bogus": 0.50, "normal": 0.30}, "normal", False, False, True),   # a class its own probabilities do not explain
])
def test_compare_rows_flips_only_where_the_model_is_unsure(board, cls, review, agree, flip):
    bc = _board_compare()
    host = _row("a.png", "bogus", {"bogus": 0.50, "normal": 0.30})
    got = bc.compare_rows(host, _row("a.png", cls, board, review))
    assert (got["agree"], got["flip"]) == (agree, flip)
    both_unsure = bc.compare_rows({**host, "review": True}, _row("a.png", cls, board, True))
    assert both_unsure["agree"] and both_unsure["flip"] == flip  # both sides send it to a person: allowed


def test_compare_allows_near_tie_flips_and_catches_one_sided_files():
    bc = _board_compare()
    tie_host = _row("x/t.png", "bogus", {"bogus": 0.40, "normal": 0.39})
    tie_board = _row("x/t.png", "normal", {"bogus": 0.39, "normal": 0.40})
    host = {"t.png": tie_host, "e.png": {"path": "x/e.png", "error": "empty file"}, "h.png": tie_host}
    board = {"t.png": tie_board, "e.png": {"path": "x/e.png", "error": "empty file (0 bytes)"},
             "b.png": tie_board}
    result = bc.compare(host, board)
    assert {k: f["agree"] for k, f in result["files"].items()} == {
        "t.png": True, "e.png": True, "h.png": False, "b.png": False}
    assert result["flips"] == 1 and "only in the host output" in result["files"]["h.png"]["why"]
    assert not result["ok"]
    assert bc.format_summary(result).startswith("board agreement: 2/4 images; 3/4 same verdict")
    one_sided = bc.compare_rows(tie_host, {"path": "x/t.png", "error": "truncated"})
    assert not one_sided["agree"] and "board only" in one_sided["why"]


def test_compare_checks_the_unfamiliar_frame_score():
    bc = _board_compare()
    host = {**_row("a.png", "bogus", {"bogus": 0.5, "normal": 0.3}), "ood": 5.0, "unfamiliar": True}
    assert bc.compare_rows(host, {**host, "ood": 4.8, "unfamiliar": False})["agree"]  # 4% apart at the threshold
    far = bc.compare_rows(host, {**host, "ood": 2.0, "unfamiliar": False})
    assert not far["agree"] and "unfamiliar on the host only" in far["why"]
    plain = {k: v for k, v in host.items() if k not in ("ood", "unfamiliar")}
    assert "on the host only" in bc.compare_rows(host, plain)["why"]
    result = bc.compare({"a.png": host}, {"a.png": {**host, "ood": 5.5}})
    assert result["ok"] and result["ood_n"] == 1 and result["ood_median_rel_diff"] == pytest.approx(0.5 / 5.5)
    assert "unfamiliar-frame score on 1 images" in bc.format_summary(result)


def _pair(i: int, host_p: float, board_p: float, board_cls: str = "bogus", review: bool = True):
    return (_row(f"{i}.png", "bogus", {"bogus": host_p, "normal": 1 - host_p}, review),
            _row(f"{i}.png", board_cls, {"bogus": board_p, "normal": 1 - board_p}, review))


def _compare_pairs(bc, pairs, **kwargs):
    host = {f"{i}.png": h for i, (h, _) in enumerate(pairs)}
    board = {f"{i}.png": b for i, (_, b) in enumerate(pairs)}
    return bc.compare(host, board, **kwargs)


def test_compare_judges_the_engines_in_bulk():
    bc = _board_compare()
    # int8 engine noise: most images move a little, a few more; every frame agrees
    noisy = [_pair(i, 0.8, 0.8 + (0.02 if i % 4 else 0.2)) for i in range(20)]
    result = _compare_pairs(bc, noisy, tol=0.1)
    assert result["ok"] and result["max_diff"] == pytest.approx(0.2) and result["median_diff"] == pytest.approx(0.02)
    # a broken board world (outputs taken from the wrong place): every image moves far
    broken = [_pair(i, 0.8, 0.55) for i in range(20)]
    result = _compare_pairs(bc, broken, tol=0.1)
    assert not result["ok"] and result["agree"] == 20 and result["median_diff"] == pytest.approx(0.25)
    # verdicts of unsure frames change on 3 images in 20 (not near-ties): each is allowed, together too many
    flips = [_pair(i, 0.6, 0.4 if i < 3 else 0.6, "normal" if i < 3 else "bogus") for i in range(20)]
    result = _compare_pairs(bc, flips, tol=0.1, min_agreement=0.9)
    assert result["agree"] == 20 and result["flips"] == 3 and result["ties"] == 0 and not result["ok"]
    assert _compare_pairs(bc, flips, tol=0.1, min_agreement=0.85)["ok"]
    # near-ties changing are rounding, however many (a near-uniform tiny model has lots of them)
    ties = [_pair(i, 0.52, 0.48 if i < 5 else 0.52, "normal" if i < 5 else "bogus", review=False) for i in range(20)]
    result = _compare_pairs(bc, ties, tol=0.1)
    assert result["flips"] == 5 and result["ties"] == 5 and result["ok"]


def test_compare_cli_matches_board_paths_by_relative_path(model_path, images, tmp_path, capsys):
    bc = _board_compare()
    here = tmp_path / "here.jsonl"
    assert main([str(model_path), str(images), "--out", str(here)]) == 0
    # the board saw the same files under another root (copied to the board)
    board_rows = [{**r, "path": r["path"].replace(str(images), "/data/sem")} for r in _rows(here)]
    board = tmp_path / "board.jsonl"
    board.write_text("".join(json.dumps(r) + "\n" for r in board_rows))
    frames = tmp_path / "frames.json"
    # a process of its own: this one has TensorFlow loaded (the fixture), and `frames` fails when it sees it
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "board_compare.py"), "frames", str(model_path),
                           str(images), str(frames)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "tensorflow imported: False" in proc.stderr, proc.stderr
    assert bc.main(["compare", str(model_path), str(images), str(board), "--frames", str(frames)]) == 0
    out = capsys.readouterr().out
    assert "board agreement: 6/6 images; 6/6 same verdict" in out and "max 0.0000" in out
    assert "board frames: 6/6 byte-identical" in out
    board_rows[0]["class"] = "crack" if board_rows[0]["class"] != "crack" else "cmp"
    board_rows[0]["review"] = False  # the board decided it on its own: a changed verdict there is a failure
    board.write_text("".join(json.dumps(r) + "\n" for r in board_rows))
    data = json.loads(frames.read_text())
    data["frames"][next(iter(data["frames"]))] = "0" * 64
    frames.write_text(json.dumps(data))
    assert bc.main(["compare", str(model_path), str(images), str(board), "--frames", str(frames)]) == 1
    out = capsys.readouterr().out
    assert "board agreement: 5/6 images" in out and "board frames: 5/6 byte-identical" in out


# ---------------------------------------------------------------- kernel choice (diagnosis)
def test_kernel_choice_selects_the_interpreters_resolver_and_answers_alike(model_path, images):
    from semhinet_tf.board.runtime import _interpreter_module, op_resolver

    module, _ = _interpreter_module()
    assert op_resolver(module, "default") is None
    assert op_resolver(module, "builtin") == module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with pytest.raises(ValueError, match="kernels must be one of"):
        op_resolver(module, "fastest")
    frames = np.stack([load_frame(p, BoardModel(model_path).preprocess) for p in iter_image_paths([images])])
    default = BoardModel(model_path).predict(frames)
    other = BoardModel(model_path, kernels="builtin").predict(frames)
    assert other.keys() == default.keys()
    for head, probs in default.items():  # same model, other rounding: close, not necessarily equal
        assert np.allclose(other[head].sum(1), 1.0, atol=0.02)
        assert np.abs(other[head] - probs).max() < 0.3
    assert main([str(model_path), str(images), "--kernels", "builtin", "--out", os.devnull, "--overwrite"]) == 0


def test_engine_order_npu_delegate_first_tflite_runtime_cpu_first_xnnpack(monkeypatch):
    """Vendor delegates need the vendor's tflite_runtime; on the CPU ai_edge_litert (XNNPACK int8) wins."""
    import types

    from semhinet_tf.board.runtime import _interpreter_module

    fake = types.ModuleType("tflite_runtime")
    fake.interpreter = types.ModuleType("tflite_runtime.interpreter")
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake.interpreter)
    assert _interpreter_module(for_delegate=True) == (fake.interpreter, "tflite_runtime")
    module, engine = _interpreter_module(for_delegate=False)
    assert engine == "ai_edge_litert" and module is not fake.interpreter


# ---------------------------------------------------------------- issue 22.5 / 22.8: the host's limit, scans
def test_the_board_not_the_model_decides_the_pixel_limit(model_path, tmp_path, capsys):
    """A contract asking for 10**12 px changes nothing; the board's --max-pixels does."""
    from semhinet_tf.artifacts.contract import embed_sealed
    from semhinet_tf.data import decode
    from semhinet_tf.export.tflite_meta import read_contract

    contract = read_contract(model_path)
    contract["preprocess"] = {**contract["preprocess"], "max_pixels": 10**12}
    greedy = tmp_path / "greedy.tflite"
    greedy.write_bytes(embed_sealed(model_path.read_bytes(), contract))  # a sealed contract: only the limit differs
    big = tmp_path / "big.png"
    Image.fromarray(_u8_texture(200, 300)).save(big)  # 60000 px
    before = decode.host_max_pixels()
    try:
        assert main([str(greedy), str(big), "--max-pixels", "50000"]) == 1
        err = capsys.readouterr().err
        assert f"skipped {big}: image is 300x200 px" in err and "above the limit of 50000 px" in err
        assert main([str(greedy), str(big), "--max-pixels", "60000"]) == 0
    finally:
        decode.set_max_pixels(before)


def _u8_texture(h: int, w: int) -> np.ndarray:
    return (_texture(h, w, 3) * 255).round().astype(np.uint8)


@pytest.fixture
def scan_tree(tmp_path, monkeypatch) -> dict[str, Path]:
    """good.png, locked/ (unreadable: chmod 000, or os.scandir refusing it when run as root), loop -> ."""
    import errno

    root = tmp_path / "scan"
    (root / "locked").mkdir(parents=True)
    Image.fromarray(_u8_texture(40, 40)).save(root / "good.png")
    Image.fromarray(_u8_texture(40, 40)).save(root / "locked" / "hidden_from_us.png")
    (root / "loop").symlink_to(root, target_is_directory=True)
    tree = {"root": root, "locked": root / "locked", "loop": root / "loop"}
    if os.geteuid() != 0:
        tree["locked"].chmod(0)
        yield tree
        tree["locked"].chmod(0o755)
        return
    real = os.scandir

    def scandir(path="."):
        if Path(path) == tree["locked"]:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    yield tree


def test_board_reports_unreadable_folders_and_loops(model_path, scan_tree, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert main([str(model_path), str(scan_tree["root"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"skipped {scan_tree['locked']}: permission denied" in err
    assert f"skipped {scan_tree['loop']}: symlink loop" in err
    assert "1 classified" in err and "2 unreadable" in err
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert rows["locked"]["error"] == "permission denied" and "error" not in rows["good.png"]


def test_predict_reports_unreadable_folders_and_loops(model_path, scan_tree):
    from semhinet_tf.workflow import predict_paths

    rows = {Path(r["path"]).name: r for r in predict_paths(model_path, [scan_tree["root"]])}
    assert rows["locked"]["error"] == "permission denied"
    assert rows["loop"]["error"].startswith("symlink loop")
    assert "error" not in rows["good.png"]


def test_semhinet_max_pixels_reaches_predict(model_path, tmp_path):
    """`semhinet --max-pixels N predict ...`: the group's option is the limit every command decodes under."""
    from click.testing import CliRunner

    from semhinet_tf.cli import main as semhinet
    from semhinet_tf.data import decode

    big = tmp_path / "big.png"
    Image.fromarray(_u8_texture(200, 300)).save(big)
    before = decode.host_max_pixels()
    try:
        refused = CliRunner().invoke(semhinet, ["--max-pixels", "50000", "predict", str(model_path), str(big)])
    finally:
        decode.set_max_pixels(before)
    row = json.loads(refused.stdout.strip().splitlines()[0])
    assert row["path"] == str(big) and "above the limit of 50000 px" in row["error"]
