"""Writing files so that nothing the user has is lost and no reader ever sees half a file.

Every write goes to a temporary file with a unique name in the target folder (two processes writing the
same output never share one) and is renamed over the target when complete, so the target appears whole or
not at all. `check_outputs` is called by every command before it starts its work: it refuses outputs that
exist (unless the user said --overwrite), that name a folder, or whose folder cannot be made, and outputs that
would replace what the command reads (artifacts.run.model_inputs says which files a model path stands for).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from semhinet_tf.data.decode import DATASET_RECORD, IMAGE_SUFFIXES


def to_jsonable(obj: Any) -> Any:
    """Plain Python types for json: numpy scalars/arrays converted, NaN/inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _temporary_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", newline: str | None = None, durable: bool = True) -> Iterator[IO]:
    """A file object for streaming into `path`: written under a unique temporary name in the same folder and
    renamed over `path` when the block ends without an exception; on any exception (Ctrl-C included) the
    temporary file is removed and `path`, if it existed, is left as it was. `durable` flushes to disk before
    the rename (a power cut then leaves the old file or the new one); bulk writers of many files skip it."""
    path = Path(path)
    kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": newline}
    if _is_stream(path):  # /dev/null, a named pipe, a terminal: written as it is, never replaced
        with open(path, mode, **kwargs) as f:
            yield f
        return
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs should be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "w", durable: bool = True) -> Path:
    """Call `write(f)` on a temporary file beside `path`, then rename it over `path`."""
    with atomic_open(path, mode, durable=durable) as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data), "wb")


def write_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as indented JSON atomically (numpy values converted, NaN written as null)."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def atomic_save(path: str | Path, save: Callable[[Path], None]) -> Path:
    """For writers that take a file name (Keras, onnx.save, np.savez): `save(tmp)` on a unique temporary name
    with the target's suffix, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        os.unlink(tmp)  # some writers refuse or misbehave on an existing file; the unique name stays ours
        save(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log and flush it to disk before returning (an acknowledged record is a kept record).

    A log whose last line was torn by a crash or a power cut does not end in a newline: the new line would be
    glued to the torn one and lost with it when read back, so a newline goes first then."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        torn = False
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + line.rstrip("\n").encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _is_stream(path: Path) -> bool:
    """An existing output that is not a regular file or folder (a device, a pipe): written, not replaced."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class OutputError(FileExistsError):
    """An output a command would write is refused before any work starts; str() is one line."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(paths: Iterable[str | Path | None], overwrite: bool = False, option: str = "--overwrite",
                  inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, outputs that would lose something or fail late.

    Each path must not be a folder, its parent must be a folder or creatable, it must not be one of the command's
    `inputs` (not even with `overwrite`: the command would destroy what it reads), and it must not exist unless
    `overwrite`. An input that is a folder is a folder of frames: an output below it may not be an image or the
    folder's DATASET_RECORD (it would replace a frame, or be read as one by the next command given the folder);
    other files (predict's JSON lines beside the frames) may. A model path stands for more than itself (its run's
    files): pass artifacts.run.model_inputs(model). All existing files are named at once, so the user sees
    everything a rerun would replace."""
    existing = []
    sources = [Path(i) for i in inputs if i is not None]
    folders = [s for s in sources if s.is_dir()]
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if p.is_dir():
            raise OutputError(f"{p}: is a folder; give a file name")
        if any(_same_file(p, source) for source in sources):
            raise OutputError(f"{p}: is an input of this command; write the output to another file")
        if p.suffix.lower() in IMAGE_SUFFIXES or p.name.lower() == DATASET_RECORD:
            for folder in folders:
                if is_inside(p, folder):
                    raise OutputError(f"{p}: lies in {folder}, a folder of frames this command reads (an output "
                                      f"there would replace or join its frames); write it elsewhere")
        parent = _first_existing_parent(p)
        if not parent.is_dir():
            raise OutputError(f"{p}: cannot be written ({parent} is not a folder)")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{p}: cannot be written (no write permission in {parent})")
        if (p.exists() or p.is_symlink()) and not _is_stream(p):
            existing.append(p)
    if existing and not overwrite:
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        names = ", ".join(str(p) for p in existing[:5]) + more
        raise OutputError(f"{names}: exist{'s' if len(existing) == 1 else ''} (use {option} to replace "
                          f"{'it' if len(existing) == 1 else 'them'})")


def _first_existing_parent(p: Path) -> Path:
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def is_inside(path: str | Path, other: str | Path) -> bool:
    """True when `path` is `other` or lies below it (symlinks resolved)."""
    a, b = Path(path).resolve(), Path(other).resolve()
    return a == b or b in a.parents


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks: the identity of a frame in the manifest, the review queue
    and the reviewer's answers, so a file edited or replaced since it was recorded is noticed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
