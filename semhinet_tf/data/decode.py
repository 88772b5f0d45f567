"""Turn one image file into the model's input frame: the single decoder for training, eval and the board.

numpy + Pillow only (tifffile is an optional fallback for TIFFs Pillow cannot read), so the board runtime
imports this very module and sees exactly the pixels the model was trained on.

    load_frame(path, pre) = read_grey -> remove_databar -> to_uint8 -> resize_square

Rules, chosen once and recorded in the model metadata through `Preprocess`:

* Grey: colour is reduced with the ITU-R 601-2 luma weights Pillow uses for mode "L",
  L = (19595 R + 38470 G + 7471 B + 32768) >> 16, computed in numpy so 16-bit colour stays exact and
  8-bit colour gives bit-for-bit Pillow "L". Alpha is ignored (SEM tools write opaque images).
  EXIF orientation is not applied (SEM tools do not write it; applying it would make formats disagree).
* Bit depth ("minmax", the default): data that fit in 8 bits (integers 0..255) are kept as they are;
  anything else is stretched linearly from the image's own min..max to 0..255. Why: 16-bit SEM frames
  rarely fill their container and their offset/gain change with tool and session, while the 8-bit exports
  the model mostly sees are already display-stretched; stretching makes both look alike. The alternative
  "bitdepth" keeps absolute brightness: it divides by the effective container depth (max value rounded up
  to 10, 12, 14 or 16 bits, e.g. max 3000 -> 12-bit -> x * 255 / 4095); use it when brightness itself
  matters and all frames come from the same detector settings.
* Data bar: removed *before* the bit-depth rule, so a white caption cannot squash the stretch.
* Size: checked from the header before decoding, refused above the *host's* pixel limit
  (`set_max_pixels`, default 100 Mpx; `semhinet --max-pixels`, board `--max-pixels`). Why the host's:
  memory is the machine's to budget, so a model file or run config never sets it (an old file's
  preprocess `max_pixels` is read and ignored). Pillow's decompression-bomb bound
  `Image.MAX_IMAGE_PIXELS` is set to the same limit before every read, never above it, never removed.
* Memory: decoding peaks at a small multiple of the image's 8-bit size: 8-bit colour goes through
  Pillow's own "L" conversion (the same formula) with the colour buffer released before the array is
  made; wider colour and the bit-depth rule work in row blocks, never on full-size 64-bit copies.
* Resize: `Image.fromarray(a).resize((S, S), Image.BILINEAR)` (reducing_gap left at its default None).
  Pillow's resize is convolution based and widens the bilinear (triangle) kernel by the scale factor when
  downsampling, i.e. it antialiases and averages SEM shot noise instead of aliasing it; no ringing at
  edges, unlike LANCZOS/BICUBIC.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
DATASET_RECORD = "dataset.json"  # synth's record of a data folder's frames (labels, severity, pattern); eval reads it
MIN_SIDE = 8  # smaller images are refused: nothing to classify, and the resize would invent the pixels
DEFAULT_IMG_SIZE = 160  # the model's input side unless told otherwise: the one default for train, model, decoder
DEFAULT_MAX_PIXELS = 100_000_000  # the host's default limit; a 100 Mpx 8-bit frame is 100 MB
BLOCK_PIXELS = 1 << 20  # elements per block in the row-block loops (a few MB of temporaries)
_COPY_BLOCK = 1 << 21  # pixels per block when copying out of Pillow (bigger: each block costs a crop)
BIT_DEPTH_RULES = ("minmax", "bitdepth")
FITS = ("crop", "pad")

_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR
_LUMA = (19595, 38470, 7471)  # ITU-R 601-2 weights in 16.16 fixed point, as Pillow's "L" conversion
_PILLOW_LUMA_MODES = frozenset({"RGB", "RGBA", "RGBX"})  # 8-bit modes whose "L" conversion is exactly `luma`
_max_pixels = DEFAULT_MAX_PIXELS  # the process-wide host limit (set_max_pixels)

# Images between the limit and twice it make Pillow warn before our header check refuses them with a
# clear reason; the warning would only repeat that reason in a less readable form.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """A file that cannot become a frame; str() is one line '<path>: <reason>'."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across process pools despite the two-argument constructor
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a frame; stored in the model metadata so every consumer decodes alike.

    databar: "auto" (detect, conservative), "off", or a fixed number of bottom rows to drop.
    fit: "crop" (centre square) or "pad" (pad to square with the image median).
    bit_depth_rule: "minmax" (default, see module doc) or "bitdepth".
    """

    size: int = DEFAULT_IMG_SIZE
    databar: str | int = "auto"
    fit: str = "crop"
    bit_depth_rule: str = "minmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "databar", _parse_databar(self.databar))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < MIN_SIDE:
            raise ValueError(f"preprocess size must be an integer >= {MIN_SIDE}, got {self.size!r}")
        if self.fit not in FITS:
            raise ValueError(f"preprocess fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.bit_depth_rule not in BIT_DEPTH_RULES:
            raise ValueError(f"bit_depth_rule must be one of {', '.join(BIT_DEPTH_RULES)}, "
                             f"got {self.bit_depth_rule!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Preprocess:
        """Missing keys take defaults (older metadata); unknown keys are an error (a newer decoder).

        `max_pixels`, written by older versions, is read and ignored: the pixel limit is the host's."""
        d = dict(d or {})
        d.pop("max_pixels", None)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown preprocess settings {', '.join(unknown)} (written by a newer version?)")
        return cls(**d)


def _parse_databar(value: str | int) -> str | int:
    """'auto' | 'off' | rows >= 0; accepts '12' from a CLI or JSON; 0 means 'off'."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "off"):
            return v
        if v.isdigit():
            value = int(v)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"databar must be 'auto', 'off' or a number of rows >= 0, got {value!r}")
    return "off" if value == 0 else int(value)


# ---------------------------------------------------------------------------------------------- host limit
def set_max_pixels(limit: int) -> None:
    """Set this process's pixel limit (width x height) for every decode; the host decides, never a model."""
    global _max_pixels
    _max_pixels = _positive_limit(limit)
    Image.MAX_IMAGE_PIXELS = _max_pixels  # Pillow's bomb bound follows the host's


def host_max_pixels() -> int:
    """This process's pixel limit (DEFAULT_MAX_PIXELS unless `set_max_pixels` changed it)."""
    return _max_pixels


def _positive_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {limit!r}")
    return int(limit)


def _limit(max_pixels: int | None) -> int:
    """The limit for one read: the caller's (host code) or the process-wide one; Pillow's bound follows it.

    The callers put Pillow's bound back to the process-wide limit afterwards (`_restore_pillow_bound`), so a
    one-call limit never leaks into later reads.
    """
    limit = _max_pixels if max_pixels is None else _positive_limit(max_pixels)
    Image.MAX_IMAGE_PIXELS = limit  # never removed
    return limit


def _restore_pillow_bound() -> None:
    Image.MAX_IMAGE_PIXELS = _max_pixels


# ---------------------------------------------------------------------------------------------- reading
def read_grey(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Decode the first frame/page of an image into a 2-D grey array.

    uint8 for 8-bit data, uint16 for 16-bit data, int32/float32 for the rare 32-bit TIFFs (possibly a
    read-only array); the size is checked from the header before any pixel is decoded, so a huge file
    cannot exhaust memory. `max_pixels`: the host's limit for this call (default: `host_max_pixels()`).
    """
    try:
        return _read_grey(Path(path), max_pixels)
    finally:
        _restore_pillow_bound()


def _read_grey(path: Path, max_pixels: int | None) -> np.ndarray:
    _check_file(path)
    max_pixels = _limit(max_pixels)
    try:
        with Image.open(path) as im:
            _check_size(path, im.size, max_pixels)
            arr = _pillow_grey(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large ({_one_line(exc)}); limit is --max-pixels {max_pixels}") from exc
    except MemoryError as exc:
        raise ImageError(path, "out of memory while decoding") from exc
    except Exception as exc:  # a decoder can fail in many ways on a bad file; each becomes one line
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise ImageError(path, _describe(exc)) from exc
        arr = _tifffile_grey(path, max_pixels, exc)
    if arr.ndim != 2:
        raise ImageError(path, f"unsupported image layout with shape {arr.shape}")
    return arr


def image_size(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the header only, with the same checks as `read_grey` except the decode."""
    try:
        return _image_size(Path(path), max_pixels)
    finally:
        _restore_pillow_bound()


def _image_size(path: Path, max_pixels: int | None) -> tuple[int, int]:
    _check_file(path)
    max_pixels = _limit(max_pixels)
    try:
        with Image.open(path) as im:
            size = im.size
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large ({_one_line(exc)}); limit is --max-pixels {max_pixels}") from exc
    except Exception as exc:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise ImageError(path, _describe(exc)) from exc
        size = _tifffile_size(path, exc)
    _check_size(path, size, max_pixels)
    return int(size[0]), int(size[1])


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read file ({exc.strerror})") from None
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")


def _check_size(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    w, h = int(size[0]), int(size[1])
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageError(path, f"image is {w}x{h} px, smaller than the minimum of {MIN_SIDE} px a side")
    if w * h > max_pixels:
        raise ImageError(path, f"image is {w}x{h} px ({_amount(w * h)}), above the limit of {_amount(max_pixels)} "
                               f"(the host's --max-pixels)")


def _amount(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx" if pixels >= 100_000 else f"{pixels} px"


def _pillow_grey(im: Image.Image) -> np.ndarray:
    """Pixels of an opened Pillow image as a 2-D grey array, keeping 16/32-bit data wide.

    Colour is reduced inside Pillow (its "L" conversion is `luma` for 8-bit data) and the colour buffer is
    closed before the array is made, so the peak stays near the colour image's own size."""
    im.load()
    mode = im.mode
    if mode == "1":
        return _pillow_array(im).astype(np.uint8) * np.uint8(255)
    if mode == "L":
        return _pillow_array(im)
    if mode.startswith("I;16"):
        return _pillow_array(im).astype(np.uint16, copy=False)
    if mode == "I":
        a = _pillow_array(im).astype(np.int32, copy=False)
        return a.astype(np.uint16) if a.size and a.min() >= 0 and a.max() <= 65535 else a
    if mode == "F":
        return _pillow_array(im).astype(np.float32, copy=False)
    if mode in ("LA", "La"):
        return _pillow_array(im.getchannel(0))
    if mode == "RGBa":
        return luma(_pillow_array(im)[..., :3])
    if mode in _PILLOW_LUMA_MODES:
        return _pillow_luma(im)
    rgb = im.convert("RGB")  # P, PA, CMYK, YCbCr, LAB, HSV ...
    im.close()
    return _pillow_luma(rgb)


def _pillow_luma(im: Image.Image) -> np.ndarray:
    """8-bit colour -> grey via Pillow's "L" (bit-identical to `luma`); the colour image is closed first."""
    grey = im.convert("L")
    im.close()
    try:
        return _pillow_array(grey)
    finally:
        grey.close()


def _pillow_array(im: Image.Image) -> np.ndarray:
    """np.asarray(im), copied in row blocks: numpy's whole-image path goes through Pillow's tobytes(),
    which holds the pixels twice more (chunks, then the joined bytes) on top of the image itself."""
    w, h = im.size
    step = max(1, _COPY_BLOCK // max(1, w))
    if h <= step:
        return np.asarray(im)
    first = np.asarray(im.crop((0, 0, w, step)))
    out = np.empty((h, *first.shape[1:]), dtype=first.dtype)
    out[:step] = first
    for top in range(step, h, step):
        out[top:top + step] = np.asarray(im.crop((0, top, w, min(h, top + step))))
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of an (..., 3) array in the array's own bit depth (Pillow "L" for uint8).

    Row blocks in 32-bit integers for 8/16-bit data (the weights sum to 2**16, so 65535 * 2**16 + 2**15
    still fits), never a full-size 64-bit copy of the image."""
    rgb = np.asarray(rgb)
    if rgb.dtype.kind == "f":
        out_dtype = np.dtype(np.float32)
    else:
        out_dtype = np.dtype(np.uint8 if rgb.dtype.itemsize == 1 else np.uint16)
    out = np.empty(rgb.shape[:-1], dtype=out_dtype)
    for rows in _row_blocks(out):
        out[rows] = _luma_block(rgb[rows])
    return out


def _luma_block(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype.kind == "f":
        return rgb[..., :3].astype(np.float64) @ (np.array(_LUMA) / 65536.0)
    wide = np.uint32 if rgb.dtype.kind == "u" and rgb.dtype.itemsize <= 2 else np.uint64
    c = rgb[..., :3].astype(wide)
    return (c[..., 0] * wide(_LUMA[0]) + c[..., 1] * wide(_LUMA[1]) + c[..., 2] * wide(_LUMA[2])
            + wide(32768)) >> wide(16)


def _row_blocks(a: np.ndarray):
    """Slices over the first axis covering about BLOCK_PIXELS elements each (the whole array if 0-D)."""
    if a.ndim == 0:
        yield ()
        return
    per_row = max(1, int(np.prod(a.shape[1:], dtype=np.int64)))
    step = max(1, BLOCK_PIXELS // per_row)
    for start in range(0, max(a.shape[0], 1), step):
        yield slice(start, start + step)


def _tifffile_grey(path: Path, max_pixels: int, pillow_exc: Exception) -> np.ndarray:
    """First page of a TIFF that Pillow cannot read (12-bit packed, BigTIFF, exotic compression)."""
    tifffile = _import_tifffile(path, pillow_exc)
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            _check_size(path, (int(page.imagewidth), int(page.imagelength)), max_pixels)
            a = np.squeeze(np.asarray(page.asarray()))
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(path, f"unreadable TIFF ({_describe(pillow_exc)})") from exc
    if a.ndim == 3 and a.shape[0] in (2, 3, 4) and a.shape[-1] not in (2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (separate) samples
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return luma(a)
    if a.ndim == 3 and a.shape[-1] == 2:  # grey + alpha
        a = a[..., 0]
    if a.ndim != 2:
        raise ImageError(path, f"unsupported TIFF layout with shape {a.shape}")
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype.kind == "f":
        return a.astype(np.float32)
    if a.dtype.kind in "ui" and a.dtype.itemsize <= 2 and a.min() >= 0:
        return a.astype(np.uint8 if a.dtype.itemsize == 1 else np.uint16)
    return a.astype(np.int64)


def _tifffile_size(path: Path, pillow_exc: Exception) -> tuple[int, int]:
    tifffile = _import_tifffile(path, pillow_exc)
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            return int(page.imagewidth), int(page.imagelength)
    except Exception as exc:
        raise ImageError(path, f"unreadable TIFF ({_describe(pillow_exc)})") from exc


def _import_tifffile(path: Path, pillow_exc: Exception):
    """tifffile is optional (absent on the board): without it the Pillow error stands."""
    try:
        import tifffile
    except ImportError:
        raise ImageError(path, f"unreadable TIFF ({_describe(pillow_exc)})") from pillow_exc
    return tifffile


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or corrupt header)"
    msg = _one_line(exc)
    if "truncated" in msg.lower():
        return f"truncated image file ({msg})"
    return f"cannot decode image ({type(exc).__name__}: {msg})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------------------------- bit depth
def to_uint8(arr: np.ndarray, rule: str = "minmax") -> np.ndarray:
    """8-bit frame from any grey array by the documented rule (see module doc).

    Integers already in 0..255 are kept as they are under both rules. "minmax" stretches min..max to
    0..255; "bitdepth" scales by the effective container depth (10/12/14/16 bits, beyond that the bit
    length of the maximum); float data in 0..1 count as unit scale under "bitdepth". Negative data and
    other floats fall back to "minmax"; a constant image falls back to "bitdepth".
    """
    if rule not in BIT_DEPTH_RULES:
        raise ValueError(f"bit_depth_rule must be one of {', '.join(BIT_DEPTH_RULES)}, got {rule!r}")
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.size == 0:
        return a.astype(np.uint8)
    floating = a.dtype.kind == "f"
    lo, hi = _value_range(a)
    integral = a.dtype.kind in "ui"
    if integral and lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    if floating and lo >= 0 and hi <= 1 and (rule == "bitdepth" or lo == hi):
        return _scaled_u8(a, 0.0, 255.0)
    if lo >= 0 and integral and (rule == "bitdepth" or lo == hi):
        return _scaled_u8(a, 0.0, 255.0 / (2.0 ** _effective_bits(int(hi)) - 1))
    if lo == hi:
        return np.zeros(a.shape, dtype=np.uint8)
    return _scaled_u8(a, lo, 255.0 / (hi - lo))


def _as_float64(block: np.ndarray) -> np.ndarray:
    """float64 copy of a block; NaN and infinities count as 0 (the bit-depth rule's choice)."""
    b = block.astype(np.float64)
    return np.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0, copy=False) if block.dtype.kind == "f" else b


def _value_range(a: np.ndarray) -> tuple[float, float]:
    """(min, max) as floats; float data in row blocks with NaN/inf as 0, so no full-size float64 copy."""
    if a.dtype.kind != "f":
        return float(a.min()), float(a.max())
    lows, highs = [], []
    for rows in _row_blocks(a):
        b = _as_float64(a[rows])
        if b.size:
            lows.append(b.min())
            highs.append(b.max())
    return float(min(lows)), float(max(highs))


def _scaled_u8(a: np.ndarray, lo: float, scale: float) -> np.ndarray:
    """round((a - lo) * scale) clipped to 0..255, computed in float64 per row block (same bits as whole)."""
    out = np.empty(a.shape, dtype=np.uint8)
    for rows in _row_blocks(a):
        b = _as_float64(a[rows])
        if lo:
            b -= lo
        b *= scale
        out[rows] = _round_u8(b)
    return out


def _effective_bits(max_value: int) -> int:
    """Container depth guessed from the maximum: 8, 10, 12, 14 or 16 bits (more for 32-bit data)."""
    bits = max(8, int(max_value).bit_length())
    return bits + (bits % 2) if bits <= 16 else bits


def _round_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- data bar
_BAR_MAX_FRACTION = 0.30   # a band taller than this is image content, not a bar
_BAR_MIN_FRACTION = 0.02
_BAR_MIN_ROWS = 4
_BG_TOL = 2                # grey levels: bar background is flat (JPEG may wobble it by a level or two)
_INK = 48                  # grey levels from the background that count as text / scale bar
_BLOCK = 8                 # JPEG ringing stays within the 8x8 block of the edge that caused it
_ROW_INK_MAX = 0.6         # a bar row is not mostly ink (bright image rows above a dark bar are) ...
_ROW_STRAY_MAX = 0.05      # ... and (almost) no in-between grey away from the ink: no sample noise
_NEAR_INK = 8              # "near ink" = >= 8 ink pixels within 8 px: a text stroke, not a noise spike
_BAND_BG_MIN = 0.4         # the bar as a whole is mostly background
_TEXT_RUNS = 6             # some bar row crosses at least this many separate ink runs (characters)
_TEXT_ROWS = 0.2           # and ink (text, scale bar) spans at least this share of the bar's rows
_SEPARATOR_ROWS = 3        # a thin uniform rule between image and bar belongs to the bar


def find_databar(arr: np.ndarray) -> int:
    """Number of bottom rows that hold an instrument data bar, or 0. Conservative by design.

    The background value v is the most common grey of the bottom three rows. "Ink" is any pixel >= 48
    levels from v (text, scale bar), "background" any pixel within 2 levels of v. A row is bar-like when
    <= 60 % of it is ink and < 5 % is neither background nor ink nor near ink (>= 8 ink pixels within
    8 px, so isolated noise spikes excuse nothing): a rendered bar is noise-free apart from anti-aliasing
    and JPEG ringing next to the text, while SEM content, even clipped to black, is noisy. The bar is
    the run of bar-like rows at the bottom; if that run starts inside text, it is extended through the
    JPEG block it shares with the image. It is accepted only if it
      * is 2..30 % of the image height (vertical line patterns give bar-like rows all the way up),
      * starts with an ink-free margin row within its top 8 rows (otherwise the top is ambiguous),
      * is >= 40 % background and 0.2..50 % ink, with ink on >= 20 % of its rows, and
      * has a row crossing >= 6 separate ink runs, i.e. text (a defect or a line in a plain space has not).
    A uniform rule of 1..3 rows on top, with non-uniform content above it, belongs to the bar.
    """
    a = _analysis_view(arr)
    h, w = a.shape
    max_rows = int(h * _BAR_MAX_FRACTION)
    min_rows = max(_BAR_MIN_ROWS, int(math.ceil(h * _BAR_MIN_FRACTION)))
    if h < 4 * MIN_SIDE or w < MIN_SIDE or max_rows <= min_rows:
        return 0
    v = int(np.bincount(a[-3:].ravel(), minlength=256).argmax())
    d = np.abs(a[h - max_rows - 1:].astype(np.int16) - v)
    bg, ink = d <= _BG_TOL, d >= _INK
    if bg[-3:].mean() < 0.3:
        return 0  # the common case: no flat bottom, no bar
    light = ink.mean(axis=1) <= _ROW_INK_MAX  # rows not mostly ink
    stray = ~bg & ~ink & ~_near(ink & light[:, None], _BLOCK, _NEAR_INK)  # all-ink rows excuse nothing
    row_ok = light & (stray.mean(axis=1) <= _ROW_STRAY_MAX)
    k = _bottom_run(row_ok)
    if k > max_rows:
        return 0
    if k and ink[len(ink) - k].any():  # run starts inside text: JPEG blocks shared with the image cut it
        block_top = ((h - k - 1) // _BLOCK) * _BLOCK
        k += min(_bottom_run(light[: len(light) - k]), h - k - block_top)
    inkfree = np.flatnonzero(~ink[len(ink) - k:].any(axis=1))
    if inkfree.size == 0 or inkfree[0] >= _BLOCK:
        return 0
    k -= int(inkfree[0])
    if not (min_rows <= k <= max_rows and _looks_like_text(bg[-k:], ink[-k:])):
        return 0
    return k + _separator_rows(a, h - k, max_rows - k)


def _looks_like_text(bg: np.ndarray, ink: np.ndarray) -> bool:
    return (bg.mean() >= _BAND_BG_MIN and 0.002 < ink.mean() < 0.5
            and ink.any(axis=1).mean() >= _TEXT_ROWS and _max_runs(ink) >= _TEXT_RUNS)


def _separator_rows(a: np.ndarray, top: int, room: int) -> int:
    """1..3 uniform rows right above the bar with non-uniform content above them (a rule, not a line)."""
    sep = 0
    while sep <= _SEPARATOR_ROWS and top - sep - 1 >= 0 and _is_uniform_row(a[top - sep - 1]):
        sep += 1
    return sep if 0 < sep <= min(_SEPARATOR_ROWS, room) else 0


def _analysis_view(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {a.shape}")
    return a if a.dtype == np.uint8 else to_uint8(a, "minmax")


def _near(mask: np.ndarray, r: int, count: int) -> np.ndarray:
    """Pixels with at least `count` True pixels within r px (square box), via 2-D cumulative sums."""
    c = np.pad(mask.astype(np.int32), ((r + 1, r), (r + 1, r))).cumsum(0).cumsum(1)
    n = 2 * r + 1
    box = c[n:, n:] - c[:-n, n:] - c[n:, :-n] + c[:-n, :-n]
    return box >= count


def _bottom_run(flags: np.ndarray) -> int:
    """Length of the run of True at the end of `flags`."""
    false = np.flatnonzero(~flags)
    return len(flags) if false.size == 0 else len(flags) - 1 - int(false[-1])


def _max_runs(mask: np.ndarray) -> int:
    """Most separate True runs in any row."""
    starts = mask[:, 1:] & ~mask[:, :-1]
    return int((starts.sum(axis=1) + mask[:, 0]).max())


def _is_uniform_row(row: np.ndarray) -> bool:
    return float((np.abs(row.astype(np.int16) - int(np.median(row))) <= _BG_TOL).mean()) >= 0.9


def remove_databar(arr: np.ndarray, databar: str | int = "auto") -> np.ndarray:
    """The image without its bottom data bar ('auto' detects it, 'off'/0 keeps all, N drops N rows)."""
    mode = _parse_databar(databar)
    a = np.asarray(arr)
    if mode == "off":
        return a
    rows = find_databar(a) if mode == "auto" else int(mode)
    if a.shape[0] - rows < MIN_SIDE:
        raise ValueError(f"removing a {rows}-row data bar leaves {a.shape[0] - rows} of {a.shape[0]} rows, "
                         f"fewer than {MIN_SIDE}")
    return a[: a.shape[0] - rows] if rows else a


# ---------------------------------------------------------------------------------------------- resize
def resize_square(arr: np.ndarray, size: int, fit: str = "crop") -> np.ndarray:
    """Square (size, size) frame: 'crop' takes the centre square, 'pad' pads with the image median.

    Pillow BILINEAR (antialiased when shrinking, see module doc); uint8 in -> uint8 out, other dtypes
    are resized as float32 ("F" mode) and returned as float32.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {a.shape}")
    a = _centre_crop(a) if fit == "crop" else _pad_square(a)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
    if a.shape[0] == size:
        return np.ascontiguousarray(a)
    im = Image.fromarray(np.ascontiguousarray(a))
    return np.asarray(im.resize((size, size), _BILINEAR)).copy()


def _centre_crop(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return a[top:top + s, left:left + s]


def _pad_square(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    s = max(h, w)
    if h == w:
        return a
    fill = np.median(a)
    out = np.full((s, s), np.round(fill) if a.dtype.kind in "ui" else fill, dtype=a.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = a
    return out


# ---------------------------------------------------------------------------------------------- all steps
def frame_from_array(arr: np.ndarray, pre: Preprocess | None = None) -> np.ndarray:
    """remove_databar -> to_uint8 -> resize_square on an already decoded grey array (ValueError if unfit)."""
    pre = pre or Preprocess()
    a = remove_databar(arr, pre.databar)
    return resize_square(to_uint8(a, pre.bit_depth_rule), pre.size, pre.fit)


def load_frame(path: str | os.PathLike, pre: Preprocess | None = None) -> np.ndarray:
    """The model's input for one file: uint8 (size, size); ImageError with a one-line reason otherwise.

    Same steps as `frame_from_array(read_grey(path), pre)`, under the host's pixel limit."""
    pre = pre or Preprocess()
    arr = read_grey(path)
    try:
        u8 = to_uint8(remove_databar(arr, pre.databar), pre.bit_depth_rule)
        del arr  # the wide decoded array is released before the resize allocates
        return resize_square(u8, pre.size, pre.fit)
    except ValueError as exc:
        raise ImageError(path, str(exc)) from exc
