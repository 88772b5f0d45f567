"""Find the labelled images under a data folder, check them once, and split them into train / val.

Layout: a *class folder* is the first path component under the data root whose name matches a leaf of
the taxonomy (case and separator insensitive, aliases allowed: `Inc-Etch`, `IncEtch`, `LER`, ...).
Images anywhere below it belong to that class (`root/Bridge/lot1/wafer2/img.tif`), and container folders
above it are fine (`root/2024/lotA/bridge/img.png`). Images outside any class folder are ignored and
reported (their folders as *unknown folders*), so a typo never silently drops a class.

numpy + stdlib (+ tqdm when present); never TensorFlow. Every image is decoded once with the same
`load_frame` rules the model uses, so a file that would crash training is skipped here with its reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semhinet_tf.artifacts.files import file_sha256
from semhinet_tf.artifacts.run import MANIFEST_CSV, MANIFEST_JSON, SKIPPED_CSV, SPLIT
from semhinet_tf.data.decode import IMAGE_SUFFIXES, ImageError, Preprocess, frame_from_array, image_size, read_grey
from semhinet_tf.data.scan import Folder, Unreadable, walk
from semhinet_tf.taxonomy import Taxonomy

SPLIT_JSON = SPLIT  # the name this module's callers know
_POOL_MIN_FILES = 64  # below this a process pool costs more than it saves


class DatasetError(ValueError):
    """A data folder, manifest or split that training cannot use; the message is one line."""


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the data root, posix separators
    leaf: str
    labels: dict[str, int]  # head -> class index, taxonomy.IGNORE where the head does not apply
    width: int
    height: int
    sha256: str
    folder_leaf: str = ""  # the class folder's leaf where a reviewed label overrode it (train --labels)


@dataclass
class Manifest:
    root: str
    entries: list[Entry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files and folders: (path, reason)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # images outside class folders
    unknown_folders: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)  # class folders without any image file
    not_images: list[str] = field(default_factory=list)  # other files in class folders (notes, .webp, .dm3 ...)
    preprocess: dict[str, Any] | None = None  # the rules the images were checked with
    checked: bool = True  # every image fully decoded (False: headers only)
    review: dict[str, Any] | None = None  # what `train --from --labels` took from the reviewer's answers

    # ------------------------------------------------------------------ views
    @property
    def duplicate_groups(self) -> list[list[str]]:
        """Paths of byte-identical files, one sorted list per content hash with more than one file."""
        by_hash: dict[str, list[str]] = defaultdict(list)
        for e in self.entries:
            by_hash[e.sha256].append(e.path)
        return sorted(sorted(g) for g in by_hash.values() if len(g) > 1)

    @property
    def conflicting_duplicates(self) -> list[list[str]]:
        """Duplicate groups whose copies sit in different classes (a labelling error to fix)."""
        leaf_of = {e.path: e.leaf for e in self.entries}
        return [g for g in self.duplicate_groups if len({leaf_of[p] for p in g}) > 1]

    def counts(self) -> dict[str, int]:
        """Images per leaf (leaves without images are absent), sorted by leaf name."""
        return dict(sorted(Counter(e.leaf for e in self.entries).items()))

    def file(self, path: str) -> Path:
        """Absolute path of a manifest path."""
        return Path(self.root) / path

    def select(self, paths: Iterable[str]) -> list[Entry]:
        """The entries for the given paths (e.g. one side of a split); DatasetError for unknown paths."""
        by_path = {e.path: e for e in self.entries}
        missing = [p for p in paths if p not in by_path]
        if missing:
            raise DatasetError(f"{len(missing)} path(s) not in the manifest of {self.root}, e.g. {missing[0]}")
        return [by_path[p] for p in paths]

    def summary(self) -> str:
        """One line: '1234 images in 8 classes; 3 skipped (see skipped.csv); 2 duplicate groups; ...'."""
        counts = self.counts()
        parts = [f"{len(self.entries)} images in {len(counts)} classes"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (see {SKIPPED_CSV})")
        dups = self.duplicate_groups
        if dups:
            parts.append(f"{len(dups)} duplicate group{'s' if len(dups) != 1 else ''}")
        conflicts = self.conflicting_duplicates
        if conflicts:
            parts.append(f"{len(conflicts)} duplicated across classes")
        if self.ignored:
            parts.append(f"{len(self.ignored)} images outside class folders ignored")
        if self.not_images:
            kinds = "/".join(sorted(x.lstrip(".") for x in IMAGE_SUFFIXES))
            parts.append(f"{len(self.not_images)} file(s) in class folders not read (not {kinds}; e.g. "
                         f"{self.not_images[0]})")
        if self.unknown_folders:
            parts.append("unknown folders: " + ", ".join(self.unknown_folders))
        if self.empty_classes:
            parts.append("empty class folders: " + ", ".join(self.empty_classes))
        return "; ".join(parts)

    # ------------------------------------------------------------------ files
    def save(self, run_dir: str | os.PathLike) -> None:
        """manifest.csv, skipped.csv and manifest.json (root, folders, rules), each written atomically."""
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        header = ["path", "leaf", "labels", "width", "height", "sha256"]
        rows = [[e.path, e.leaf, format_labels(e.labels), e.width, e.height, e.sha256] for e in self.entries]
        if any(e.folder_leaf for e in self.entries):  # a reviewed label overrode a folder's: both are kept
            header.append("folder_leaf")
            rows = [[*row, e.folder_leaf] for row, e in zip(rows, self.entries, strict=True)]
        _write_atomic(run / MANIFEST_CSV, _csv(header, rows))
        _write_atomic(run / SKIPPED_CSV, _csv(["path", "reason"], [list(s) for s in self.skipped]))
        meta = {"root": self.root, "checked": self.checked, "preprocess": self.preprocess,
                "summary": self.summary(), "counts": self.counts(), "unknown_folders": self.unknown_folders,
                "empty_classes": self.empty_classes, "ignored": [list(i) for i in self.ignored],
                "not_images": self.not_images}
        if self.review is not None:
            meta["review"] = self.review
        _write_atomic(run / MANIFEST_JSON, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Manifest:
        run = Path(run_dir)
        meta = _read_json(run / MANIFEST_JSON)
        entries = []
        for row in _read_csv(run / MANIFEST_CSV, ["path", "leaf", "labels", "width", "height", "sha256"]):
            try:
                entries.append(Entry(row["path"], row["leaf"], parse_labels(row["labels"]), int(row["width"]),
                                     int(row["height"]), row["sha256"], row.get("folder_leaf") or ""))
            except ValueError as exc:
                raise DatasetError(f"{run / MANIFEST_CSV}: bad row for {row.get('path')!r} ({exc})") from None
        skipped_path = run / SKIPPED_CSV
        skipped = ([(r["path"], r["reason"]) for r in _read_csv(skipped_path, ["path", "reason"])]
                   if skipped_path.exists() else [])
        return cls(root=str(meta.get("root", "")), entries=entries, skipped=skipped,
                   ignored=[(str(p), str(r)) for p, r in meta.get("ignored", [])],
                   not_images=[str(p) for p in meta.get("not_images", [])],
                   unknown_folders=list(meta.get("unknown_folders", [])),
                   empty_classes=list(meta.get("empty_classes", [])),
                   preprocess=meta.get("preprocess"), checked=bool(meta.get("checked", True)),
                   review=meta.get("review"))


def format_labels(labels: dict[str, int]) -> str:
    """{'h1': 2, 'h2': 0} -> 'h1:2;h2:0' (the manifest.csv form)."""
    return ";".join(f"{h}:{v}" for h, v in labels.items())


def parse_labels(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(";")):
        head, _, value = item.partition(":")
        out[head] = int(value)
    return out


# ---------------------------------------------------------------------------------------------- discovery
def discover(root: str | os.PathLike, taxonomy: Taxonomy, strict: bool = False, check_images: bool = True,
             pre: Preprocess | None = None, progress: bool = True, workers: int | None = None) -> Manifest:
    """Walk `root`, map class folders to leaves, check every image once and return the manifest.

    strict: unknown folders, images outside class folders and unreadable images raise DatasetError
    instead of being reported. check_images=False reads headers only (fast, but bad pixels surface
    later). workers: processes for the check (default: all cores when there are many files).
    """
    root_path = Path(root).expanduser().absolute()
    if not root_path.is_dir():
        raise DatasetError(f"{root_path}: data folder {'is not a folder' if root_path.exists() else 'not found'}")
    pre = pre or Preprocess()
    found = _scan(root_path, taxonomy)
    if strict:
        _refuse_unclassified(root_path, found, taxonomy)
    results = _inspect_all(root_path, [p for p, _ in found.candidates], pre, check_images, progress, workers)
    entries, skipped = [], list(found.unreadable)
    for (path, leaf), (digest, width, height, reason) in zip(found.candidates, results, strict=True):
        if reason is not None:
            skipped.append((path, reason))
        else:
            entries.append(Entry(path, leaf, taxonomy.leaf_targets(leaf), width, height, digest))
    if strict and skipped:
        raise DatasetError(f"{root_path}: {len(skipped)} unreadable image(s) or folder(s), e.g. "
                           f"{skipped[0][0]}: {skipped[0][1]}")
    return Manifest(root=str(root_path), entries=entries, skipped=skipped, ignored=found.ignored,
                    unknown_folders=found.unknown_folders, empty_classes=found.empty_classes,
                    not_images=found.not_images,
                    preprocess=pre.to_dict(), checked=check_images)


@dataclass
class _Scan:
    candidates: list[tuple[str, str]]  # (relative path, leaf), sorted by path
    ignored: list[tuple[str, str]]
    unknown_folders: list[str]
    empty_classes: list[str]
    unreadable: list[tuple[str, str]]  # folders, links and entries the walk could not read: (path, reason)
    not_images: list[str] = field(default_factory=list)  # files in class folders with no image suffix read here


def _scan(root: Path, taxonomy: Taxonomy) -> _Scan:
    """Classify every image file under root by its class folder (no decoding yet)."""
    candidates, ignored, unreadable, not_images = [], [], [], []
    class_folders: dict[str, int] = {}  # class folder -> number of image files below it
    unknown: set[str] = set()
    for entry in walk(root):
        if isinstance(entry, Unreadable):
            unreadable.append((Path(os.path.relpath(entry.path, root)).as_posix(), entry.reason))
            continue
        folder_path = entry.path if isinstance(entry, Folder) else entry.parent
        rel_dir = folder_path.relative_to(root).parts
        cls_at = next((i for i, part in enumerate(rel_dir) if taxonomy.match_folder(part)), None)
        folder = "/".join(rel_dir[:cls_at + 1]) if cls_at is not None else None
        if isinstance(entry, Folder):
            if folder is not None:
                class_folders.setdefault(folder, 0)
            continue
        rel = "/".join((*rel_dir, entry.name))
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            if folder is not None and not entry.name.startswith("."):  # a .webp or .dm3 among the frames
                not_images.append(rel)
            continue
        if folder is not None:
            candidates.append((rel, taxonomy.match_folder(rel_dir[cls_at])))
            class_folders[folder] += 1
        elif not rel_dir:
            ignored.append((rel, "directly in the data root, not in a class folder"))
        else:
            unknown.add("/".join(rel_dir))
            ignored.append((rel, f"folder {'/'.join(rel_dir)!r} is not a class folder"))
    candidates.sort()
    ignored.sort()
    empty = sorted(f for f, n in class_folders.items() if n == 0)
    return _Scan(candidates, ignored, _topmost(unknown), empty, unreadable, sorted(not_images))


def _topmost(folders: set[str]) -> list[str]:
    """Drop folders whose ancestor is also listed: 'misc' covers 'misc/old'."""
    out: list[str] = []
    for f in sorted(folders):
        if not any(f.startswith(o + "/") for o in out):
            out.append(f)
    return out


def _refuse_unclassified(root: Path, found: _Scan, taxonomy: Taxonomy) -> None:
    classes = ", ".join(taxonomy.leaves)
    if found.unknown_folders:
        raise DatasetError(f"{root}: folders that are not classes: {', '.join(found.unknown_folders)} "
                           f"(classes: {classes}); rename or move them, or run without --strict")
    if found.ignored:
        raise DatasetError(f"{root}: {len(found.ignored)} image(s) directly in the data root, e.g. "
                           f"{found.ignored[0][0]}; put them in a class folder ({classes})")


# ---------------------------------------------------------------------------------------------- checking
_Result = tuple[str, int, int, str | None]  # sha256, width, height, reason when unusable


def _inspect(args: tuple[str, dict[str, Any], bool]) -> _Result:
    """Hash one file and decode it with the model's rules; never raises (runs in worker processes)."""
    path, pre_dict, check = args
    pre = Preprocess.from_dict(pre_dict)
    try:
        digest = file_sha256(path)
        if check:
            arr = read_grey(path)
            height, width = arr.shape
            frame_from_array(arr, pre)
        else:
            width, height = image_size(path)
        return digest, int(width), int(height), None
    except ImageError as exc:
        return "", 0, 0, exc.reason
    except (ValueError, OSError, MemoryError) as exc:
        return "", 0, 0, " ".join(f"{type(exc).__name__}: {exc}".split())


def _inspect_all(root: Path, paths: Sequence[str], pre: Preprocess, check: bool, progress: bool,
                 workers: int | None) -> list[_Result]:
    jobs = [(str(root / p), pre.to_dict(), check) for p in paths]
    if workers is None:
        workers = (os.cpu_count() or 1) if len(jobs) >= _POOL_MIN_FILES else 1
    desc = "checking images" if check else "reading headers"
    if workers > 1 and len(jobs) > 1:
        bar = _progress_bar(len(jobs), desc, progress)
        try:
            return _run_pool(jobs, workers, bar)
        except (OSError, RuntimeError) as exc:  # no /dev/shm, spawn refused, broken pool ...
            print(f"semhinet: process pool unavailable ({exc}); checking images in one process", file=sys.stderr)
        finally:
            bar.close()
    bar = _progress_bar(len(jobs), desc, progress)
    try:
        out = []
        for job in jobs:
            out.append(_inspect(job))
            bar.update(1)
        return out
    finally:
        bar.close()


def _run_pool(jobs: list, workers: int, bar) -> list[_Result]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    # fork is fast and needs no __main__ guard, but is unsafe once TensorFlow's threads exist; spawn would
    # re-run an unguarded user script in every child, so with TensorFlow loaded we use threads (Pillow and
    # hashlib release the GIL while decoding and hashing).
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    out = []
    if "fork" in mp.get_all_start_methods() and "tensorflow" not in sys.modules:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"))
    else:
        pool = ThreadPoolExecutor(max_workers=workers)
    with pool as ex:
        for res in ex.map(_inspect, jobs, chunksize=chunk):
            out.append(res)
            bar.update(1)
    return out


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- split
def stratified_split(manifest: Manifest, val_fraction: float = 0.2, seed: int = 0,
                     min_per_class: int = 2) -> dict[str, Any]:
    """Seeded per-class train/val split that keeps byte-identical files on the same side.

    Within each class, scikit-learn's GroupShuffleSplit (groups = content hash, random_state = seed) draws
    whole duplicate groups for validation: `val_fraction` of the class's distinct images, at least one, and
    at least one left for training. Stratified because each class is split on its own, which also keeps a
    class's split unchanged when other classes change; the same manifest and seed give the same split
    whatever the folder order, and the split is saved, so a run never depends on the library drawing again.
    A class with fewer than `min_per_class` distinct images stays in training, with a warning.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_per_class < 2:
        raise DatasetError(f"min_per_class must be at least 2 (one image per side), got {min_per_class}")
    groups, warnings = _class_groups(manifest)
    train: list[str] = []
    val: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for leaf in sorted(groups):
        members = groups[leaf]
        paths = sorted(p for g in members.values() for p in g)
        to_val: list[str] = []
        if val_fraction > 0 and len(members) < min_per_class:
            warnings.append(f"class {leaf} has only {len(members)} distinct image(s), fewer than "
                            f"{min_per_class}: all kept in training, none in validation")
        elif val_fraction > 0:
            to_val = _pick_val(members, val_fraction, seed)
        chosen = set(to_val)
        val.extend(to_val)
        train.extend(p for p in paths if p not in chosen)
        counts[leaf] = {"train": len(paths) - len(to_val), "val": len(to_val)}
    return {"root": manifest.root, "seed": int(seed), "val_fraction": float(val_fraction),
            "min_per_class": int(min_per_class), "train": sorted(train), "val": sorted(val),
            "counts": counts, "warnings": warnings}


def _class_groups(manifest: Manifest) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """leaf -> {sha256: paths}; a duplicate group spread over classes goes with its most common class."""
    by_hash: dict[str, list[Entry]] = defaultdict(list)
    for e in manifest.entries:
        by_hash[e.sha256].append(e)
    groups: dict[str, dict[str, list[str]]] = defaultdict(dict)
    warnings = []
    for digest, members in by_hash.items():
        leaves = Counter(e.leaf for e in members)
        leaf = sorted(leaves.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        if len(leaves) > 1:
            warnings.append(f"identical files in different classes ({', '.join(sorted(leaves))}): "
                            f"{', '.join(sorted(e.path for e in members))}; kept together on one side")
        groups[leaf][digest] = sorted(e.path for e in members)
    return groups, warnings


def _pick_val(members: dict[str, list[str]], val_fraction: float, seed: int) -> list[str]:
    """One class's validation images: whole duplicate groups drawn by GroupShuffleSplit, at least one group on
    each side."""
    from sklearn.model_selection import GroupShuffleSplit

    paths = sorted(p for g in members.values() for p in g)
    digest_of = {p: d for d, g in members.items() for p in g}
    n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
    splitter = GroupShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    _, val_idx = next(splitter.split(paths, groups=[digest_of[p] for p in paths]))
    return [paths[i] for i in sorted(val_idx)]


def save_split(split: dict[str, Any], run_dir: str | os.PathLike) -> Path:
    """Write split.json (atomically) into the run directory; returns its path."""
    path = Path(run_dir) / SPLIT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(split, indent=2) + "\n")
    return path


def load_split(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The split saved by `save_split` (paths relative to split['root'])."""
    path = Path(run_dir) / SPLIT_JSON
    split = _read_json(path)
    missing = [k for k in ("root", "train", "val") if k not in split]
    if missing:
        raise DatasetError(f"{path}: not a split file (missing {', '.join(missing)})")
    return split


def require_all_classes(manifest: Manifest, taxonomy: Taxonomy) -> None:
    """Refuse to train when a class has no usable image, and say which (DatasetError)."""
    counts = manifest.counts()
    missing = [leaf for leaf in taxonomy.leaves if counts.get(leaf, 0) == 0]
    if missing:
        hint = f"; {len(manifest.skipped)} unreadable file(s) listed in {SKIPPED_CSV}" if manifest.skipped else ""
        raise DatasetError(f"no usable images for class{'es' if len(missing) > 1 else ''} {', '.join(missing)} "
                           f"under {manifest.root} (each class needs a folder named after it){hint}")


# ---------------------------------------------------------------------------------------------- files
def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and os.replace, so readers never see half a file."""
    from semhinet_tf.artifacts.files import atomic_open

    with atomic_open(path, "w", newline="") as f:
        f.write(text)


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _read_csv(path: Path, columns: list[str]) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or any(c not in reader.fieldnames for c in columns):
                raise DatasetError(f"{path}: expected columns {', '.join(columns)}")
            return list(reader)
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (run discovery first)") from None
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return data
