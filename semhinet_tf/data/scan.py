"""Walk image folders the one way every scan does (train, eval, predict, board), hiding nothing.

stdlib only, so the board imports it. A folder is listed with os.scandir; symlinked folders are followed
once (a link back to a folder being walked is a loop, a second link to a folder already walked would
scan its files twice); hidden names and system folders are left out. Each entry that cannot be read
(permission denied, symlink loop, broken symlink, ...) comes out as an `Unreadable` record in the order
met, so callers report it like an unreadable image instead of skipping it in silence.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"})
MISSING = "no such file or folder"


@dataclass(frozen=True)
class Unreadable:
    """An entry a scan could not read: where, and why (one line)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Folder:
    """A folder entered by `walk` (yielded before its contents)."""

    path: Path


def reason(exc: OSError) -> str:
    """One-line reason for a failed listing or stat, in the words the reports use."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT:
        return "broken symlink"
    return f"cannot read ({exc.strerror or type(exc).__name__})"


def walk(root: str | os.PathLike) -> Iterator[Folder | Path | Unreadable]:
    """Folders, regular files and unreadable entries below `root`, depth first in name order.

    Name order over files and folders together gives the same order as sorting all paths by their parts.
    """
    root = Path(root)
    try:
        st = root.stat()
    except OSError as exc:
        yield Unreadable(root, reason(exc))
        return
    yield from _walk(root, {(st.st_dev, st.st_ino): root}, {(st.st_dev, st.st_ino)})


def _walk(folder: Path, ancestors: dict, seen: set) -> Iterator[Folder | Path | Unreadable]:
    yield Folder(folder)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield Unreadable(folder, reason(exc))
        return
    for entry in entries:
        if entry.name.startswith(".") or entry.name in SKIP_DIRS:
            continue
        yield from _entry(entry, ancestors, seen)


def _entry(entry: os.DirEntry, ancestors: dict, seen: set) -> Iterator[Folder | Path | Unreadable]:
    path = Path(entry.path)
    try:
        st = entry.stat()  # follows symlinks
    except OSError as exc:
        yield Unreadable(path, reason(exc))
        return
    key = (st.st_dev, st.st_ino)
    if entry.is_dir():
        if key in ancestors:
            yield Unreadable(path, f"symlink loop (links back to {ancestors[key]})")
        elif key in seen:
            yield Unreadable(path, "folder already scanned through another link")
        else:
            seen.add(key)
            yield from _walk(path, {**ancestors, key: path}, seen)
    elif entry.is_file():
        yield path
    else:
        yield Unreadable(path, "not a regular file")


def scan_paths(items: Iterable[str | os.PathLike], suffixes: Iterable[str]) -> Iterator[Path | Unreadable]:
    """Files as given and files with one of `suffixes` below folders, streamed; what cannot be read (a
    missing item, an unreadable folder, a loop, a broken link) as `Unreadable` in its place."""
    suffixes = frozenset(s.lower() for s in suffixes)
    for item in items:
        p = Path(item)
        if p.is_dir():
            for entry in walk(p):
                if isinstance(entry, Unreadable) or (isinstance(entry, Path) and entry.suffix.lower() in suffixes):
                    yield entry
        elif p.exists():
            yield p
        else:
            yield Unreadable(p, MISSING if not p.is_symlink() else "broken symlink")
