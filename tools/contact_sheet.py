"""Contact sheet of an image data set: one row per class, N thumbnails each, so a person can eyeball it.

Reads any folder laid out as class folders (case/separator-insensitive names and aliases, matched by
the taxonomy), possibly nested (train/bridge/lot01/...), in any format Pillow reads; 16-bit and 12-bit
frames are scaled to 8 bits, colour frames converted to grey.

A data set written by `semhinet synth` (generator 1.1 or later: its dataset.json scores every defect frame's
visibility, 1 being the label rule's threshold) gets one more row, `borderline`: on the left the defect draws
just below the rule (those a `--labels visible` set turned down, rendered again from their seed; in a
`--labels cause` set the written frames below it), on the right the written frames just above it. Each
thumbnail is captioned with its class and score, so the rule can be judged by eye.

    python tools/contact_sheet.py DATA OUT.png [--per-class N] [--size PX] [--no-borderline]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semhinet_tf.taxonomy import Taxonomy  # noqa: E402

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
BACKGROUND = 24
TEXT = 235

__all__ = ["find_class_images", "read_grey", "borderline_frames", "make_contact_sheet", "main"]


def find_class_images(data_dir: str | os.PathLike, taxonomy: Taxonomy | None = None) -> dict[str, list[Path]]:
    """Image files per leaf: every folder whose name matches a leaf, at any depth, with all files below it."""
    tax = taxonomy or Taxonomy.default()
    root = Path(data_dir)
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        keep = []
        for name in dirnames:
            leaf = tax.match_folder(name)
            if leaf is None:
                keep.append(name)
            else:
                found.setdefault(leaf, []).extend(_images_below(Path(dirpath) / name))
        dirnames[:] = keep  # do not look for class folders inside a class folder
    return {leaf: sorted(found[leaf]) for leaf in tax.leaves if leaf in found}


def _images_below(folder: Path) -> list[Path]:
    out = []
    for dirpath, _, files in os.walk(folder):
        out += [Path(dirpath) / f for f in files
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return out


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """Any image Pillow reads -> uint8 grey; 16-bit data is scaled by its bit depth (12 or 16 bits)."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I") or im.mode == "F":
            arr = np.asarray(im).astype(np.float64)
            top = float(arr.max()) if arr.size else 0.0
            full = 65535.0 if top > 4095 else (4095.0 if top > 255 else 255.0)
            return np.clip(arr * (255.0 / full) + 0.5, 0, 255).astype(np.uint8)
        if im.mode != "L":
            im = im.convert("L")
        return np.asarray(im, np.uint8)


def _thumbnail(path: Path | np.ndarray, size: int) -> Image.Image:
    """Letterboxed thumbnail (aspect kept) of a file or a grey array; an unreadable file becomes a labelled
    placeholder."""
    tile = Image.new("L", (size, size), BACKGROUND + 16)
    try:
        im = Image.fromarray(path if isinstance(path, np.ndarray) else read_grey(path))
    except (OSError, ValueError):
        draw = ImageDraw.Draw(tile)
        draw.line([0, 0, size, size], fill=TEXT)
        draw.line([0, size, size, 0], fill=TEXT)
        draw.text((4, 4), "unreadable", fill=TEXT, font=_font(max(9, size // 10)))
        return tile
    im.thumbnail((size, size), Image.BILINEAR)
    tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return tile


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _pick(files: list[Path], n: int) -> list[Path]:
    """n files spread evenly over the sorted list (the first n would often show one lot only)."""
    if len(files) <= n:
        return files
    return [files[int(i)] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def _closest(records: list[dict], n: int) -> list[dict]:
    """The n records whose score is closest to the rule's 1, taking each class in turn (variety over ties)."""
    ranked = sorted(records, key=lambda r: abs(r["visibility"] - 1.0))
    picked: list[dict] = []
    used: set[str] = set()
    while ranked and len(picked) < n:
        if {r["class"] for r in ranked} <= used:  # every class left has had its turn: a new round
            used = set()
        nxt = next(r for r in ranked if r["class"] not in used)
        picked.append(nxt)
        used.add(nxt["class"])
        ranked.remove(nxt)
    return picked


def borderline_frames(data_dir: str | os.PathLike, n: int) -> list[tuple[str, np.ndarray | Path, float]]:
    """Up to n (class, image, visibility score) just below the label rule, then up to n just above it, from a
    synth data set's dataset.json; [] for any other folder (no scores to sort by)."""
    root = Path(data_dir)
    try:
        meta = json.loads((root / "dataset.json").read_text())
        frames = [r for r in meta.get("frames", []) if isinstance(r, dict) and "visibility" in r]
        rule = meta["label_rule"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not frames:
        return []
    above = [(r["class"], root / r["path"], r["visibility"]) for r in _closest(
        [r for r in frames if r["visibility"] >= 1.0], n)]
    written_below = [r for r in frames if r["visibility"] < 1.0]
    if rule.get("labels") == "cause":  # the frames below the rule are on disk
        below = [(r["class"], root / r["path"], r["visibility"]) for r in _closest(written_below, n)]
    else:  # a visible set: render the draws it turned down again, from their seed
        from semhinet_tf.data import synth

        turned_down = [{**r["rejected"], "class": r["class"], "index": r["index"], "scenes": r["scenes"]}
                       for r in frames if "rejected" in r]
        below = []
        for r in _closest(turned_down, n):
            f = synth.render_frame(r["class"], meta["seed"], r["index"], meta["size"], meta["difficulty"],
                                   labels=rule["labels"], visibility_size=rule["visibility_size"], draw=r["draw"],
                                   scene=r["scenes"])
            below.append((r["class"], f.image, float(f.visibility)))
    return sorted(below, key=lambda b: b[2]) + sorted(above, key=lambda a: a[2])


def _caption(tile: Image.Image, text: str, px: int) -> None:
    """White text on a dark strip along the tile's bottom edge."""
    draw = ImageDraw.Draw(tile)
    font = _font(px)
    h = px + 4
    draw.rectangle([0, tile.height - h, tile.width, tile.height], fill=BACKGROUND)
    draw.text((2, tile.height - h + 1), text, fill=TEXT, font=font)


def make_contact_sheet(data_dir: str | os.PathLike, out_png: str | os.PathLike, per_class: int = 6,
                       thumb: int = 128, taxonomy: Taxonomy | None = None, borderline: bool = True) -> Path:
    """Write a labelled grid (rows = classes found in `data_dir`, `per_class` thumbnails each) to `out_png`;
    with `borderline`, a synth data set's frames just below and just above its label rule in one more row."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    if per_class < 1 or thumb < 16:
        raise ValueError(f"per_class must be >= 1 and thumb >= 16 (got {per_class}, {thumb})")
    classes = find_class_images(root, taxonomy)
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected folders named after the classes, "
                         f"e.g. {', '.join((taxonomy or Taxonomy.default()).leaves)})")
    edge = borderline_frames(root, max(1, per_class // 2)) if borderline else []
    gap, label_w, title_h = max(2, thumb // 32), max(110, int(thumb * 1.1)), max(22, thumb // 5)
    width = label_w + max(per_class, len(edge)) * (thumb + gap) + gap
    height = title_h + (len(classes) + bool(edge)) * (thumb + gap) + gap
    sheet = Image.new("L", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    total = sum(len(v) for v in classes.values())
    draw.text((gap * 2, title_h // 5), f"{root.name or root}  ({total} images)", fill=TEXT,
              font=_font(max(11, title_h * 3 // 5)))
    label_font, small_font = _font(max(11, thumb // 8)), _font(max(9, thumb // 11))
    for row, (leaf, files) in enumerate(classes.items()):
        y = title_h + row * (thumb + gap) + gap
        draw.text((gap * 2, y + thumb // 3), leaf, fill=TEXT, font=label_font)
        draw.text((gap * 2, y + thumb // 3 + thumb // 6), f"{len(files)} images", fill=TEXT - 70, font=small_font)
        for col, path in enumerate(_pick(files, per_class)):
            sheet.paste(_thumbnail(path, thumb), (label_w + col * (thumb + gap), y))
    if edge:
        y = title_h + len(classes) * (thumb + gap) + gap
        below = sum(1 for *_, v in edge if v < 1.0)
        draw.text((gap * 2, y + thumb // 3), "borderline", fill=TEXT, font=label_font)
        draw.text((gap * 2, y + thumb // 3 + thumb // 6), f"{below} below, {len(edge) - below} above",
                  fill=TEXT - 70, font=small_font)
        for col, (leaf, image, score) in enumerate(edge):
            tile = _thumbnail(image, thumb)
            _caption(tile, f"{leaf} {score:.2f}", max(9, thumb // 11))
            sheet.paste(tile, (label_w + col * (thumb + gap), y))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="contact_sheet.py", description=__doc__.splitlines()[0])
    parser.add_argument("data", help="data folder (class folders, possibly nested)")
    parser.add_argument("out", help="output PNG")
    parser.add_argument("--per-class", type=int, default=6, help="thumbnails per class (default 6)")
    parser.add_argument("--size", type=int, default=128, help="thumbnail size in px (default 128)")
    parser.add_argument("--no-borderline", action="store_true",
                        help="leave out the row of synth frames just below and above the label rule")
    args = parser.parse_args(argv)
    try:
        out = make_contact_sheet(args.data, args.out, per_class=args.per_class, thumb=args.size,
                                 borderline=not args.no_borderline)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"contact_sheet.py: error: {exc}\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
