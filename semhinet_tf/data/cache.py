"""Decoded frames kept on disk, memory-mapped, so a second run skips decoding and a dataset larger than RAM trains.

Layout: ``ROOT/frames-v1/<pre>/<data>/{frames.npy, meta.json}``

* ``<pre>`` hashes everything that decides the pixels besides the file: the `Preprocess` dict, the decoder
  (the bytes of data/decode.py and Pillow's version: any edit of the decoder invalidates, no version number to
  forget to bump) and the host's pixel limit (it decides which files are refused, and refusals are cached).
* ``<data>`` hashes the ordered list of the files' sha256 digests. The key is the file *content*, which
  discovery already hashes for the duplicate-grouped split, so keying costs nothing; size/mtime/inode would
  miss on a copied data folder and could hit on a file rewritten within the mtime granularity.
* frames.npy is a plain .npy of (N, S, S) uint8, read with ``np.load(mmap_mode="r")``: pages are read on
  demand and belong to the page cache, which the kernel reclaims under pressure. Rows of undecodable files are
  zeros and their reasons are in meta.json, so a hit replays the same skipped list without touching a file.
* An entry is written in a temporary folder with a unique name and published by renaming the folder: readers
  see a whole entry or none, and of two runs building the same entry the second rename fails and its copy is
  dropped (both copies are identical). meta.json carries the CRC-32 of the pixel data and the digests; an
  entry that does not match on open (truncated, edited, half-deleted) is removed and built again.
* Building streams decoded frames to the file, never holding the dataset in memory, and copies the rows of
  files already decoded in another entry of the same ``<pre>`` (a folder with a few new images decodes only
  those).

Delete the folder at any time to reclaim the disk; nothing else refers to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semhinet_tf.data.decode import Preprocess, host_max_pixels

FORMAT = "semhinet-frames-1"
LAYOUT = "frames-v1"
_FRAMES, _META = "frames.npy", "meta.json"
_BLOCK = 16 << 20  # bytes per read when checking the CRC


def default_cache_dir() -> Path:
    """$SEMHINET_CACHE, else $XDG_CACHE_HOME/semhinet, else ~/.cache/semhinet."""
    if os.environ.get("SEMHINET_CACHE"):
        return Path(os.environ["SEMHINET_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "semhinet"


def open_cache(cache_dir: str | os.PathLike | None = None, enabled: bool = True) -> FrameCache | None:
    """The cache a command uses: `cache_dir` or the default location; None when switched off (--no-cache)."""
    if not enabled:
        return None
    return FrameCache(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())


def decoder_fingerprint() -> str:
    """What identifies the decoder's behaviour: its source and Pillow's version (resampling lives there)."""
    import PIL

    from semhinet_tf.data import decode

    h = hashlib.sha256(Path(decode.__file__).read_bytes())
    h.update(f"Pillow {PIL.__version__}".encode())
    return h.hexdigest()


class CacheDamagedError(ValueError):
    """An entry that does not match its meta.json; str() says what, in one line."""


@dataclass(frozen=True)
class _Entry:
    path: Path
    frames: np.ndarray  # read-only memmap (N, S, S) uint8
    digests: list[str]
    bad: dict[int, str]  # row -> reason


class FrameCache:
    """Content-addressed store of decoded frames; `frames()` is the one call the data code makes."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def frames(self, paths: Sequence[str | os.PathLike], digests: Sequence[str], pre: Preprocess,
               progress: bool = True, desc: str = "decode") -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Frames of `paths` (whose sha256 are `digests`) as a read-only memmap, and (path, reason) for the
        files that could not be decoded; same contract as `pipeline.decode_frames`."""
        if len(paths) != len(digests):
            raise ValueError(f"{len(paths)} paths but {len(digests)} digests")
        folder = self.root / LAYOUT / _pre_key(pre)
        key = hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]
        entry = self._open_or_drop(folder / key, digests, pre.size)
        if entry is None:
            try:
                entry = self._build(folder, key, list(map(str, paths)), list(digests), pre, progress, desc)
            except OSError as exc:  # read-only home, disk full, ...: the run goes on as without a cache
                from semhinet_tf.data.pipeline import decode_frames

                print(f"semhinet: frame cache {self.root} unusable ({_one_line(exc)}); decoding into memory",
                      file=sys.stderr)
                return decode_frames(paths, pre, progress=progress, desc=desc)
        return entry.frames, [(str(paths[row]), reason) for row, reason in sorted(entry.bad.items())]

    # ------------------------------------------------------------------------------------------ reading
    def _open_or_drop(self, path: Path, digests: Sequence[str], size: int) -> _Entry | None:
        if not path.exists():
            return None
        try:
            return _open_entry(path, digests, size)
        except (CacheDamagedError, OSError, ValueError) as exc:
            print(f"semhinet: frame cache {path} is damaged ({_one_line(exc)}); decoding again", file=sys.stderr)
            _remove(path)
            return None

    def _known_rows(self, folder: Path, wanted: set[str], size: int) -> dict[str, tuple[np.ndarray, int] | str]:
        """digest -> (frames, row), or the reason it could not be decoded, for wanted files already decoded in
        another entry of the same preprocessing (which includes the pixel limit, so refusals still hold)."""
        known: dict[str, tuple[np.ndarray, int] | str] = {}
        if not folder.is_dir():
            return known
        for other in sorted(folder.iterdir()):
            if other.name.startswith(".") or not wanted - known.keys():
                continue
            try:
                entry = _open_entry(other, None, size)
            except (CacheDamagedError, OSError, ValueError):
                continue  # another run may be removing it; never fatal for this one
            for row, d in enumerate(entry.digests):
                if d in wanted:
                    known.setdefault(d, entry.bad.get(row) or (entry.frames, row))
        return known

    # ------------------------------------------------------------------------------------------ writing
    def _build(self, folder: Path, key: str, paths: list[str], digests: list[str], pre: Preprocess,
               progress: bool, desc: str) -> _Entry:
        folder.mkdir(parents=True, exist_ok=True)
        _sweep_leftovers(folder)
        known = self._known_rows(folder, set(digests), pre.size)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{key}.", suffix=".tmp"))
        try:
            bad, crc = _write_frames(tmp / _FRAMES, paths, digests, known, pre, progress, desc)
            meta = {"format": FORMAT, "preprocess": pre.to_dict(), "decoder": decoder_fingerprint(),
                    "max_pixels": host_max_pixels(), "shape": [len(paths), pre.size, pre.size], "crc32": crc,
                    "digests": digests, "bad": {str(r): reason for r, reason in bad.items()}}
            (tmp / _META).write_text(json.dumps(meta))
            _fsync(tmp / _META)
            final = folder / key
            try:
                os.rename(tmp, final)  # atomic; fails when another run published the same entry first
            except OSError:
                if not final.exists():
                    raise
                _remove(tmp)
            return _open_entry(final, digests, pre.size, check_crc=False)
        except BaseException:
            _remove(tmp)
            raise


def _pre_key(pre: Preprocess) -> str:
    spec = {"preprocess": pre.to_dict(), "decoder": decoder_fingerprint(), "max_pixels": host_max_pixels()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _open_entry(path: Path, digests: Sequence[str] | None, size: int, check_crc: bool = True) -> _Entry:
    """The entry at `path`, checked against its meta.json (and the digests asked for); CacheDamagedError if not."""
    try:
        meta = json.loads((path / _META).read_text())
    except (OSError, ValueError) as exc:
        raise CacheDamagedError(f"{_META} unreadable: {_one_line(exc)}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CacheDamagedError(f"{_META} is not a {FORMAT} record")
    recorded = meta.get("digests")
    if not isinstance(recorded, list) or not isinstance(meta.get("bad", {}), dict):
        raise CacheDamagedError(f"{_META} lacks its list of files")
    if digests is not None and recorded != list(digests):
        raise CacheDamagedError("its files are not the ones asked for")
    shape = (len(recorded), size, size)
    frames = np.load(path / _FRAMES, mmap_mode="r", allow_pickle=False)
    if frames.dtype != np.uint8 or frames.shape != shape or tuple(meta.get("shape", ())) != shape:
        raise CacheDamagedError(f"frames {frames.dtype} {frames.shape}, expected uint8 {shape}")
    expected = frames.offset + frames.nbytes
    actual = (path / _FRAMES).stat().st_size
    if actual != expected:
        raise CacheDamagedError(f"{_FRAMES} has {actual} bytes, expected {expected}")
    if check_crc and _crc(path / _FRAMES, frames.offset) != meta.get("crc32"):
        raise CacheDamagedError(f"{_FRAMES} does not match its checksum")
    return _Entry(path, frames, recorded, {int(r): str(v) for r, v in meta.get("bad", {}).items()})


def _write_frames(target: Path, paths: list[str], digests: list[str], known: dict, pre: Preprocess,
                  progress: bool, desc: str) -> tuple[dict[int, str], int]:
    """Stream the frames, in order, to a .npy: rows decoded elsewhere are copied, the rest decoded now.
    Written with plain writes, not through a writable memmap, so the dataset never sits in this process.
    Returns the undecodable rows with their reasons and the CRC-32 of the pixel data."""
    from semhinet_tf.data.pipeline import iter_decoded

    todo = [i for i, d in enumerate(digests) if d not in known]
    decoded = iter_decoded([paths[i] for i in todo], pre, progress=progress, desc=desc)
    bad: dict[int, str] = {}
    crc = 0
    blank = np.zeros((pre.size, pre.size), np.uint8)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(paths), pre.size, pre.size)}
    with open(target, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        for i, row in _rows(len(paths), todo, decoded, known, digests):
            if isinstance(row, str):
                bad[i] = row
                row = blank
            data = np.ascontiguousarray(row, np.uint8).tobytes()
            crc = zlib.crc32(data, crc)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return bad, crc


def _rows(n: int, todo: list[int], decoded: Iterator, known: dict, digests: list[str]) -> Iterator:
    """(row, frame or reason) for rows 0..n-1, taking decoded results in order for the rows in `todo`."""
    todo_set = set(todo)
    for i in range(n):
        if i in todo_set:
            frame, reason = next(decoded)
            yield i, frame if frame is not None else (reason or "unreadable")
        else:
            found = known[digests[i]]
            yield i, found if isinstance(found, str) else found[0][found[1]]


def _crc(path: Path, offset: int) -> int:
    """CRC-32 of the pixel data, read with plain reads (page cache, not this process's memory)."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(_BLOCK), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Take an entry out of sight first (rename), then delete it; a run still mapping it keeps its pages."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.trash")
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


LEFTOVER_AGE_S = 24 * 3600  # a build's temporary folder older than this belongs to no live run


def _sweep_leftovers(folder: Path, now: float | None = None) -> None:
    """Remove what killed runs left (a half-written `.tmp` entry, a `.trash` one not yet deleted), once a day old:
    an exception removes its own, but SIGKILL or a power cut cannot, and each can be the size of a dataset."""
    import time

    now = time.time() if now is None else now
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith((".tmp", ".trash")):
            try:
                if now - entry.stat().st_mtime > LEFTOVER_AGE_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue  # another run removed it first


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class FrameRows:
    """Rows `rows` of a frames array (in-memory or memory-mapped) without copying them out.

    The training and validation splits are row lists into the decoded dataset; indexing returns ndarrays of
    just the rows asked for, `take(idx, axis=0)` is what the tf.data gather calls, and `np.asarray` copies all."""

    def __init__(self, frames: np.ndarray, rows: Sequence[int] | np.ndarray) -> None:
        self.base = frames
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *frames.shape[1:])
        self.dtype = frames.dtype
        self.ndim = frames.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        rows = self.rows[first]
        out = np.asarray(self.base[rows])
        if not rest:
            return out
        return out[(slice(None), *rest)] if np.ndim(rows) else out[rest]

    def take(self, indices, axis: int = 0) -> np.ndarray:
        """Like ndarray.take along the first axis (the only one the pipeline gathers on)."""
        if axis != 0:
            raise ValueError("FrameRows.take gathers rows only (axis=0)")
        return np.asarray(self.base[self.rows[np.asarray(indices)]])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.take(np.arange(len(self.rows)))
        return out if dtype is None else out.astype(dtype)
