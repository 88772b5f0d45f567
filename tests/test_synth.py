"""The synthetic SEM generator: shapes, determinism, files written, formats, and that defects are real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semhinet_tf.data import synth
from semhinet_tf.taxonomy import Taxonomy

SMALL = 48


def _rng(seed: int, leaf: str, k: int) -> np.random.Generator:
    return np.random.default_rng(synth.image_seed(seed, leaf, k))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_leaves_match_the_default_taxonomy():
    assert synth.LEAVES == Taxonomy.default().leaves


@pytest.mark.parametrize("leaf", synth.LEAVES)
@pytest.mark.parametrize("size", [SMALL, 97])
def test_render_shape_and_dtype(leaf, size):
    img = synth.render(leaf, _rng(3, leaf, 0), size)
    assert img.shape == (size, size) and img.dtype == np.uint8
    if leaf != "bogus":  # a SEM frame is never flat
        assert img.std() > 3


def test_render_is_deterministic_per_seed():
    a = synth.render("crack", _rng(5, "crack", 2), 64)
    b = synth.render("crack", _rng(5, "crack", 2), 64)
    c = synth.render("crack", _rng(6, "crack", 2), 64)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_rejects_unknown_class():
    with pytest.raises(ValueError, match="unknown class 'scratch'"):
        synth.render("scratch", np.random.default_rng(0), 64)


def test_render_pair_first_image_is_render():
    img, _ = synth.render_pair("open", _rng(1, "open", 4), 64)
    assert np.array_equal(img, synth.render("open", _rng(1, "open", 4), 64))


@pytest.mark.parametrize("labels", synth.LABEL_RULES)
def test_scene_and_noise_do_not_depend_on_the_label(labels):
    """The clean twin of any defect class is the normal image of the same seed: no global shortcut exists.

    The visible rule redraws the defect only, so this holds for it too, except for a frame where no draw of the
    first scene was visible (then a new scene is drawn, and dataset.json counts it)."""
    for k in range(4):
        normal = synth.render("normal", _rng(9, "normal", k), 80, labels=labels)
        for leaf in synth.DEFECTS:
            rule = synth.label_rule(labels, 80)
            frame = synth._render(leaf, _rng(9, "normal", k), 80, synth.DEFAULT_DIFFICULTY, twin=True, rule=rule)
            _, twin = synth.render_pair(leaf, _rng(9, "normal", k), 80, labels=labels)
            assert np.array_equal(twin, frame.twin)
            if frame.scenes == 1:
                assert np.array_equal(twin, normal), (leaf, k)


@pytest.mark.parametrize("leaf", synth.DEFECTS)
def test_defect_is_visible_and_localized(leaf):
    """Each defect changes its clean twin visibly, and (except LER) only in part of the frame."""
    max_changed = {"bridge": 0.05, "open": 0.05, "crack": 0.25, "cmp": 0.3, "inc_etch": 0.5, "ler": 1.0}[leaf]
    visible = 0
    for k in range(10):
        img, twin = synth.render_pair(leaf, _rng(11, leaf, k), 128)
        diff = np.abs(img.astype(np.int16) - twin)
        assert (diff > 0).mean() <= max_changed, (leaf, k, (diff > 0).mean())
        visible += int((diff > 12).sum() >= 5)
    assert visible >= 9, f"{leaf}: only {visible}/10 defects change the frame visibly"


def test_difficulty_moves_severity():
    easy = [synth._severity(np.random.default_rng(i), 0.0) for i in range(300)]
    hard = [synth._severity(np.random.default_rng(i), 1.0) for i in range(300)]
    assert np.mean(easy) > 0.65 > 0.35 > np.mean(hard)


def test_image_seed_depends_on_seed_class_and_index():
    states = {tuple(synth.image_seed(s, leaf, k).generate_state(2)) for s in (0, 1) for leaf in ("bridge", "open")
              for k in (0, 1)}
    assert len(states) == 8


def test_generate_writes_every_class(tmp_path):
    out = tmp_path / "data"
    stats = synth.generate(out, per_class=3, size=SMALL, seed=1, workers=1, progress=False)
    assert stats["counts"] == {leaf: 3 for leaf in synth.LEAVES} and stats["total"] == 24
    assert stats["images_per_s"] > 0 and stats["formats"] == {"png": 24}
    for leaf in synth.LEAVES:
        files = sorted(p.name for p in (out / leaf).iterdir())
        assert files == [f"{leaf}_{k:05d}.png" for k in range(3)]
        with Image.open(out / leaf / files[0]) as im:
            assert im.mode == "L" and im.size == (SMALL, SMALL)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["version"] == synth.GENERATOR_VERSION
    assert (meta["seed"], meta["size"], meta["per_class"], meta["mixed_formats"]) == (1, SMALL, 3, False)
    assert not list(out.rglob(".*tmp")), "temporary files left behind"


def test_generate_bytes_do_not_depend_on_workers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth.generate(a, per_class=4, size=40, seed=2, workers=1, mixed_formats=True, progress=False)
    synth.generate(b, per_class=4, size=40, seed=2, workers=2, mixed_formats=True, progress=False)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and len(fa) == 8 * 4 + 1
    assert all(fa[k] == fb[k] for k in fa)


def test_generate_same_seed_same_bytes_other_seed_differs(tmp_path):
    synth.generate(tmp_path / "a", per_class=2, size=40, seed=3, workers=1, progress=False, classes=["ler"])
    synth.generate(tmp_path / "b", per_class=2, size=40, seed=3, workers=1, progress=False, classes=["ler"])
    synth.generate(tmp_path / "c", per_class=2, size=40, seed=4, workers=1, progress=False, classes=["ler"])
    name = "ler/ler_00001.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_class_subset_renders_the_same_images(tmp_path):
    synth.generate(tmp_path / "all", per_class=2, size=40, seed=5, workers=1, progress=False)
    synth.generate(tmp_path / "one", per_class=2, size=40, seed=5, workers=1, progress=False, classes=["cmp"])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["cmp", "dataset.json"]
    assert _files(tmp_path / "one" / "cmp") == _files(tmp_path / "all" / "cmp")


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown class"):
        synth.generate(tmp_path / "x", per_class=1, classes=["bridge", "wobble"], progress=False)
    with pytest.raises(ValueError, match="per_class"):
        synth.generate(tmp_path / "x", per_class=0, progress=False)


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        synth.generate(out, per_class=1, size=32, workers=1, progress=False)
    # a folder synth did not write is never written into, even with overwrite (its class folders could be real data)
    with pytest.raises(FileExistsError, match="not a data set written by synth"):
        synth.generate(out, per_class=1, size=32, workers=1, progress=False, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    ours = tmp_path / "synthetic"
    synth.generate(ours, per_class=2, size=32, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        synth.generate(ours, per_class=1, size=32, workers=1, progress=False)
    # a second synth run with overwrite replaces the class folders: no stale images stay behind
    synth.generate(ours, per_class=1, size=32, workers=1, progress=False, overwrite=True)
    assert sorted(p.name for p in (ours / "open").iterdir()) == ["open_00000.png"]


def test_mixed_formats_cover_the_listed_variants(tmp_path):
    out = tmp_path / "mixed"
    size = 40
    stats = synth.generate(out, per_class=12, size=size, seed=0, workers=1, mixed_formats=True, progress=False)
    tags = set(stats["formats"])
    assert {"png", "jpeg", "bmp", "tiff8", "tiff16", "tiff12"} <= {t.split("+")[0] for t in tags}
    assert any(t.endswith("+rgb") for t in tags)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "dataset.json"]
    assert len(files) == 96
    assert {p.suffix for p in files} == {".png", ".jpg", ".bmp", ".tif", ".tiff"}
    assert any(len(p.relative_to(out).parts) == 4 for p in files), "no nested lot/wafer folders"
    modes, shapes, maxima = set(), set(), []
    for p in files:
        with Image.open(p) as im:
            modes.add(im.mode)
            shapes.add(im.size)
            if p.suffix in (".tif", ".tiff"):
                maxima.append(int(np.asarray(im).max()))
    assert {"L", "RGB"} <= modes and any(m.startswith("I;16") for m in modes)
    assert any(w != h for w, h in shapes), "no non-square frame"
    assert any(h > size for _, h in shapes), "no frame with an info bar"
    assert any(255 < m <= 4095 for m in maxima) and any(m > 4095 for m in maxima), "no 12-bit or 16-bit TIFF"
    # every file's class folder is still the first path part, so discovery by folder name works
    assert {p.relative_to(out).parts[0] for p in files} == set(synth.LEAVES)


def test_info_bar_and_crop_keep_the_frame():
    rng = np.random.default_rng(0)
    img = synth.render("normal", rng, 64)
    barred = synth._add_info_bar(img, rng)
    assert barred.shape[1] == 64 and barred.shape[0] > 64 and np.array_equal(barred[:64], img)
    assert np.median(barred[64:]) < 60 and barred[64:].max() == 255  # dark band, white marks
    crop = synth._crop_to_aspect(img, 0.75, (50, 10, 60, 20), rng)
    assert crop.shape == (64, 48)


def test_file_k_is_render_of_image_seed(tmp_path):
    """The documented contract: file k of class c is render(c, default_rng(image_seed(seed, c, k)), size)."""
    synth.generate(tmp_path / "d", per_class=3, size=SMALL, seed=7, workers=1, progress=False, classes=["crack"])
    with Image.open(tmp_path / "d" / "crack" / "crack_00002.png") as im:
        assert np.array_equal(np.asarray(im), synth.render("crack", _rng(7, "crack", 2), SMALL))
