"""On-disk frame cache: hits skip decoding, content or preprocessing changes miss, damage is rebuilt, racing
writers leave one valid entry, and training sees the same frames with or without it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semhinet_tf.artifacts.files import file_sha256
from semhinet_tf.data import cache as cache_mod
from semhinet_tf.data import pipeline
from semhinet_tf.data.cache import FrameCache, FrameRows, default_cache_dir, open_cache
from semhinet_tf.data.decode import Preprocess
from semhinet_tf.data.pipeline import decode_frames

PRE = Preprocess(size=16)


@pytest.fixture(autouse=True)
def _cache_never_in_home(tmp_path, monkeypatch):
    """Whatever a test forgets to pass, the default cache location is under tmp_path, never the user's home."""
    monkeypatch.setenv("SEMHINET_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every file the shared decoder is asked for, in order."""
    calls: list[str] = []
    real = pipeline.load_frame

    def counting(path, pre):
        calls.append(str(path))
        return real(path, pre)

    monkeypatch.setattr(pipeline, "load_frame", counting)
    return calls


def _png(path: Path, seed: int, side: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def files(tmp_path) -> list[Path]:
    paths = [_png(tmp_path / "data" / f"img{i}.png", i) for i in range(6)]
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return [*paths[:3], tmp_path / "data" / "broken.png", *paths[3:]]


def _load(cache: FrameCache, paths: list[Path], pre: Preprocess = PRE):
    return cache.frames([str(p) for p in paths], [file_sha256(p) for p in paths], pre, progress=False)


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{cache_mod.LAYOUT}/*/*"))


def test_second_load_decodes_nothing_and_gives_the_decoders_pixels(tmp_path, files, decodes):
    cache = FrameCache(tmp_path / "cache")
    first, bad_first = _load(cache, files)
    assert len(decodes) == len(files)
    second, bad_second = _load(cache, files)
    assert len(decodes) == len(files)  # the hit decoded nothing, not even the broken file
    assert isinstance(second, np.memmap)
    expected, bad_expected = decode_frames([str(p) for p in files], PRE, workers=1, progress=False)
    assert np.array_equal(first, expected) and np.array_equal(second, expected)
    assert bad_first == bad_second == bad_expected and [p for p, _ in bad_expected] == [str(files[3])]
    assert len(_entries(tmp_path / "cache")) == 1


def test_changed_content_misses_and_decodes_only_the_changed_file(tmp_path, files, decodes):
    cache = FrameCache(tmp_path / "cache")
    before, _ = _load(cache, files)
    _png(files[1], seed=99)  # same name, new pixels
    decodes.clear()
    after, _ = _load(cache, files)
    assert decodes == [str(files[1])]  # the others are copied from the first entry
    assert not np.array_equal(after[1], before[1])
    assert np.array_equal(after[1], decode_frames([str(files[1])], PRE, progress=False)[0][0])
    assert np.array_equal(np.delete(after, 1, 0), np.delete(before, 1, 0))


def test_changed_preprocessing_misses(tmp_path, files, decodes):
    cache = FrameCache(tmp_path / "cache")
    _load(cache, files)
    for pre in (Preprocess(size=24), Preprocess(size=16, fit="pad"), Preprocess(size=16, databar="off")):
        decodes.clear()
        frames, _ = _load(cache, files, pre)
        assert len(decodes) == len(files) and frames.shape[1] == pre.size
    assert len({p.parent for p in _entries(tmp_path / "cache")}) == 4


def test_a_changed_decoder_misses(tmp_path, files, decodes, monkeypatch):
    cache = FrameCache(tmp_path / "cache")
    _load(cache, files)
    monkeypatch.setattr(cache_mod, "decoder_fingerprint", lambda: "another decoder")
    decodes.clear()
    _load(cache, files)
    assert len(decodes) == len(files)


@pytest.mark.parametrize("damage", ["truncate", "flip a pixel", "meta garbage", "meta gone", "extra bytes"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, files, decodes, damage, capsys):
    cache = FrameCache(tmp_path / "cache")
    good, _ = _load(cache, files)
    good = np.array(good)
    (entry,) = _entries(tmp_path / "cache")
    npy, meta = entry / "frames.npy", entry / "meta.json"
    if damage == "truncate":
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size - 100)
    elif damage == "flip a pixel":
        data = bytearray(npy.read_bytes())
        data[-1] ^= 0xFF
        npy.write_bytes(bytes(data))
    elif damage == "meta garbage":
        meta.write_text("{not json")
    elif damage == "meta gone":
        meta.unlink()
    else:
        with open(npy, "ab") as f:
            f.write(b"\0" * 16)
    decodes.clear()
    again, _ = _load(cache, files)
    assert len(decodes) == len(files)
    assert np.array_equal(again, good)
    assert "damaged" in capsys.readouterr().err
    decodes.clear()
    _load(cache, files)
    assert decodes == []  # the rebuilt entry is a valid hit


def test_an_unwritable_cache_falls_back_to_memory(tmp_path, files, capsys):
    (tmp_path / "not-a-folder").write_text("a file where the cache should be")
    frames, bad = _load(FrameCache(tmp_path / "not-a-folder"), files)
    expected, bad_expected = decode_frames([str(p) for p in files], PRE, progress=False)
    assert np.array_equal(frames, expected) and bad == bad_expected
    assert "decoding into memory" in capsys.readouterr().err


def test_racing_writers_leave_one_valid_entry(tmp_path, files, monkeypatch):
    """Two builders of the same entry, both held inside their decode until the other is there too."""
    barrier = threading.Barrier(2, timeout=30)
    started: set[int] = set()
    real = pipeline.load_frame

    def racing(path, pre):
        if threading.get_ident() not in started:
            started.add(threading.get_ident())
            barrier.wait()
        return real(path, pre)

    monkeypatch.setattr(pipeline, "load_frame", racing)
    results: list = []
    errors: list = []

    def build():
        try:
            frames, bad = _load(FrameCache(tmp_path / "cache"), files)
            results.append((np.array(frames), bad))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2 and len(started) == 2
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    (entry,) = _entries(tmp_path / "cache")
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert np.array_equal(cache_mod._open_entry(entry, None, PRE.size).frames, results[0][0])


def test_what_killed_runs_left_is_swept_once_a_day_old(tmp_path, files):
    """A SIGKILLed build leaves its .tmp folder (possibly the size of a dataset) that nothing removed."""
    import os
    import time

    cache = FrameCache(tmp_path / "cache")
    _load(cache, files)
    folder = _entries(tmp_path / "cache")[0].parent
    old, fresh, trash = folder / ".abc.x1.tmp", folder / ".abc.x2.tmp", folder / ".abc.x3.trash"
    for leftover in (old, fresh, trash):
        leftover.mkdir()
        (leftover / "frames.npy").write_bytes(b"\0" * 64)
    day_ago = time.time() - cache_mod.LEFTOVER_AGE_S - 60
    for leftover in (old, trash):
        os.utime(leftover, (day_ago, day_ago))
    _load(cache, files[:2])  # another data set: a build in the same folder
    assert not old.exists() and not trash.exists()
    assert fresh.exists()  # may be a run building right now


def test_frame_rows_index_like_the_rows_they_stand_for(tmp_path):
    base = np.random.default_rng(0).integers(0, 256, (10, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "f.npy", base)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    rows = [7, 2, 2, 9, 0]
    view, copy = FrameRows(mm, rows), base[rows]
    assert len(view) == 5 and view.shape == copy.shape and view.dtype == np.uint8
    for index in (3, slice(1, 4), (slice(0, 2), slice(None), slice(None), None), (slice(None), slice(None, None, -1)),
                  (2, slice(1, 3))):
        assert np.array_equal(view[index], copy[index]), index
    assert np.array_equal(view.take(np.array([4, 1]), axis=0), copy[[4, 1]])
    assert np.array_equal(np.asarray(view), copy)


def test_training_batches_are_the_same_from_the_memmap(tmp_path):
    from semhinet_tf.taxonomy import Taxonomy

    tax = Taxonomy.default()
    frames = np.random.default_rng(1).integers(0, 256, (24, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "f.npy", frames)
    leaf_ids = np.arange(16) % 8
    rows = np.arange(4, 20)
    in_memory = pipeline.make_dataset(frames[rows], leaf_ids, tax, 8, 3, seed=2)
    mapped = pipeline.make_dataset(FrameRows(np.load(tmp_path / "f.npy", mmap_mode="r"), rows), leaf_ids, tax, 8, 3,
                                   seed=2)
    for (xa, ya), (xb, yb) in zip(in_memory, mapped, strict=True):
        assert np.array_equal(xa.numpy(), xb.numpy())
        assert all(np.array_equal(ya[h].numpy(), yb[h].numpy()) for h in ya)


def test_prepare_dataset_twice_decodes_once_and_matches_no_cache(tmp_path, decodes):
    from semhinet_tf.data.dataset import prepare_dataset
    from semhinet_tf.taxonomy import Taxonomy
    from semhinet_tf.train import TrainConfig

    tax = Taxonomy.default()
    for c, leaf in enumerate(tax.leaves):
        for i in range(4):
            _png(tmp_path / "data" / leaf / f"{i}.png", 10 * c + i)
    cfg = TrainConfig(img_size=16, val_split=0.25)
    cache = FrameCache(tmp_path / "cache")
    runs = []
    for name, use in (("a", cache), ("b", cache), ("c", None)):
        decodes.clear()
        data = prepare_dataset(tmp_path / "data", tmp_path / name, tax, cfg, progress=False, cache=use)
        runs.append((len(decodes), data))
    assert [n for n, _ in runs] == [32, 0, 32]
    for _, data in runs[1:]:
        for side in ("train", "val"):
            assert np.array_equal(np.asarray(data[side][0]), np.asarray(runs[0][1][side][0]))
            assert np.array_equal(data[side][1], runs[0][1][side][1])
    assert isinstance(runs[1][1]["train"][0].base, np.memmap)


def test_default_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMHINET_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SEMHINET_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "semhinet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "semhinet"
    assert open_cache(tmp_path / "given").root == tmp_path / "given"
    assert open_cache(tmp_path / "given", enabled=False) is None


def test_cli_refuses_cache_dir_with_no_cache(tmp_path):
    from click.testing import CliRunner

    from semhinet_tf.cli import main

    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(main, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                       "--cache-dir", str(tmp_path / "c"), "--no-cache"])
    assert result.exit_code == 2
    assert "--no-cache" in result.output and not (tmp_path / "run").exists()
