"""Fuzz the decoder and the model loader with a seeded corpus (deterministic, no extra dependency).

Images: 420 inputs, random and mutated bytes (flipped, truncated, inserted, random tails) behind valid PNG,
JPEG, TIFF, BMP and GIF encodings, headers declaring huge sizes, and valid images right at the limit. Each
goes through `load_frame` under a 1 Mpx host limit in a child process (a crash there cannot take pytest down
and is named by its input): it must give a frame or an ImageError whose text starts with the file's path,
and the child's peak memory must stay within a small multiple of the limit (at commit 933bc67, with the
limit given through Preprocess, the same corpus peaked at +34 MB; now +10 MB).

Models: 150 mutated copies of a tiny int8 model (five heads, 16 px, with its contract) through
`read_model`/`read_contract` (pure Python, in this process) and through the board's `BoardModel` (the
TFLite interpreter, in a child process: a damaged flatbuffer could crash it): ValueError naming the file,
or a model that loads; never another exception, never a crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE_INPUTS = 420
MODEL_INPUTS = 150
LIMIT = 1_000_000  # px, the host limit during the image fuzz
PEAK_BOUND_MB = 14  # valid 1000x1000 RGB images are in the corpus: 3 MB at 8 bits (4 MB in Pillow)

# The child process: builds the corpus from the seed and decodes every input; one JSON line of results.
IMAGE_CHILD = textwrap.dedent(r'''
    import io, json, struct, sys, zlib
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from semhinet_tf.data.decode import ImageError, Preprocess, load_frame, set_max_pixels

    def hwm():
        return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1])

    def encode(fmt, arr, **kw):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, **kw)
        return buf.getvalue()

    def tiff_header(w, h):
        """A minimal uncompressed 8-bit grey TIFF declaring w x h with 16 bytes of pixels."""
        tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 9 * 12 + 4),
                (277, 3, 1), (278, 4, h), (279, 4, 16)]
        ifd = struct.pack("<H", len(tags)) + b"".join(
            struct.pack("<HHI", t, typ, 1) + (struct.pack("<HH", v, 0) if typ == 3 else struct.pack("<I", v))
            for t, typ, v in tags) + struct.pack("<I", 0)
        return b"II*\0" + struct.pack("<I", 8) + ifd + bytes(range(16))

    def huge(fmt, data):
        """The encoding with its header's size fields set to something enormous."""
        b = bytearray(data)
        if fmt == "PNG":
            b[16:24] = struct.pack(">II", 100_000, 100_000)
            b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
        elif fmt == "BMP":
            b[18:26] = struct.pack("<ii", 60_000, 60_000)
        elif fmt == "GIF":
            b[6:10] = struct.pack("<HH", 65_535, 65_535)
            at = b.find(b"\x2c")
            if at > 0:
                b[at + 5:at + 9] = struct.pack("<HH", 65_535, 65_535)
        elif fmt == "JPEG":
            at = b.find(b"\xff\xc0")
            b[at + 5:at + 9] = struct.pack(">HH", 65_535, 65_535)
        elif fmt == "TIFF":
            return tiff_header(200_000, 200_000)
        return bytes(b)

    def mutate(rng, data):
        data = bytearray(data)
        how = int(rng.integers(4))
        if how == 0:  # flip 1..8 bytes after the magic
            for _ in range(int(rng.integers(1, 9))):
                data[int(rng.integers(4, len(data)))] ^= int(rng.integers(1, 256))
        elif how == 1:  # truncate
            data = data[: int(rng.integers(4, len(data)))]
        elif how == 2:  # insert random bytes
            at = int(rng.integers(4, len(data)))
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        else:  # the header, then random bytes
            keep = int(rng.integers(4, min(len(data), 64)))
            data = data[:keep] + rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8).tobytes()
        return bytes(data)

    def corpus(n, seed):
        rng = np.random.default_rng(seed)
        grey = rng.integers(0, 256, (48, 64), dtype=np.uint8)
        rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        deep = rng.integers(0, 65536, (48, 64), dtype=np.uint16)
        bases = [("png", "PNG", encode("PNG", grey)), ("png", "PNG", encode("PNG", rgb)),
                 ("png", "PNG", encode("PNG", deep)), ("jpg", "JPEG", encode("JPEG", grey)),
                 ("jpg", "JPEG", encode("JPEG", rgb)), ("tif", "TIFF", encode("TIFF", grey)),
                 ("tif", "TIFF", encode("TIFF", deep)), ("tif", "TIFF", encode("TIFF", rgb, compression="tiff_lzw")),
                 ("bmp", "BMP", encode("BMP", rgb)), ("bmp", "BMP", encode("BMP", grey)),
                 ("gif", "GIF", encode("GIF", grey))]
        side = int(np.sqrt(limit))  # valid images right at the limit: the memory bound is about these
        ramp = (np.arange(side)[None, :] * 3 + np.arange(side)[:, None] * 5).astype(np.uint32)
        big_rgb = np.stack([ramp % 256, (ramp // 3) % 256, (ramp * 7) % 256], axis=-1).astype(np.uint8)
        big16 = (ramp % 4000 + 1000).astype(np.uint16)
        out = [("limit_rgb.png", encode("PNG", big_rgb)), ("limit_rgb.bmp", encode("BMP", big_rgb)),
               ("limit_rgb.tif", encode("TIFF", big_rgb)), ("limit_16.tif", encode("TIFF", big16)),
               ("limit_rgb.jpg", encode("JPEG", big_rgb)), ("limit_p.gif", encode("GIF", big_rgb))]
        out += [(f"huge_{i}.{ext}", huge(fmt, data)) for i, (ext, fmt, data) in enumerate(bases)]
        out += [(f"valid_{i}.{ext}", data) for i, (ext, fmt, data) in enumerate(bases)]
        while len(out) < n:
            ext, fmt, data = bases[int(rng.integers(len(bases)))]
            out.append((f"m{len(out):03d}.{ext}", mutate(rng, data)))
        return out

    n, seed, limit, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    set_max_pixels(limit)
    pre = Preprocess(size=32)
    inputs = corpus(n, seed)
    try:
        import tifffile  # noqa: F401 - imported lazily by the decoder; its import is not a decode's memory
    except ImportError:
        pass
    base = hwm()
    counts, bad = {"frame": 0, "refused": 0}, []
    for name, data in inputs:
        path = folder / name
        path.write_bytes(data)
        print(name, file=sys.stderr, flush=True)  # the last name printed is the culprit of a crash
        try:
            frame = load_frame(path, pre)
            ok = frame.shape == (32, 32) and frame.dtype == np.uint8
            counts["frame"] += 1
            if not ok:
                bad.append(f"{name}: frame {frame.shape} {frame.dtype}")
        except ImageError as exc:
            counts["refused"] += 1
            if not str(exc).startswith(f"{path}: ") or "\n" in str(exc):
                bad.append(f"{name}: ImageError not naming the file in one line: {exc}")
        except BaseException as exc:
            bad.append(f"{name}: {type(exc).__name__}: {exc}")
        path.unlink()
    print(json.dumps({"tried": len(inputs), **counts, "bad": bad, "peak_mb": (hwm() - base) / 1024}))
''')


def _child(code: str, *args, timeout: int = 240) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)
    last = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ["-"]
    assert proc.returncode == 0, f"child died (exit {proc.returncode}) at input {last[0]}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fuzzed_images_are_decoded_or_refused_by_name(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("the memory bound is read from /proc/self/status (Linux)")
    res = _child(IMAGE_CHILD, IMAGE_INPUTS, 2022, LIMIT, tmp_path)
    print(f"{IMAGE_INPUTS} images: {res['frame']} frames, {res['refused']} refused; peak +{res['peak_mb']:.1f} MB")
    assert res["bad"] == []
    assert res["tried"] == res["frame"] + res["refused"] == IMAGE_INPUTS
    assert res["refused"] >= 11 and res["frame"] >= 17  # the huge headers refused, the valid ones decoded
    assert res["peak_mb"] <= PEAK_BOUND_MB


# ---------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny int8 model with the default taxonomy's five heads (16 px) and its contract, written to disk."""
    tf = pytest.importorskip("tensorflow")
    import tf_keras as keras

    from semhinet_tf.export.tflite_meta import embed_contract
    from semhinet_tf.taxonomy import Taxonomy

    tax = Taxonomy.default()
    keras.utils.set_random_seed(0)
    x = keras.Input((16, 16, 1), batch_size=1, name="image")
    y = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, strides=2, padding="same",
                                                                  activation="relu")(x))
    outputs = {h.name: keras.layers.Dense(h.num_classes, activation="softmax", name=h.name)(y) for h in tax.heads}
    model = keras.Model(x, outputs)

    def rep():
        rng = np.random.default_rng(0)
        for _ in range(4):
            yield [rng.uniform(0, 255, (1, 16, 16, 1)).astype(np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    contract = {"taxonomy": tax.to_spec(), "preprocess": {"size": 16, "max_pixels": 10**12}}
    path = tmp_path_factory.mktemp("fuzz_model") / "tiny.tflite"
    path.write_bytes(embed_contract(conv.convert(), contract))
    return path


def _mutants(raw: bytes, n: int, seed: int) -> list[bytes]:
    """Flips spare the contract (else nearly every mutant would stop at its JSON, and the interpreter
    would never see a damaged model); truncation, insertion and header damage may hit anything."""
    from semhinet_tf.export.tflite_meta import CONTRACT_NAME, read_model

    model = read_model(raw)
    start, size = model.buffer_spans[model.metadata[CONTRACT_NAME]]
    outside = np.r_[0:start, start + size:len(raw)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        data = bytearray(raw)
        how = i % 5
        if how == 0:  # flip 1..16 bytes outside the contract
            for _ in range(int(rng.integers(1, 17))):
                data[int(rng.choice(outside))] ^= int(rng.integers(1, 256))
        elif how == 4:  # flip one byte outside the contract: often still a parseable model for the interpreter
            data[int(rng.choice(outside))] ^= int(rng.integers(1, 256))
        elif how == 1:  # truncate
            data = data[: int(rng.integers(0, len(data)))]
        elif how == 2:  # insert bytes (shifts every offset after them)
            at = int(rng.integers(len(data)))
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
        else:  # damage the first 64 bytes (root table, offsets), where a flatbuffer is most fragile
            for _ in range(int(rng.integers(1, 5))):
                data[int(rng.integers(min(64, len(data))))] ^= int(rng.integers(1, 256))
        out.append(bytes(data))
    return out


def test_fuzzed_models_are_read_or_refused_by_name(tiny_model, tmp_path):
    from semhinet_tf.export.tflite_meta import read_contract, read_model

    bad, refused = [], 0
    for i, data in enumerate(_mutants(tiny_model.read_bytes(), MODEL_INPUTS, 7)):
        path = tmp_path / f"mutant_{i:03d}.tflite"
        path.write_bytes(data)
        try:
            read_contract(read_model(path))
        except ValueError as exc:
            refused += 1
            if not str(exc).startswith(f"{path}: "):
                bad.append(f"{path.name}: ValueError not naming the file: {exc}")
        except Exception as exc:  # noqa: BLE001 - any other type is the failure being looked for
            bad.append(f"{path.name}: {type(exc).__name__}: {exc}")
    print(f"{MODEL_INPUTS} mutated models through read_model/read_contract: {refused} refused")
    assert bad == []


BOARD_CHILD = textwrap.dedent(r'''
    import json, sys
    from pathlib import Path
    from semhinet_tf.board.runtime import BoardModel
    bad, loaded, refused = [], 0, 0
    for path in sorted(Path(sys.argv[1]).glob("*.tflite")):
        print(path.name, file=sys.stderr, flush=True)  # the last name printed is the culprit of a crash
        try:
            BoardModel(path, warn=lambda m: None).warm_up()  # loaded models also run one inference
            loaded += 1
        except ValueError as exc:
            refused += 1
            if not str(exc).startswith(f"{path}: "):
                bad.append(f"{path.name}: ValueError not naming the file: {exc}")
        except Exception as exc:
            bad.append(f"{path.name}: {type(exc).__name__}: {exc}")
    print(json.dumps({"loaded": loaded, "refused": refused, "bad": bad}))
''')


def test_fuzzed_models_never_crash_the_board(tiny_model, tmp_path):
    for i, data in enumerate(_mutants(tiny_model.read_bytes(), MODEL_INPUTS, 7)):
        (tmp_path / f"mutant_{i:03d}.tflite").write_bytes(data)
    res = _child(BOARD_CHILD, tmp_path)
    print(f"{MODEL_INPUTS} mutated models through BoardModel: {res['loaded']} loaded, {res['refused']} refused")
    assert res["bad"] == []
    assert res["loaded"] + res["refused"] == MODEL_INPUTS
