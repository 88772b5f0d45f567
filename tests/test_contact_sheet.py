"""tools/contact_sheet.py: finds class folders anywhere, reads every format, draws the grid, CLI works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semhinet_tf.data import synth
from tools import contact_sheet as cs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "contact_sheet.py"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A mixed-format synth set, re-laid out the way real folders look: odd case, an alias, a split level."""
    root = tmp_path_factory.mktemp("sheet") / "data"
    synth.generate(root, per_class=5, size=48, seed=0, workers=1, mixed_formats=True, progress=False)
    (root / "inc_etch").rename(root / "Inc-Etch")
    (root / "normal").rename(root / "Good")
    (root / "train").mkdir()
    (root / "bridge").rename(root / "train" / "BRIDGE")
    return root


def test_finds_classes_case_insensitively_and_nested(dataset):
    found = cs.find_class_images(dataset)
    assert list(found) == list(synth.LEAVES)
    assert all(len(files) == 5 for files in found.values())
    assert any(len(p.relative_to(dataset).parts) > 2 for files in found.values() for p in files)


def test_sheet_has_one_row_per_class(dataset, tmp_path):
    out = cs.make_contact_sheet(dataset, tmp_path / "sheet.png", per_class=3, thumb=40, borderline=False)
    with Image.open(out) as im:
        sheet = np.asarray(im.convert("L"))
    gap, label_w, title_h = 2, 110, 22
    assert sheet.shape == (title_h + 8 * (40 + gap) + gap, label_w + 3 * (40 + gap) + gap)
    for row in range(8):  # every thumbnail cell holds an image, not the empty background
        y = title_h + row * (40 + gap) + gap
        for col in range(3):
            x = label_w + col * (40 + gap)
            cell = sheet[y:y + 40, x:x + 40]
            assert cell.std() > 1 or abs(int(cell.mean()) - cs.BACKGROUND) > 20, (row, col)


@pytest.mark.parametrize("scale, dtype", [(257, np.uint16), (4095 / 255, np.uint16)])
def test_read_grey_scales_16_and_12_bit(tmp_path, scale, dtype):
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    path = tmp_path / "deep.tif"
    Image.fromarray(np.round(grey.astype(np.float64) * scale).astype(dtype)).save(path)
    assert np.abs(cs.read_grey(path).astype(int) - grey).max() <= 1


def test_read_grey_converts_rgb(tmp_path):
    path = tmp_path / "rgb.jpg"
    Image.new("RGB", (16, 16), (200, 200, 200)).save(path)
    got = cs.read_grey(path)
    assert got.shape == (16, 16) and abs(int(got.mean()) - 200) <= 2


def test_no_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "misc").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        cs.make_contact_sheet(tmp_path, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        cs.make_contact_sheet(tmp_path / "absent", tmp_path / "x.png")


def test_command_line(dataset, tmp_path):
    out = tmp_path / "cli.png"
    run = subprocess.run([sys.executable, str(SCRIPT), str(dataset), str(out), "--per-class", "2", "--size", "32"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and str(out) in run.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope"), str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("labels", ["visible", "cause"])
def test_borderline_row_shows_frames_just_below_and_above_the_rule(tmp_path, labels):
    """A synth set's sheet gains a row: draws scoring just below 1 (turned down, or written by `cause`), then
    frames just above; the turned-down ones are rendered again, exactly as the generator drew them."""
    root = tmp_path / "d"
    synth.generate(root, per_class=8, size=64, seed=1, workers=1, progress=False, labels=labels,
                   classes=["normal", "bridge", "cmp"])
    edge = cs.borderline_frames(root, 2)
    scores = [s for *_, s in edge]
    assert len(edge) == 4 and scores == sorted(scores) and scores[1] < 1.0 <= scores[2], scores
    meta = json.loads((root / "dataset.json").read_text())
    above = sorted(r["visibility"] for r in meta["frames"] if r.get("visibility", 0) >= 1.0)
    assert scores[2:] == above[:2] or {c for c, *_ in edge[2:]} != {edge[2][0]}  # the closest, or class variety
    for leaf, image, score in edge[:2]:
        if labels == "cause":
            assert isinstance(image, Path) and image.is_file()
            continue
        row = next(r for r in meta["frames"] if r.get("rejected", {}).get("visibility") == round(score, 4))
        again = synth.render_frame(leaf, 1, row["index"], 64, draw=row["rejected"]["draw"], scene=row["scenes"])
        assert np.array_equal(again.image, image) and again.visibility < 1.0
    out = cs.make_contact_sheet(root, tmp_path / "sheet.png", per_class=4, thumb=40)
    with Image.open(out) as im:
        assert im.size[1] == 22 + 4 * (40 + 2) + 2  # normal, bridge, cmp and the borderline row
    plain = cs.make_contact_sheet(root, tmp_path / "plain.png", per_class=4, thumb=40, borderline=False)
    with Image.open(plain) as im:
        assert im.size[1] == 22 + 3 * (40 + 2) + 2


def test_no_borderline_row_without_scores(tmp_path):
    (tmp_path / "normal").mkdir()
    Image.new("L", (16, 16), 100).save(tmp_path / "normal" / "a.png")
    assert cs.borderline_frames(tmp_path, 3) == []
    (tmp_path / "dataset.json").write_text("{not json")
    assert cs.borderline_frames(tmp_path, 3) == []
