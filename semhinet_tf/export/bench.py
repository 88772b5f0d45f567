"""`semhinet bench`: latency of the int8 .tflite as the board runs it, and what the five heads cost.

Times `BoardModel.run` (the board's own path: uint8 frame in, dequantized probabilities out) per thread
count, the first inference apart (on an NPU it compiles the graph). The same figures for the bare
backbone, exported the same way (full int8, uint8 input), show the head cost: ratio = full p50 /
backbone p50, and the MAC ratio. The backbone .tflite is cached next to the model as
`<name>.backbone.tflite`, tagged with the size and config it was built for; TensorFlow is imported
only to build it, so a bench without the backbone needs numpy and a TFLite interpreter only.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.contract import load_tflite_contract
from semhinet_tf.board.runtime import BoardModel
from semhinet_tf.export.npu import count_macs, op_macs
from semhinet_tf.export.tflite_meta import TFLiteModel, embed_contract, read_contract, read_model

__all__ = ["backbone_tflite", "infer_backbone_config", "backbone_cache_path", "time_model", "time_models", "bench",
           "format_bench", "to_json"]

BENCH_TAG = "semhinet_bench_backbone"  # metadata name of the cache tag (never the deployment contract)
STANDARD_ALPHAS = (1.0, 0.75, 0.5, 0.35, 1.25, 1.5, 2.0)
CALIBRATION_FRAMES = 4
SEED = 0


# ---------------------------------------------------------------- the backbone model
def backbone_tflite(img_size: int, alpha: float = 1.0, minimalistic: bool = False) -> bytes:
    """Bare MobileNetV3Small + global average pooling (one output), full int8 with uint8 input.

    Random weights and PTQ on a few random frames: latency does not depend on the weights' values,
    and the QAT route gives the same ops.
    """
    from semhinet_tf.export.tflite import convert_int8
    from semhinet_tf.model import keras
    from semhinet_tf.model.mobilenet_v3 import BackboneConfig, build_backbone

    keras.utils.set_random_seed(SEED)
    net = build_backbone(int(img_size), BackboneConfig(alpha=float(alpha), minimalistic=bool(minimalistic)))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(net.output)
    model = keras.Model(net.input, pooled, name="backbone_bench")
    frames = _random_frames(img_size, CALIBRATION_FRAMES)
    return convert_int8(model, int(img_size), ["features"], lambda: iter(frames), io_type="uint8")


def _random_frames(img_size: int, n: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, 256, (n, img_size, img_size), dtype=np.uint8)


def _divisible(value: float, divisor: int = 8) -> int:
    """mobilenet_v3.make_divisible, restated: importing that module imports TensorFlow (a test keeps them equal)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _channels_for_alpha(alpha: float) -> int:
    """Widest 1x1 conv of MobileNetV3Small at `alpha` (Conv_1 = 6 x the last block's 96 * alpha filters)."""
    return _divisible(_divisible(96 * alpha) * 6)


def infer_backbone_config(model: TFLiteModel | str | Path | bytes) -> tuple[float, bool]:
    """(alpha, minimalistic) of the backbone inside a .tflite, from its weights' shapes.

    minimalistic uses 3x3 depthwise kernels only (the full net has 5x5 ones); alpha sets the widest
    CONV_2D (576 channels at alpha 1). Standard alphas are tried first, then steps of 0.05.
    """
    m = model if isinstance(model, TFLiteModel) else read_model(model)
    sg = m.main
    kernels = [sg.tensors[op.inputs[1]].shape[1:3] for op in sg.operators
               if op.name == "DEPTHWISE_CONV_2D" and len(op.inputs) > 1]
    widths = [sg.tensors[op.outputs[0]].shape[-1] for op in sg.operators if op.name == "CONV_2D"]
    if not kernels or not widths:
        raise ValueError(f"{m.source}: no MobileNetV3 backbone found (no depthwise or 2-D convolutions)")
    minimalistic = all(tuple(k) == (3, 3) for k in kernels)
    widest = max(widths)
    candidates = [*STANDARD_ALPHAS, *(round(0.05 * i, 2) for i in range(2, 41))]
    for alpha in candidates:
        if _channels_for_alpha(alpha) == widest:
            return float(alpha), minimalistic
    raise ValueError(f"{m.source}: widest convolution has {widest} channels, which no alpha in 0.1..2.0 gives")


def backbone_cache_path(model_path: str | Path) -> Path:
    """`model_int8.tflite` -> `model_int8.backbone.tflite` (same folder)."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}.backbone.tflite")


def _tag(img_size: int, alpha: float, minimalistic: bool) -> dict:
    return {"img_size": int(img_size), "alpha": float(alpha), "minimalistic": bool(minimalistic)}


def _cached_backbone(model_path: Path, img_size: int, alpha: float, minimalistic: bool) -> tuple[Path, str]:
    """The backbone file for this size/config: the cache when its tag matches, else built (and cached).

    Returns (path, "hit" | "built" | "built-uncached"); an unwritable folder keeps the file in a temp dir.
    """
    path = backbone_cache_path(model_path)
    want = _tag(img_size, alpha, minimalistic)
    if path.exists():  # the name is the bench's own (README): a file there without the right tag is a stale cache
        try:
            if read_contract(path, BENCH_TAG) == want:
                return path, "hit"
        except ValueError:
            pass  # a corrupt cache is rebuilt
    content = embed_contract(backbone_tflite(img_size, alpha, minimalistic), want, name=BENCH_TAG)
    try:
        _write_atomic(path, content)
        return path, "built"
    except OSError:
        import atexit
        import shutil

        folder = tempfile.mkdtemp(prefix="semhinet-bench-")
        atexit.register(shutil.rmtree, folder, True)  # the process's own copy: gone when the bench ends
        tmp = Path(folder) / path.name
        tmp.write_bytes(content)
        return tmp, "built-uncached"


def _write_atomic(path: Path, content: bytes) -> None:
    from semhinet_tf.artifacts.files import atomic_write_bytes

    atomic_write_bytes(path, content)


# ---------------------------------------------------------------- timing
def time_models(paths: Sequence[str | Path], threads: int, runs: int = 200, warmup: int = 5) -> list[dict]:
    """Time several models at one thread count, their runs interleaved (A B A B ...) so that load from other
    processes hits them alike and their ratio stays fair.

    Per model: load, first inference (`warmup_ms`), `warmup` untimed runs, then `runs` timed runs of
    BoardModel.run on uint8 frames; throughput is runs / the model's summed latency (one image at a time).
    """
    models, load_ms = [], []
    for path in paths:
        t0 = time.perf_counter()
        models.append(BoardModel(path, threads=threads, warn=lambda _msg: None, classifier=False))
        load_ms.append((time.perf_counter() - t0) * 1000)
    first_ms = [m.warm_up() for m in models]
    frames = [_random_frames(m.input_size, 8) for m in models]
    for i in range(warmup):
        for m, f in zip(models, frames, strict=True):
            m.run(f[i % len(f)])
    lat = np.empty((len(models), runs), np.float64)
    for i in range(runs):
        for j, (m, f) in enumerate(zip(models, frames, strict=True)):
            t = time.perf_counter()
            m.run(f[i % len(f)])
            lat[j, i] = (time.perf_counter() - t) * 1000
    return [_stats(m, threads, load_ms[j], first_ms[j], lat[j]) for j, m in enumerate(models)]


def time_model(path: str | Path, threads: int, runs: int = 200, warmup: int = 5) -> dict:
    """`time_models` for one model."""
    return time_models([path], threads, runs, warmup)[0]


def _stats(model: BoardModel, threads: int, load_ms: float, first_ms: float, lat: np.ndarray) -> dict:
    p50, p90, p99 = (float(v) for v in np.percentile(lat, [50, 90, 99]))
    total_s = float(lat.sum()) / 1000
    throughput = len(lat) / total_s if total_s else float("inf")
    return {"threads": int(threads), "load_ms": load_ms, "warmup_ms": first_ms, "p50_ms": p50, "p90_ms": p90,
            "p99_ms": p99, "mean_ms": float(lat.mean()), "images_per_s": throughput,
            "engine": model.engine, "input_size": model.input_size, "input_dtype": str(model.input_dtype)}


def _figures(paths: Sequence[Path], threads: Sequence[int], runs: int, warmup: int) -> list[dict]:
    """Size, MACs and per-thread timings of each model (timed together, see `time_models`)."""
    per_thread = [time_models(paths, n, runs, warmup) for n in threads]
    out = []
    for j, path in enumerate(paths):
        content = Path(path).read_bytes()
        out.append({"path": str(path), "bytes": len(content), "macs": count_macs(content),
                    "timings": [timings[j] for timings in per_thread]})
    return out


def _head_macs(model: TFLiteModel) -> int:
    """MACs of the heads: the FULLY_CONNECTED layers (the backbone has none; squeeze-excite uses 1x1 convs)."""
    sg = model.main
    return sum(op_macs(sg, op) for op in sg.operators if op.name == "FULLY_CONNECTED")


def _check_args(model_path: Path, threads: Iterable[int], runs: int, warmup: int) -> list[int]:
    if not model_path.is_file():
        raise ValueError(f"{model_path}: no such model file")
    counts = [int(n) for n in threads]
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"{model_path}: thread counts must be integers >= 1, got {list(threads)}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"{model_path}: runs must be >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    return counts


def bench(model_path: str | Path, threads: Iterable[int] = (1, 2), runs: int = 200, warmup: int = 5,
          backbone: bool = True, alpha: float | None = None, minimalistic: bool | None = None,
          allow_no_contract: bool = False) -> dict:
    """Latency (first inference, p50/p90/p99), throughput, size and MACs of the model, and of its bare backbone.

    `alpha`/`minimalistic` default to what the model's weights show (`infer_backbone_config`). The model's
    contract and digest are checked as the board does (a file without a contract only with `allow_no_contract`);
    the bare backbone is built here and has none.
    """
    model_path = Path(model_path)
    threads = list(threads)
    counts = _check_args(model_path, threads, runs, warmup)
    content = model_path.read_bytes()
    load_tflite_contract(content, model_path, allow_missing=allow_no_contract,
                         warn=lambda msg: print(msg, file=sys.stderr))
    parsed = read_model(model_path)  # its ValueError names the file
    paths, bb_info = [model_path], None
    if backbone:
        size = int(parsed.main.tensors[parsed.main.inputs[0]].shape[1])
        bb_info = _backbone_file(model_path, parsed, size, alpha, minimalistic)
        paths.append(Path(bb_info["path"]))
    figures = _figures(paths, counts, runs, warmup)
    full = figures[0]
    first = full["timings"][0]
    result = {"model": str(model_path), "engine": first["engine"], "img_size": first["input_size"],
              "input_dtype": first["input_dtype"], "runs": runs, "warmup": warmup, "full": full,
              "backbone": None, "head": None}
    if backbone:
        result["backbone"] = {**figures[1], **bb_info}
        result["head"] = _head_cost(full, result["backbone"], _head_macs(parsed))
    return result


def _backbone_file(model_path: Path, parsed: TFLiteModel, img_size: int, alpha: float | None,
                   minimalistic: bool | None) -> dict:
    source = "given"
    if alpha is None or minimalistic is None:
        a, m = infer_backbone_config(parsed)
        alpha = a if alpha is None else alpha
        minimalistic = m if minimalistic is None else minimalistic
        source = "inferred from the model"
    path, cache = _cached_backbone(model_path, img_size, alpha, minimalistic)
    return {"path": str(path), "alpha": float(alpha), "minimalistic": bool(minimalistic), "config_source": source,
            "cache": cache}


def _head_cost(full: dict, bb: dict, head_macs: int) -> dict:
    """ratio = full / backbone (p50 latency per thread count, and MACs); pct = the heads' share of the full model."""
    timings = []
    for f, b in zip(full["timings"], bb["timings"], strict=True):
        ratio = f["p50_ms"] / b["p50_ms"] if b["p50_ms"] > 0 else float("inf")
        timings.append({"threads": f["threads"], "ratio": ratio, "pct": 100.0 * (1.0 - 1.0 / ratio)})
    mac_ratio = full["macs"] / bb["macs"] if bb["macs"] else float("inf")
    return {"timings": timings, "mac_ratio": mac_ratio, "mac_pct": 100.0 * (1.0 - 1.0 / mac_ratio),
            "head_macs": head_macs,
            # the bench backbone must be the one inside the model: the MACs of the model minus its heads
            "backbone_matches": bb["macs"] == full["macs"] - head_macs}


# ---------------------------------------------------------------- report
_COLUMNS = ("model", "threads", "load ms", "first ms", "p50 ms", "p90 ms", "p99 ms", "img/s")


def format_bench(result: dict) -> str:
    """A fixed-width table (one row per model and thread count) and the head cost below it."""
    full = result["full"]
    lines = [f"bench {Path(result['model']).name}: {result['img_size']}x{result['img_size']} {result['input_dtype']}, "
             f"{full['bytes'] / 1e6:.2f} MB, {full['macs'] / 1e6:.2f} M MACs, engine {result['engine']}, "
             f"{result['runs']} runs after {result['warmup']} warm-up runs",
             "{:<10}{:>8}{:>10}{:>10}{:>9}{:>9}{:>9}{:>10}".format(*_COLUMNS)]
    parts = [("full", full)] + ([("backbone", result["backbone"])] if result["backbone"] else [])
    for name, figures in parts:
        for t in figures["timings"]:
            lines.append(f"{name:<10}{t['threads']:>8}{t['load_ms']:>10.1f}{t['warmup_ms']:>10.2f}{t['p50_ms']:>9.2f}"
                         f"{t['p90_ms']:>9.2f}{t['p99_ms']:>9.2f}{t['images_per_s']:>10.1f}")
    bb, head = result["backbone"], result["head"]
    if bb and head:
        lines.append(f"backbone: alpha {bb['alpha']:g}{', minimalistic' if bb['minimalistic'] else ''} "
                     f"({bb['config_source']}), {bb['bytes'] / 1e6:.2f} MB, {bb['macs'] / 1e6:.2f} M MACs, "
                     f"cache {bb['cache']}: {bb['path']}")
        per_thread = ", ".join(f"{t['ratio']:.3f} ({t['pct']:.1f}% heads) at {t['threads']} thread"
                               f"{'s' if t['threads'] != 1 else ''}" for t in head["timings"])
        lines.append(f"head cost: latency full/backbone p50 {per_thread}")
        lines.append(f"head cost: MACs full/backbone {head['mac_ratio']:.3f} ({head['mac_pct']:.1f}% heads, "
                     f"{head['head_macs']:,} MACs in the heads)")
        if not head["backbone_matches"]:
            lines.append("warning: the bench backbone's MACs differ from the model's minus its heads: "
                         "pass alpha/minimalistic explicitly")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """The result as JSON (for `--json`)."""
    return json.dumps(result, indent=2)
