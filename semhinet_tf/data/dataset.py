"""From a data folder to decoded training/validation frames, with the manifest and split saved in the run.

Discovery reads headers and hashes; the one full decode (shared decoder, parallel) happens here, and
a file that fails it is moved to the skipped list with its reason, so no image is decoded twice. With a
frame cache (the default for `train`) the decoded frames live in a memory-mapped file keyed by the files'
hashes and the preprocessing, so a second run decodes nothing; the splits are row lists into it (FrameRows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.run import CONFIG, SKIPPED_CSV, SPLIT, TAXONOMY
from semhinet_tf.data.cache import FrameCache, FrameRows
from semhinet_tf.data.decode import Preprocess
from semhinet_tf.data.discover import (
    DatasetError,
    Manifest,
    discover,
    load_split,
    require_all_classes,
    save_split,
    stratified_split,
)
from semhinet_tf.data.pipeline import decode_frames
from semhinet_tf.taxonomy import Taxonomy


def decode_manifest(manifest: Manifest, pre: Preprocess, progress: bool,
                     cache: FrameCache | None) -> tuple[np.ndarray, dict[str, int]]:
    """Decode every entry once (or read it from `cache`); failures join manifest.skipped.

    Returns the frames (in memory, or memory-mapped from the cache) and the row of each kept path."""
    files = [str(manifest.file(e.path)) for e in manifest.entries]
    if cache is None:
        frames, bad = decode_frames(files, pre, progress=progress, desc="decode")
    else:
        frames, bad = cache.frames(files, [e.sha256 for e in manifest.entries], pre, progress=progress)
    bad_reason = {Path(p).resolve(): r for p, r in bad}
    rows: dict[str, int] = {}
    kept = []
    for i, e in enumerate(manifest.entries):
        reason = bad_reason.get(manifest.file(e.path).resolve())
        if reason is None:
            rows[e.path] = i
            kept.append(e)
        else:
            manifest.skipped.append((e.path, reason))
    manifest.entries = kept
    return frames, rows


def _arrays(paths: list[str], frames: np.ndarray, rows: dict[str, int], leaf_of: dict[str, str],
            taxonomy: Taxonomy) -> tuple[FrameRows, np.ndarray]:
    paths = [p for p in paths if p in rows]
    x = FrameRows(frames, [rows[p] for p in paths])
    y = np.array([taxonomy.leaf_index(leaf_of[p]) for p in paths], dtype=np.int64)
    return x, y


def split_arrays(split: dict, frames, rows, manifest: Manifest, taxonomy: Taxonomy) -> tuple:
    """The (FrameRows, leaf ids) of the split's train and val sides, the leaf of each frame as the manifest says
    (a reviewed label already applied there by train --from)."""
    leaf_of = {e.path: e.leaf for e in manifest.entries}
    return (_arrays(split["train"], frames, rows, leaf_of, taxonomy),
            _arrays(split["val"], frames, rows, leaf_of, taxonomy))


def prepare_dataset(data_dir: str | Path, run_dir: str | Path, taxonomy: Taxonomy, cfg, strict: bool = False,
                    progress: bool = True, reuse_split: bool = False, cache: FrameCache | None = None) -> dict:
    """Discover, decode (or read `cache`), split (or reuse the saved split); write manifest, skipped list and
    split to run_dir. The splits are (FrameRows, leaf ids): rows of the decoded frames, not copies."""
    run_dir = Path(run_dir)
    pre = Preprocess(size=cfg.img_size, databar=cfg.databar, fit=cfg.fit)
    manifest = discover(data_dir, taxonomy, strict=strict, check_images=False, pre=pre, progress=progress)
    frames, rows = decode_manifest(manifest, pre, progress, cache)
    manifest.save(run_dir)
    print(f"data: {manifest.summary()}", flush=True)
    if manifest.skipped:
        print(f"  skipped {len(manifest.skipped)} file(s); reasons in {run_dir / SKIPPED_CSV}", flush=True)
    require_all_classes(manifest, taxonomy)
    if reuse_split and (run_dir / SPLIT).exists():
        split = load_split(run_dir)
    else:
        split = stratified_split(manifest, cfg.val_split, cfg.seed)
        save_split(split, run_dir)
    for w in split.get("warnings", []):
        print(f"  warning: {w}", flush=True)
    train, val = split_arrays(split, frames, rows, manifest, taxonomy)
    if not len(val[1]):
        raise DatasetError(f"{data_dir}: the validation split is empty (more images per class or a larger --val-split)")
    missing = [taxonomy.leaves[c] for c in range(len(taxonomy.leaves)) if c not in set(train[1].tolist())]
    if missing:
        raise DatasetError(f"no training images left for class(es) {', '.join(missing)} after the split")
    print(f"split: {len(train[1])} train / {len(val[1])} val images (seed {cfg.seed}, saved to split.json)", flush=True)
    return {"train": train, "val": val, "preprocess": pre.to_dict(), "manifest": manifest}


def load_split_frames(run_dir: str | Path, which: str = "train", progress: bool = True):
    """Decode one side of a run's saved split (e.g. calibration frames for conversion)."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / CONFIG).read_text())
    taxonomy = Taxonomy.from_spec(json.loads((run_dir / TAXONOMY).read_text()))
    split = load_split(run_dir)
    manifest = Manifest.load(run_dir)
    leaf_of = {e.path: e.leaf for e in manifest.entries}
    paths = [p for p in split[which] if p in leaf_of]
    pre = Preprocess.from_dict(config["preprocess"])
    frames, bad = decode_frames([str(Path(split["root"]) / p) for p in paths], pre, progress=progress, desc=which)
    if bad:
        bad_set = {b for b, _ in bad}
        keep = [str(Path(split["root"]) / p) not in bad_set for p in paths]
        frames = frames[np.array(keep)]
        paths = [p for p, k in zip(paths, keep, strict=True) if k]
    if not len(paths):
        raise DatasetError(f"{run_dir}: no readable images in the {which} split (was the data folder moved?)")
    return frames, np.array([taxonomy.leaf_index(leaf_of[p]) for p in paths], dtype=np.int64)


def eval_items(data_dir: str | Path, taxonomy: Taxonomy, run_dir: Path | None, split: str | None):
    """(absolute path, leaf) pairs to evaluate, the split used, and notes for the user.

    With a run directory whose split was made on this same folder, `val` (the default) is the held-out
    side; on any other folder (a separate test set) every image is used.
    """
    manifest = discover(data_dir, taxonomy, check_images=False, progress=False)
    notes = []
    if manifest.unknown_folders:
        known = ", ".join(taxonomy.leaves)
        if not manifest.entries:
            raise DatasetError(f"{data_dir}: no class folders of this model's taxonomy (found "
                               f"{', '.join(manifest.unknown_folders)}; expected folders named {known})")
        notes.append(f"folders that are not classes of this model were left out: {', '.join(manifest.unknown_folders)}")
    if not manifest.entries and not manifest.skipped:
        raise DatasetError(f"{data_dir}: no class folders with images in it (expected folders named "
                           f"{', '.join(taxonomy.leaves)}, one per class)")
    notes.extend(f"skipped {manifest.file(path)}: {reason}" for path, reason in manifest.skipped)
    saved = None
    if run_dir is not None and (run_dir / SPLIT).exists():
        saved = load_split(run_dir)
        if Path(saved["root"]).resolve() != Path(manifest.root).resolve():
            saved = None
    if split in (None, "all") or (saved is None and split is None):
        if split is None and saved is not None:
            split = "val"
        else:
            return [(manifest.file(e.path), e.leaf) for e in manifest.entries], "all", notes
    if saved is None:
        raise DatasetError(f"{data_dir}: no saved split of this folder for this model; use --split all")
    wanted = set(saved[split])
    corrected = reviewed_labels(run_dir)
    items = [(manifest.file(e.path), corrected.get(e.path, e.leaf)) for e in manifest.entries if e.path in wanted]
    changed = sum(e.path in wanted and corrected.get(e.path, e.leaf) != e.leaf for e in manifest.entries)
    if changed:
        notes.append(f"{changed} frame(s) scored against their reviewed label, not their folder's (the run's "
                     f"manifest records both)")
    return items, split, notes


def reviewed_labels(run_dir: str | Path | None) -> dict[str, str]:
    """{path in the data folder: reviewed leaf} for the frames of a run's data folder whose folder label a review
    corrected (`train --from --labels`; the manifest keeps `leaf` and `folder_leaf`). Empty for any other run."""
    if run_dir is None:
        return {}
    try:
        manifest = Manifest.load(Path(run_dir))
    except (OSError, ValueError, KeyError):
        return {}
    return {e.path: e.leaf for e in manifest.entries
            if e.folder_leaf and e.leaf != e.folder_leaf and not Path(e.path).is_absolute()}
