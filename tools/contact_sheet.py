"""Contact sheet of an image data set: one row per class, N thumbnails each, so a person can eyeball it.

Reads any folder laid out as class folders (case/separator-insensitive names and aliases, matched by
the taxonomy), possibly nested (train/bridge/lot01/...), in any format Pillow reads; 16-bit and 12-bit
frames are scaled to 8 bits, colour frames converted to grey.

    python tools/contact_sheet.py DATA OUT.png [--per-class N] [--size PX]
"""

from __future__ import annotations

import argparse
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

__all__ = ["find_class_images", "read_grey", "make_contact_sheet", "main"]


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


def _thumbnail(path: Path, size: int) -> Image.Image:
    """Letterboxed thumbnail (aspect kept); an unreadable file becomes a labelled placeholder."""
    tile = Image.new("L", (size, size), BACKGROUND + 16)
    try:
        im = Image.fromarray(read_grey(path))
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


def make_contact_sheet(data_dir: str | os.PathLike, out_png: str | os.PathLike, per_class: int = 6,
                       thumb: int = 128, taxonomy: Taxonomy | None = None) -> Path:
    """Write a labelled grid (rows = classes found in `data_dir`, `per_class` thumbnails each) to `out_png`."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    if per_class < 1 or thumb < 16:
        raise ValueError(f"per_class must be >= 1 and thumb >= 16 (got {per_class}, {thumb})")
    classes = find_class_images(root, taxonomy)
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected folders named after the classes, "
                         f"e.g. {', '.join((taxonomy or Taxonomy.default()).leaves)})")
    gap, label_w, title_h = max(2, thumb // 32), max(110, int(thumb * 1.1)), max(22, thumb // 5)
    width = label_w + per_class * (thumb + gap) + gap
    height = title_h + len(classes) * (thumb + gap) + gap
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
    args = parser.parse_args(argv)
    try:
        out = make_contact_sheet(args.data, args.out, per_class=args.per_class, thumb=args.size)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"contact_sheet.py: error: {exc}\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
