"""The one decoder: formats, bad files, bit depth, data bar, resize (numpy + Pillow only)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from semhinet_tf.data import decode
from semhinet_tf.data.decode import (
    IMAGE_SUFFIXES,
    ImageError,
    Preprocess,
    find_databar,
    load_frame,
    read_grey,
    remove_databar,
    resize_square,
    to_uint8,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers
def noise_image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def save(arr: np.ndarray, path: Path, **kw) -> Path:
    Image.fromarray(arr).save(path, **kw)
    return path


def lines(h: int, w: int, horizontal: bool, period: int = 24, noise: float = 8.0, seed: int = 0) -> np.ndarray:
    """SEM-like line/space pattern with shot noise."""
    n = h if horizontal else w
    profile = np.where(np.arange(n) % period < period // 2, 180.0, 60.0)
    img = np.tile(profile[:, None], (1, w)) if horizontal else np.tile(profile[None, :], (h, 1))
    img = img + np.random.default_rng(seed).normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def with_bar(img: np.ndarray, fraction: float = 0.07, bg: int = 10, fg: int = 255) -> tuple[np.ndarray, int]:
    """Append a microscope-style data bar (text + scale bar) of `fraction` of the final height."""
    h, w = img.shape
    rows = int(round(h * fraction / (1 - fraction)))
    bar = Image.new("L", (w, rows), bg)
    draw = ImageDraw.Draw(bar)
    try:
        font = ImageFont.load_default(size=max(8, int(rows * 0.5)))
    except TypeError:  # Pillow < 10.1 (as on some boards): the small bitmap font
        font = ImageFont.load_default()
    draw.text((4, rows * 0.2), "HV 5.00 kV  WD 4.1 mm  mag 50 000 x  TLD", fill=fg, font=font)
    draw.rectangle((w - 90, rows // 2, w - 10, rows // 2 + 3), fill=fg)
    return np.vstack([img, np.asarray(bar)]), rows


def jpeg_roundtrip(arr: np.ndarray, quality: int = 85) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf))


def huge_png(path: Path, side: int = 20_000) -> Path:
    """A valid 1-bit greyscale PNG of side x side (a few hundred KB; Pillow would need side**2 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------- bad files
def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_frame(p)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        read_grey(tmp_path / "nope.png")


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(noise_image(200, 200)).save(buf, "PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        load_frame(p)
    assert info.value.path == str(p)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(noise_image(200, 200)).save(buf, "JPEG", quality=90)
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_frame(p)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image"):
        load_frame(p)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_garbage_tiff(tmp_path):
    p = tmp_path / "broken.tif"
    p.write_bytes(b"II*\x00" + bytes(range(256)) * 4)  # TIFF magic, nonsense after it
    with pytest.raises(ImageError) as info:
        load_frame(p)
    assert "TIFF" in info.value.reason or "decode" in info.value.reason
    assert "\n" not in str(info.value)


def test_tiny_image_refused(tmp_path):
    p = save(np.zeros((1, 1), np.uint8), tmp_path / "dot.png")
    with pytest.raises(ImageError, match="1x1 px, smaller than the minimum of 8"):
        load_frame(p)


@pytest.fixture
def host_limit():
    """decode.set_max_pixels for one test; the process's limit is restored afterwards."""
    before = decode.host_max_pixels()
    yield decode.set_max_pixels
    decode.set_max_pixels(before)


def test_too_many_pixels_refused_before_decoding(tmp_path, host_limit):
    p = save(noise_image(200, 300), tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"200 px .*above the limit"):
        read_grey(p, max_pixels=50_000)
    host_limit(50_000)
    with pytest.raises(ImageError, match="above the limit of 50000 px"):
        load_frame(p)
    assert Image.MAX_IMAGE_PIXELS == 50_000  # Pillow's own bound follows the host's, never removed


def test_a_one_call_limit_does_not_leak_into_later_reads(tmp_path, host_limit):
    """A per-call or per-test limit must not stay in Pillow's global bound (it broke the synth photos once)."""
    p = save(noise_image(200, 300), tmp_path / "big.png")
    host_limit(1_000_000)
    with pytest.raises(ImageError):
        read_grey(p, max_pixels=50_000)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000
    assert read_grey(p).shape == (200, 300)
    host_limit(decode.DEFAULT_MAX_PIXELS)
    assert Image.MAX_IMAGE_PIXELS == decode.DEFAULT_MAX_PIXELS


def test_host_limit_must_be_positive(host_limit):
    for bad in (0, -5, 1.5, True, "100"):
        with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
            host_limit(bad)


def test_huge_png_helper_makes_a_valid_png(tmp_path):
    assert (read_grey(huge_png(tmp_path / "small.png", side=64)) == 0).all()


@pytest.mark.parametrize("side, refusal", [(20_000, "too large"), (12_000, "above the limit")])
def test_huge_png_refused_with_low_memory(tmp_path, side, refusal):
    """side**2 bytes if decoded (400 / 144 MB); refusing must not allocate them (measured in a fresh process).

    20000 px trips Pillow's decompression-bomb error (> 2x its bound), 12000 px only our header check.
    """
    p = huge_png(tmp_path / "huge.png", side)
    assert p.stat().st_size < 2_000_000
    code = (
        "import json, resource, sys\n"
        "from semhinet_tf.data.decode import load_frame, ImageError\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    load_frame({str(p)!r}); msg = None\n"
        "except ImageError as e:\n"
        "    msg = str(e)\n"
        "print(json.dumps({'msg': msg, 'peak_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " 'base_kb': base}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["msg"] is not None and refusal in res["msg"], res
    print("peak RSS increase while refusing:", res["peak_kb"] - res["base_kb"], "kB")
    assert res["peak_kb"] - res["base_kb"] < 60_000, res  # far below the 400 MB a decode would take


def test_image_error_is_one_line_and_picklable():
    err = ImageError("a/b.png", "broken\nPNG  file")
    assert str(err) == "a/b.png: broken PNG file"
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason) == ("a/b.png", "broken PNG file")


# ---------------------------------------------------------------------------------------------- formats
def test_png_grey(tmp_path):
    a = noise_image()
    np.testing.assert_array_equal(read_grey(save(a, tmp_path / "g.png")), a)


def test_png_16bit(tmp_path):
    a = (np.arange(96 * 128).reshape(96, 128) * 5).astype(np.uint16)
    got = read_grey(save(a, tmp_path / "g16.png"))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, a)


def test_rgb_png_uses_itu601_luma_like_pillow(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    p = save(rgb, tmp_path / "rgb.png")
    got = read_grey(p)
    np.testing.assert_array_equal(got, np.asarray(Image.open(p).convert("L")))


def test_rgba_png_ignores_alpha(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    alpha = np.random.default_rng(3).integers(0, 256, (40, 50, 1), dtype=np.uint8)
    got = read_grey(save(np.concatenate([rgb, alpha], axis=2), tmp_path / "rgba.png"))
    np.testing.assert_array_equal(got, np.asarray(Image.fromarray(rgb).convert("L")))


def test_grey_stored_as_rgb_is_exact(tmp_path):
    a = noise_image(32, 32)
    np.testing.assert_array_equal(read_grey(save(np.dstack([a, a, a]), tmp_path / "grey_rgb.png")), a)


def test_bmp(tmp_path):
    a = noise_image()
    np.testing.assert_array_equal(read_grey(save(a, tmp_path / "g.bmp")), a)


def test_jpeg(tmp_path):
    a = lines(96, 128, horizontal=False, noise=0)
    got = read_grey(save(a, tmp_path / "g.jpg", quality=95))
    assert got.shape == a.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - a).mean() < 3


def test_gif_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((30, 40), v, np.uint8)) for v in (50, 200)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    got = read_grey(p)
    assert got.shape == (30, 40) and int(np.median(got)) == 50


def test_tiff_8bit(tmp_path):
    a = noise_image()
    np.testing.assert_array_equal(read_grey(save(a, tmp_path / "g.tif")), a)


def test_tiff_16bit_keeps_values(tmp_path):
    a = np.random.default_rng(4).integers(1000, 4000, (64, 80)).astype(np.uint16)
    got = read_grey(save(a, tmp_path / "g16.tiff"))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, a)
    frame = load_frame(tmp_path / "g16.tiff", Preprocess(size=64, databar="off"))
    assert frame.dtype == np.uint8 and frame.shape == (64, 64)
    assert frame.min() < 10 and frame.max() > 245  # min-max stretched, not 1000/257


def test_multipage_tiff_uses_first_page(tmp_path):
    pages = [Image.fromarray(np.full((32, 48), v, np.uint8)) for v in (30, 220, 120)]
    p = tmp_path / "stack.tif"
    pages[0].save(p, save_all=True, append_images=pages[1:])
    assert Image.open(p).n_frames == 3
    assert int(read_grey(p).mean()) == 30


def test_float64_tiff_via_tifffile_fallback(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    a = np.linspace(-1.0, 3.0, 40 * 50).reshape(40, 50)
    p = tmp_path / "f64.tif"
    tifffile.imwrite(p, a)
    with pytest.raises(OSError):  # Pillow cannot: the fallback is really used
        Image.open(p).load()
    got = read_grey(p)
    np.testing.assert_allclose(got, a.astype(np.float32))
    u8 = to_uint8(got)
    assert u8[0, 0] == 0 and u8[-1, -1] == 255


def test_image_suffixes():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"} == set(IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------------- bit depth
def test_to_uint8_keeps_8bit_data():
    a = np.array([[0, 7], [200, 255]], np.uint16)
    for rule in ("minmax", "bitdepth"):
        np.testing.assert_array_equal(to_uint8(a, rule), a.astype(np.uint8))


def test_to_uint8_minmax_stretch():
    a = np.array([[1000, 2000], [3000, 1500]], np.uint16)
    np.testing.assert_array_equal(to_uint8(a, "minmax"), [[0, 128], [255, 64]])


def test_to_uint8_bitdepth_12bit():
    a = np.array([[0, 4095], [2048, 1000]], np.uint16)  # max < 4096 -> 12-bit container
    np.testing.assert_array_equal(to_uint8(a, "bitdepth"), np.round(a.astype(float) * 255 / 4095).astype(np.uint8))
    b = np.array([[0, 1500]], np.uint16)  # 11 significant bits are still read as a 12-bit container
    assert to_uint8(b, "bitdepth")[0, 1] == round(1500 * 255 / 4095)
    c = np.array([[0, 65535]], np.uint16)
    np.testing.assert_array_equal(to_uint8(c, "bitdepth"), [[0, 255]])


def test_to_uint8_constant_and_float():
    assert to_uint8(np.full((4, 4), 1000, np.uint16)).max() == round(1000 * 255 / 1023)
    np.testing.assert_array_equal(to_uint8(np.array([[0.0, 0.5, 1.0]]), "bitdepth"), [[0, 128, 255]])
    np.testing.assert_array_equal(to_uint8(np.array([[-1.0, 0.0, 1.0]]), "minmax"), [[0, 128, 255]])
    with pytest.raises(ValueError, match="bit_depth_rule"):
        to_uint8(np.zeros((2, 2), np.uint16), "gamma")


# ---------------------------------------------------------------------------------------------- data bar
@pytest.mark.parametrize("horizontal", [False, True])
def test_databar_found_on_line_patterns(horizontal):
    img, rows = with_bar(lines(448, 512, horizontal))
    assert 0.06 < rows / img.shape[0] < 0.08
    assert find_databar(img) == rows


def test_databar_found_white_bar_and_jpeg():
    img, rows = with_bar(lines(451, 512, False, seed=3), bg=235, fg=15)
    assert find_databar(img) == rows
    got = find_databar(jpeg_roundtrip(img, 80))
    assert rows - 7 <= got <= rows  # JPEG blocks shared with the image may keep a few margin rows


def test_databar_found_in_16bit_data():
    img, rows = with_bar(lines(448, 512, True))
    assert find_databar(img.astype(np.uint16) * 16 + 300) == rows


@pytest.mark.parametrize("horizontal", [False, True])
@pytest.mark.parametrize("period", [6, 24, 64])
def test_databar_zero_on_plain_lines(horizontal, period):
    img = lines(480, 512, horizontal, period=period, seed=period)
    assert find_databar(img) == 0
    assert find_databar(jpeg_roundtrip(img)) == 0


@pytest.mark.parametrize("horizontal", [False, True])
def test_databar_zero_on_noise_free_lines_and_dark_spaces(horizontal):
    img = lines(480, 512, horizontal, noise=0)
    img[img < 100] = 0  # clipped black spaces: flat like a bar background
    assert find_databar(img) == 0


def test_databar_zero_on_flat_bottom_with_a_defect():
    img = lines(480, 512, False)
    img[400:] = 0
    img[430:440, 200:215] = 220  # one particle in a flat area is not text
    assert find_databar(img) == 0


def test_databar_zero_on_noisy_dark_bottom_with_dots():
    """Contacts in a dark, noisy (clipped) region look like text on a bar except for the noise."""
    rng = np.random.default_rng(7)
    img = lines(480, 512, False)
    img[384:] = np.clip(rng.normal(20, 3, (96, 512)), 0, 255).astype(np.uint8)
    for y in (400, 430, 460):
        for x in range(16, 500, 32):
            img[y:y + 10, x:x + 10] = 220
    assert find_databar(img) == 0


def test_databar_taller_than_30_percent_is_content():
    img, rows = with_bar(lines(300, 512, True), fraction=0.4)
    assert rows / img.shape[0] > 0.3 and find_databar(img) == 0


def test_databar_zero_on_constant_and_tiny_images():
    assert find_databar(np.full((300, 300), 17, np.uint8)) == 0
    assert find_databar(np.zeros((8, 8), np.uint8)) == 0


def test_remove_databar_modes():
    img, rows = with_bar(lines(448, 512, False))
    assert remove_databar(img, "auto").shape[0] == img.shape[0] - rows
    assert remove_databar(img, "off").shape[0] == img.shape[0]
    assert remove_databar(img, 10).shape[0] == img.shape[0] - 10
    assert remove_databar(img, "10").shape[0] == img.shape[0] - 10
    with pytest.raises(ValueError, match="fewer than 8"):
        remove_databar(img, img.shape[0] - 4)


def test_load_frame_drops_the_bar_before_stretching(tmp_path):
    img, rows = with_bar(lines(448, 448, False))
    p = save(img, tmp_path / "bar.png")
    with_auto = load_frame(p, Preprocess(size=448, fit="crop"))
    no_bar = resize_square(img[:-rows], 448, "crop")
    np.testing.assert_array_equal(with_auto, no_bar)


# ---------------------------------------------------------------------------------------------- resize
def test_crop_takes_the_centre_square():
    a = np.zeros((100, 300), np.uint8)
    a[:, 100:200] = 200  # only the centre third is bright
    out = resize_square(a, 50, "crop")
    assert out.shape == (50, 50) and out.min() == 200


def test_pad_keeps_everything_with_median_fill():
    a = np.full((100, 300), 90, np.uint8)
    a[:, :10] = 250
    out = resize_square(a, 60, "pad")
    assert out.shape == (60, 60)
    assert out[0, 30] == 90 and out[-1, 30] == 90  # padding rows take the median
    assert out[30, 0] > 200  # the bright left edge is still there


def test_resize_is_pillow_bilinear_and_antialiases():
    a = np.random.default_rng(5).normal(128, 40, (896, 896)).clip(0, 255).astype(np.uint8)
    out = resize_square(a, 224, "crop")
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(a).resize((224, 224), Image.BILINEAR)))
    assert out.std() < a.std() / 3  # 4x shrink averages the noise (no aliasing of single pixels)


def test_resize_rejects_bad_fit():
    with pytest.raises(ValueError, match="fit"):
        resize_square(np.zeros((10, 10), np.uint8), 8, "stretch")


def test_load_frame_shape_and_dtype(tmp_path):
    p = save(noise_image(120, 200), tmp_path / "a.png")
    for fit in ("crop", "pad"):
        frame = load_frame(p, Preprocess(size=64, fit=fit))
        assert frame.shape == (64, 64) and frame.dtype == np.uint8


def test_constant_image_is_fine(tmp_path):
    p = save(np.full((50, 50), 77, np.uint8), tmp_path / "flat.png")
    assert (load_frame(p, Preprocess(size=32)) == 77).all()


# ---------------------------------------------------------------------------------------------- settings
def test_preprocess_roundtrip_through_json():
    pre = Preprocess(size=160, databar=12, fit="pad", bit_depth_rule="bitdepth")
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocess.from_dict({}) == Preprocess()
    assert Preprocess(databar="0").databar == "off"


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 4}, "size"), ({"fit": "stretch"}, "fit"), ({"bit_depth_rule": "gamma"}, "bit_depth_rule"),
    ({"databar": "maybe"}, "databar"), ({"databar": -3}, "databar"),
])
def test_preprocess_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocess(**kwargs)


def test_preprocess_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown preprocess settings gamma"):
        Preprocess.from_dict({"size": 224, "gamma": 2.2})


def test_decode_imports_without_tensorflow_or_tifffile():
    code = ("import sys; sys.modules['tifffile'] = None\n"
            "import semhinet_tf.data.decode\n"
            "assert 'tensorflow' not in sys.modules\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert decode.TIFF_SUFFIXES <= IMAGE_SUFFIXES


# ---------------------------------------------------------------------------------------------- host limit, memory
def test_a_model_file_cannot_lift_the_host_limit(tmp_path, host_limit):
    """Issue 22.5: a contract/run config asking for 10**12 px changes nothing; the host's limit stands."""
    p = save(noise_image(200, 300), tmp_path / "just_over.png")  # 60000 px
    host_limit(50_000)
    pre = Preprocess.from_dict({"size": 32, "max_pixels": 10**12})  # an old file's key: read, ignored
    assert "max_pixels" not in pre.to_dict()
    with pytest.raises(ImageError) as info:
        load_frame(p, pre)
    assert str(info.value).startswith(f"{p}: image is 300x200 px") and "above the limit of 50000 px" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == 50_000  # Pillow's bomb bound was not lifted by the model either
    host_limit(60_000)
    assert load_frame(p, pre).shape == (32, 32)


def _peak_decode_mb(path: Path) -> float:
    """Peak RSS increase (MB) of load_frame(path) with the default preprocessing, in a fresh process.

    VmHWM (this process's own high-water mark), not ru_maxrss: Linux carries ru_maxrss over exec from the
    parent (here pytest, far bigger than one decode)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux)")
    code = (
        "def hwm():\n"
        "    line = next(x for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
        "    return int(line.split()[1])\n"
        "from semhinet_tf.data.decode import load_frame\n"
        "base = hwm()\n"
        f"load_frame({str(path)!r})\n"
        "print((hwm() - base) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.parametrize("kind", ["rgb8", "grey16"])
def test_decode_peaks_at_a_small_multiple_of_the_8bit_size(tmp_path, kind):
    """Issue 22.5: 3000x3000 px; the 8-bit size is 27 MB for RGB, 9 MB for grey. Measured at commit 933bc67:
    404 MB (15x, 64-bit luma) and 243 MB (27x, full-size float64 copies); now 43 MB (1.6x: Pillow's RGB
    buffer + its "L") and 50 MB (5.6x: Pillow's 16-bit buffer + our 16-bit copy + copy blocks)."""
    side = 3000
    ramp = (np.arange(side, dtype=np.uint32)[None, :] * 3 + np.arange(side, dtype=np.uint32)[:, None] * 5)
    if kind == "rgb8":
        a = np.stack([ramp % 256, (ramp // 3) % 256, (ramp * 7) % 256], axis=-1).astype(np.uint8)
        p, size8, bound = save(a, tmp_path / "rgb.png"), side * side * 3, 2.5
    else:
        p, size8, bound = save((ramp % 4000 + 1000).astype(np.uint16), tmp_path / "g16.tif"), side * side, 6.5
    peak = _peak_decode_mb(p)
    print(f"{kind}: peak RSS increase {peak:.1f} MB = {peak * 2**20 / size8:.2f}x the 8-bit size")
    assert peak * 2**20 <= bound * size8


def test_row_blocks_change_no_bit(monkeypatch):
    """The row-block loops (luma, bit depth) give the whole-array result: tiny blocks against one block."""
    rng = np.random.default_rng(5)
    cases = [rng.integers(0, 65536, (70, 90)).astype(np.uint16), rng.normal(0, 500, (70, 90)).astype(np.float32),
             rng.random((70, 90)).astype(np.float32), rng.integers(-4000, 4000, (70, 90)).astype(np.int32)]
    cases[1][3, 4], cases[1][5, 6] = np.nan, np.inf
    rgbs = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 65536, (70, 90, 4)).astype(np.uint16)]
    whole = [to_uint8(a, r) for a in cases for r in ("minmax", "bitdepth")] + [decode.luma(c) for c in rgbs]
    monkeypatch.setattr(decode, "BLOCK_PIXELS", 100)
    blocked = [to_uint8(a, r) for a in cases for r in ("minmax", "bitdepth")] + [decode.luma(c) for c in rgbs]
    for w, b in zip(whole, blocked, strict=True):
        assert w.dtype == b.dtype and np.array_equal(w, b)
    # 8-bit colour: numpy's luma is Pillow's "L", which the decoder now uses
    np.testing.assert_array_equal(decode.luma(rgbs[0]), np.asarray(Image.fromarray(rgbs[0]).convert("L")))
