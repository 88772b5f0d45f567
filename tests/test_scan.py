"""Folder scans report what they cannot read (issue 22.8): one walk for train, eval, predict and the board.

An unreadable folder is made with chmod 000 when the tests run as an ordinary user; as root (where chmod
000 does not stop reading) os.scandir is made to refuse that one folder with EACCES instead, which is
what the kernel would do. The symlink loop and the broken link are real in both cases.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semhinet_tf.data.discover import discover
from semhinet_tf.data.scan import Folder, Unreadable, scan_paths, walk
from semhinet_tf.taxonomy import Taxonomy

TAX = Taxonomy.default()
SUFFIXES = {".png"}


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40), dtype=np.uint8)).save(path)


def make_tree(root: Path) -> dict[str, Path]:
    """root/open/{a.png, locked/b.png, loop -> root/open, gone.png -> nowhere}, root/bridge/c.png."""
    _png(root / "open" / "a.png", 1)
    _png(root / "open" / "locked" / "b.png", 2)
    _png(root / "bridge" / "c.png", 3)
    (root / "open" / "loop").symlink_to(root / "open", target_is_directory=True)
    (root / "open" / "gone.png").symlink_to(root / "nowhere.png")
    return {"locked": root / "open" / "locked", "loop": root / "open" / "loop", "gone": root / "open" / "gone.png"}


@pytest.fixture
def locked_tree(tmp_path, monkeypatch) -> dict[str, Path]:
    tree = make_tree(tmp_path / "data")
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


def test_walk_reports_each_entry_it_cannot_read(locked_tree):
    root = locked_tree["locked"].parents[1]
    entries = list(walk(root))
    bad = {e.path: e.reason for e in entries if isinstance(e, Unreadable)}
    assert bad[locked_tree["locked"]] == "permission denied"
    assert bad[locked_tree["loop"]].startswith("symlink loop (links back to")
    assert bad[locked_tree["gone"]] == "broken symlink"
    files = [e.relative_to(root).as_posix() for e in entries if isinstance(e, Path)]
    assert files == ["bridge/c.png", "open/a.png"]  # the loop was not followed, the locked file not listed
    assert Folder(root / "open") in entries


def test_self_link_and_second_link_are_reported(tmp_path):
    _png(tmp_path / "d" / "x" / "a.png", 1)
    (tmp_path / "d" / "self").symlink_to(tmp_path / "d" / "self")
    (tmp_path / "d" / "y").symlink_to(tmp_path / "d" / "x", target_is_directory=True)
    bad = {e.path.name: e.reason for e in walk(tmp_path / "d") if isinstance(e, Unreadable)}
    assert bad == {"self": "symlink loop", "y": "folder already scanned through another link"}


def test_scan_paths_in_order_with_missing_items(tmp_path):
    _png(tmp_path / "a" / "b.png", 1)
    _png(tmp_path / "a" / "b" / "c.png", 2)
    (tmp_path / "a" / "note.txt").write_text("x")
    out = list(scan_paths([tmp_path / "a", tmp_path / "nope.png"], SUFFIXES))
    assert out[:2] == sorted(out[:2]) == [tmp_path / "a" / "b" / "c.png", tmp_path / "a" / "b.png"]
    assert out[2] == Unreadable(tmp_path / "nope.png", "no such file or folder")


def test_discover_lists_unreadable_folders_and_links_as_skipped(locked_tree):
    root = locked_tree["locked"].parents[1]
    m = discover(root, TAX, progress=False)
    skipped = dict(m.skipped)
    assert skipped["open/locked"] == "permission denied"
    assert skipped["open/loop"].startswith("symlink loop")
    assert "open/gone.png" in skipped
    assert sorted(e.path for e in m.entries) == ["bridge/c.png", "open/a.png"]


def test_eval_notes_name_each_skipped_entry(locked_tree):
    from semhinet_tf.data.dataset import eval_items

    root = locked_tree["locked"].parents[1]
    items, split, notes = eval_items(root, TAX, None, None)
    assert len(items) == 2 and split == "all"
    assert f"skipped {locked_tree['locked']}: permission denied" in notes
    assert any(n.startswith(f"skipped {locked_tree['loop']}: symlink loop") for n in notes)
