"""Dataset discovery, manifest files, the train/val split and the all-classes check."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
from semhinet_tf.taxonomy import Taxonomy

TAX = Taxonomy.default()


def img(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    """A small distinct PNG (width, height = size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A messy but realistic data folder."""
    r = tmp_path / "data"
    img(r / "Bridge" / "lot1" / "wafer2" / "b1.png", 1, (50, 30))   # nested below a class folder
    img(r / "Bridge" / "b2.tif", 2)
    img(r / "2024" / "lotA" / "bridge" / "b3.png", 3)                # container folders above one
    img(r / "Inc-Etch" / "i1.png", 4)                               # case and separator variants
    img(r / "IncEtch" / "i2.PNG", 5)
    img(r / "LER" / "l1.bmp", 6)
    img(r / "good" / "n1.png", 7)                                   # alias of normal
    img(r / "bogus" / "g1.jpg", 8)
    img(r / "cmp" / "c1.gif", 9)
    (r / "crack").mkdir()                                           # empty class folder
    (r / "crack" / "readme.txt").write_text("no images yet")
    img(r / "misc" / "m1.png", 10)                                  # unknown folder
    img(r / "misc" / "old" / "m2.png", 11)
    img(r / "loose.png", 12)                                        # directly in the root
    (r / "open").mkdir()
    (r / "open" / "broken.png").write_text("not an image")          # bad file with an image name
    (r / "open" / "empty.png").write_bytes(b"")
    dup = img(r / "open" / "o1.png", 13)
    (r / "open" / "sub").mkdir()
    (r / "open" / "sub" / "o1_copy.png").write_bytes(dup.read_bytes())  # exact duplicate
    img(r / "open" / "o2.png", 14)
    (r / "open" / "notes.txt").write_text("not an image name: listed, not read")
    (r / "open" / "o3.webp").write_bytes(b"RIFF")                   # a format the loader does not read
    (r / "open" / ".DS_Store").write_bytes(b"")                     # hidden: not listed
    (r / ".hidden").mkdir()
    img(r / ".hidden" / "h.png", 15)
    return r


def by_path(manifest: Manifest) -> dict:
    return {e.path: e for e in manifest.entries}


# ---------------------------------------------------------------------------------------------- discovery
def test_discover_maps_nested_and_case_variant_folders(tree):
    m = discover(tree, TAX, progress=False)
    got = {p: e.leaf for p, e in by_path(m).items()}
    assert got == {
        "2024/lotA/bridge/b3.png": "bridge", "Bridge/b2.tif": "bridge", "Bridge/lot1/wafer2/b1.png": "bridge",
        "IncEtch/i2.PNG": "inc_etch", "Inc-Etch/i1.png": "inc_etch", "LER/l1.bmp": "ler", "bogus/g1.jpg": "bogus",
        "cmp/c1.gif": "cmp", "good/n1.png": "normal", "open/o1.png": "open", "open/o2.png": "open",
        "open/sub/o1_copy.png": "open",
    }
    assert [e.path for e in m.entries] == sorted(got)  # deterministic order


def test_entry_fields(tree):
    e = by_path(discover(tree, TAX, progress=False))["Bridge/lot1/wafer2/b1.png"]
    assert (e.width, e.height) == (50, 30)
    assert e.sha256 == hashlib.sha256((tree / e.path).read_bytes()).hexdigest()
    assert e.labels == TAX.leaf_targets("bridge") == {"h1": 2, "h2": 0, "h3": 0, "h4": -1, "h5": -1}


def test_unknown_folders_and_loose_images_are_reported(tree):
    m = discover(tree, TAX, progress=False)
    assert m.unknown_folders == ["misc"]  # misc/old is inside misc
    ignored = dict(m.ignored)
    assert set(ignored) == {"loose.png", "misc/m1.png", "misc/old/m2.png"}
    assert "directly in the data root" in ignored["loose.png"]


def test_strict_refuses_unknown_folders(tree):
    with pytest.raises(DatasetError, match="folders that are not classes: misc"):
        discover(tree, TAX, strict=True, progress=False)


def test_strict_refuses_loose_images(tree, tmp_path):
    import shutil

    shutil.rmtree(tree / "misc")
    with pytest.raises(DatasetError, match="directly in the data root, e.g. loose.png"):
        discover(tree, TAX, strict=True, progress=False)


def test_strict_refuses_unreadable_images(tree):
    import shutil

    shutil.rmtree(tree / "misc")
    (tree / "loose.png").unlink()
    with pytest.raises(DatasetError, match="2 unreadable image"):
        discover(tree, TAX, strict=True, progress=False)


def test_empty_class_folder_reported(tree):
    assert discover(tree, TAX, progress=False).empty_classes == ["crack"]


def test_files_with_other_suffixes_in_class_folders_are_listed(tree):
    m = discover(tree, TAX, progress=False)
    assert m.not_images == ["crack/readme.txt", "open/notes.txt", "open/o3.webp"]
    assert "3 file(s) in class folders not read" in m.summary() and "crack/readme.txt" in m.summary()


def test_bad_files_skipped_with_reason(tree):
    skipped = dict(discover(tree, TAX, progress=False).skipped)
    assert set(skipped) == {"open/broken.png", "open/empty.png"}
    assert "not an image" in skipped["open/broken.png"]
    assert "empty file" in skipped["open/empty.png"]


def test_full_check_catches_what_headers_miss(tmp_path):
    good = img(tmp_path / "d" / "open" / "a.png", 1, (200, 200))
    data = good.read_bytes()
    (tmp_path / "d" / "open" / "cut.png").write_bytes(data[: len(data) // 2])
    fast = discover(tmp_path / "d", TAX, check_images=False, progress=False)
    full = discover(tmp_path / "d", TAX, check_images=True, progress=False)
    assert len(fast.entries) == 2 and not fast.skipped
    assert [p for p, _ in full.skipped] == ["open/cut.png"] and "truncated" in full.skipped[0][1]


def test_check_uses_the_preprocess_rules_and_the_host_limit(tmp_path):
    from semhinet_tf.data import decode

    img(tmp_path / "d" / "open" / "a.png", 1, (200, 60))
    ok = discover(tmp_path / "d", TAX, progress=False)
    before = decode.host_max_pixels()
    decode.set_max_pixels(10_000)
    try:
        refused = discover(tmp_path / "d", TAX, progress=False)
    finally:
        decode.set_max_pixels(before)
    assert len(ok.entries) == 1 and ok.preprocess == Preprocess().to_dict()
    assert "above the limit" in refused.skipped[0][1]


def test_duplicates_detected(tree):
    m = discover(tree, TAX, progress=False)
    assert m.duplicate_groups == [["open/o1.png", "open/sub/o1_copy.png"]]
    assert m.conflicting_duplicates == []


def test_process_pool_gives_the_same_manifest(tree):
    one = discover(tree, TAX, progress=False, workers=1)
    two = discover(tree, TAX, progress=False, workers=2)
    assert one == two


def test_summary_line(tree):
    s = discover(tree, TAX, progress=False).summary()
    assert s.startswith("12 images in 7 classes; 2 skipped (see skipped.csv); 1 duplicate group;")
    assert "unknown folders: misc" in s and "empty class folders: crack" in s and "\n" not in s


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        discover(tmp_path / "nowhere", TAX, progress=False)


# ---------------------------------------------------------------------------------------------- files
def test_save_and_load_roundtrip(tree, tmp_path):
    m = discover(tree, TAX, progress=False)
    run = tmp_path / "run"
    m.save(run)
    assert sorted(p.name for p in run.iterdir()) == ["manifest.csv", "manifest.json", "skipped.csv"]
    with open(run / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["path"] == "LER/l1.bmp")
    assert row["labels"] == "h1:2;h2:2;h3:-1;h4:-1;h5:0" and row["leaf"] == "ler"
    assert Manifest.load(run) == m


def test_load_missing_manifest(tmp_path):
    with pytest.raises(DatasetError, match="manifest.json: not found"):
        Manifest.load(tmp_path)


# ---------------------------------------------------------------------------------------------- split
def make_manifest(tmp_path: Path, per_class: dict[str, int], dup_of: dict[str, int] | None = None) -> Manifest:
    """Manifest with per_class images per leaf; dup_of[leaf] extra byte copies of that leaf's first image."""
    seed = 0
    for leaf, n in per_class.items():
        for k in range(n):
            seed += 1
            first = img(tmp_path / "d" / leaf / f"{k:03d}.png", seed, (16, 16))
            if k == 0:
                for c in range((dup_of or {}).get(leaf, 0)):
                    (tmp_path / "d" / leaf / f"copy{c}.png").write_bytes(first.read_bytes())
    return discover(tmp_path / "d", TAX, check_images=False, progress=False)


def test_split_is_stratified(tmp_path):
    m = make_manifest(tmp_path, {"bridge": 20, "open": 10, "ler": 5})
    s = stratified_split(m, val_fraction=0.2, seed=0)
    assert s["counts"] == {"bridge": {"train": 16, "val": 4}, "ler": {"train": 4, "val": 1},
                           "open": {"train": 8, "val": 2}}
    assert not set(s["train"]) & set(s["val"])
    assert sorted(s["train"] + s["val"]) == sorted(e.path for e in m.entries)
    assert s["root"] == m.root and not s["warnings"]


def test_split_deterministic_per_seed(tmp_path):
    m = make_manifest(tmp_path, {"bridge": 30, "open": 30})
    assert stratified_split(m, seed=1) == stratified_split(m, seed=1)
    assert stratified_split(m, seed=1)["val"] != stratified_split(m, seed=2)["val"]


def test_duplicates_land_on_one_side(tmp_path):
    m = make_manifest(tmp_path, {"bridge": 6, "open": 6}, dup_of={"bridge": 3, "open": 2})
    for seed in range(20):
        s = stratified_split(m, val_fraction=0.3, seed=seed)
        for group in m.duplicate_groups:
            sides = {"val" if p in s["val"] else "train" for p in group}
            assert len(sides) == 1, (seed, group)


def test_duplicates_count_once_toward_the_share(tmp_path):
    m = make_manifest(tmp_path, {"bridge": 10}, dup_of={"bridge": 5})  # 15 files, 10 distinct images
    for seed in range(5):
        s = stratified_split(m, val_fraction=0.2, seed=seed)
        val_groups = {e.sha256 for e in m.select(s["val"])}
        assert len(val_groups) == 2, seed  # 20% of the distinct images, whichever groups were drawn
        assert s["counts"]["bridge"]["val"] == (7 if "bridge/000.png" in s["val"] else 2)


def test_split_ignores_the_order_files_were_found_in(tmp_path):
    import dataclasses

    m = make_manifest(tmp_path, {"bridge": 12, "open": 9}, dup_of={"open": 2})
    shuffled = dataclasses.replace(m, entries=list(reversed(m.entries)))
    assert stratified_split(shuffled, val_fraction=0.3, seed=4) == stratified_split(m, val_fraction=0.3, seed=4)


def test_small_class_stays_in_training_with_warning(tmp_path):
    m = make_manifest(tmp_path, {"bridge": 10, "crack": 1}, dup_of={"crack": 2})
    s = stratified_split(m, val_fraction=0.2, seed=0, min_per_class=2)
    assert s["counts"]["crack"] == {"train": 3, "val": 0}  # three copies of one image cannot be split
    assert len(s["warnings"]) == 1 and "class crack has only 1 distinct image" in s["warnings"][0]


def test_two_images_split_one_each(tmp_path):
    s = stratified_split(make_manifest(tmp_path, {"cmp": 2}), val_fraction=0.2)
    assert s["counts"]["cmp"] == {"train": 1, "val": 1}


def test_conflicting_duplicates_warned(tmp_path):
    m = make_manifest(tmp_path, {"bridge": 4, "open": 4})
    (tmp_path / "d" / "open" / "same.png").write_bytes((tmp_path / "d" / "bridge" / "000.png").read_bytes())
    m = discover(tmp_path / "d", TAX, check_images=False, progress=False)
    assert m.conflicting_duplicates == [["bridge/000.png", "open/same.png"]]
    s = stratified_split(m)
    assert any("different classes (bridge, open)" in w for w in s["warnings"])


def test_split_save_and_load(tmp_path):
    m = make_manifest(tmp_path, {"bridge": 10, "open": 10})
    s = stratified_split(m, val_fraction=0.25, seed=7)
    path = save_split(s, tmp_path / "run")
    assert path.name == "split.json"
    back = load_split(tmp_path / "run")
    assert back == s and back["seed"] == 7 and back["val_fraction"] == 0.25
    assert all(not Path(p).is_absolute() for p in back["train"] + back["val"])
    assert all((Path(back["root"]) / p).is_file() for p in back["val"])
    assert [e.path for e in m.select(back["val"])] == back["val"]


def test_bad_split_arguments(tmp_path):
    m = make_manifest(tmp_path, {"bridge": 3})
    with pytest.raises(DatasetError, match="val_fraction"):
        stratified_split(m, val_fraction=1.0)
    with pytest.raises(DatasetError, match="min_per_class"):
        stratified_split(m, min_per_class=1)


# ---------------------------------------------------------------------------------------------- classes
def test_require_all_classes_names_the_empty_ones(tree):
    m = discover(tree, TAX, progress=False)
    with pytest.raises(DatasetError) as info:
        require_all_classes(m, TAX)
    msg = str(info.value)
    assert msg.startswith("no usable images for class crack under ")
    assert "2 unreadable file(s) listed in skipped.csv" in msg and "\n" not in msg


def test_require_all_classes_passes_when_complete(tmp_path):
    m = make_manifest(tmp_path, {leaf: 1 for leaf in TAX.leaves})
    require_all_classes(m, TAX)
