"""Board runtime: classify SEM images with the int8 .tflite, using numpy, Pillow and tflite_runtime only.

Everything the model needs to know (taxonomy, input size and type, preprocessing, review threshold)
is read from the contract embedded in the .tflite, so the file alone is the deployment. The contract is
validated and the file's digest checked before the interpreter sees a byte (artifacts/contract.py): a
damaged or modified file, a malformed contract or a missing one is refused (ModelRefusedError). Input size,
dtype and quantization come from the interpreter, never from constants. No TensorFlow here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.contract import (
    DEFAULT_REVIEW_THRESHOLD,
    Contract,
    ModelRefusedError,
    default_contract,
    load_tflite_contract,
    threshold_for_views,
)
from semhinet_tf.engines.base import Engine, iter_image_paths, warn_stderr

__all__ = ["DEFAULT_REVIEW_THRESHOLD", "KERNELS", "BoardModel", "contract_review_threshold", "iter_image_paths"]
# The interpreter's CPU kernels. "default" is what the interpreter picks (XNNPACK in ai_edge_litert; not
# for int8 in tflite_runtime 2.14); "builtin" (TFLite's own optimized kernels) is for diagnosis: int8
# kernels round differently, so near-tie frames can change verdict between them
# (experiments/results/onnx_agreement.md), and the NPU is one more such implementation.
KERNELS = {"default": None, "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"}
# TFLite's reference kernels: for experiments only, not offered to users, since they abort the process (no
# Python error) on some int8 models (seen with ai_edge_litert 2.3 on a post-training-quantized model).
_EXPERIMENT_KERNELS = {**KERNELS, "reference": "BUILTIN_REF"}


def _interpreter_module(for_delegate: bool = True):
    """tflite_runtime on the board; ai_edge_litert (its current name) on a host.

    With an NPU delegate, tflite_runtime comes first (vendor delegates are built against the vendor's
    tflite_runtime). On the CPU, ai_edge_litert comes first where both are installed: it runs int8 models
    through XNNPACK, and tflite_runtime 2.14 does not (about 6x slower, see docs/deployment.md)."""
    names = ["tflite_runtime.interpreter", "ai_edge_litert.interpreter"]
    for name in names if for_delegate else names[::-1]:
        try:
            module = __import__(name, fromlist=["Interpreter"])
            return module, name.split(".")[0]
        except ImportError:
            continue
    # No fallback to TensorFlow's own tf.lite: the board runtime must behave the same wherever it runs, and
    # TensorFlow is what the board does not have.
    raise RuntimeError("no TFLite interpreter: pip install tflite-runtime (board) or ai-edge-litert (host)")


def load_delegate(module, path: str | None, warn=print, required: bool = False):
    """The external delegate (e.g. NXP's libvx_delegate.so), or None with a clear message and CPU fallback.

    `required`: raise ValueError instead, for a line where a CPU fallback would miss its latency budget."""
    if not path:
        return None

    def give_up(reason: str) -> None:
        if required:
            raise ValueError(f"cannot load delegate {path} ({reason}) and --require-delegate is set")
        warn(f"warning: cannot load delegate {path} ({reason}); running on the CPU")

    if not Path(path).is_file():
        give_up("no such file")
        return None
    # A library that fails to load leaves a half-built Delegate whose __del__ then raises; Python would print
    # that as "Exception ignored in ..." with a traceback. The warning below says all there is to say.
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        return module.load_delegate(path)
    except (ValueError, OSError, RuntimeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        import gc

        gc.collect()
        sys.unraisablehook = hook
    # only once the failed attempt is collected: an error raised inside the except clause would keep the
    # half-built object alive (through its traceback) past the silenced hook
    give_up(reason)
    return None


def op_resolver(module, kernels: str):
    """The interpreter argument that selects `kernels` (a KERNELS key), or None for the default."""
    if kernels not in _EXPERIMENT_KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    if _EXPERIMENT_KERNELS[kernels] is None:
        return None
    enum = getattr(module, "OpResolverType", None) or getattr(getattr(module, "experimental", None),
                                                              "OpResolverType", None)
    if enum is None:
        raise ValueError(f"this TFLite interpreter cannot select {kernels} kernels")
    return getattr(enum, _EXPERIMENT_KERNELS[kernels])


# Share of the per-image budget test-time views may spend on inference; the rest is for reading and decoding the
# image, writing the result and the jitter of a busy board.
VIEWS_BUDGET_SHARE = 0.8


def views_for_budget(offered: list[int], infer_ms: float, budget_ms: float,
                     share: float = VIEWS_BUDGET_SHARE) -> int:
    """The largest offered view count whose inferences (count x infer_ms) fit `share` of the per-image budget;
    1 when even one inference does not (the caller says so)."""
    fitting = [n for n in offered if n * infer_ms <= share * budget_ms]
    return max(fitting, default=1)


def contract_review_threshold(contract: Contract | Mapping, views: int = 1) -> float:
    """The review threshold a model's contract (Contract or dict) holds for this many test-time views (else its
    one-view one)."""
    return threshold_for_views(contract, views)


class BoardModel(Engine):
    """The TFLite engine: one .tflite model with its contract, on the board and on the host (engines.load_model).

    `predict` and `classify` come from Engine; this class runs the interpreter one frame at a time (`run`), as
    the board does, and streams `classify` one image at a time (latency per image, not throughput)."""

    format = "tflite"
    classify_batch = 1
    no_views_hint = ("converted before models recorded their test-time views; convert the run again "
                     "(`semhinet convert RUN --overwrite`) to use --views")

    def __init__(self, path: str | Path, threads: int | None = None, delegate: str | None = None,
                 review_threshold: float | None = None, warn=None, kernels: str = "default", views: int = 1,
                 classifier: bool = True, require_delegate: bool = False, allow_no_contract: bool = False,
                 progress: bool = False):
        """`views` > 1 scores each image as that many flips/rotations of itself (one inference each) and
        averages them (semhinet_tf.data.views); only those the model's training augmentation covered.
        `classifier=False` skips the check that the outputs are the taxonomy's heads and the contract (to time a
        bare backbone); `require_delegate` makes a delegate that cannot be loaded an error instead of a CPU
        fallback; `allow_no_contract` runs a .tflite without a contract on the defaults (and says which);
        `progress` shows a bar on stderr for long `predict` calls (host only: it needs tqdm)."""
        self.path = Path(path)
        self.progress = progress
        warn = warn or warn_stderr
        try:
            content = self.path.read_bytes()
        except OSError as exc:
            raise ModelRefusedError(f"{self.path}: cannot read model ({exc.strerror})") from None
        if classifier:
            spec = load_tflite_contract(content, self.path, allow_missing=allow_no_contract, warn=warn)
        else:
            spec = default_contract()
        module, self.engine = _interpreter_module(for_delegate=bool(delegate))
        self.delegate = load_delegate(module, delegate, warn, required=require_delegate)
        kwargs = {"model_content": content, "num_threads": threads}
        resolver = op_resolver(module, kernels)
        if resolver is not None:
            kwargs["experimental_op_resolver_type"] = resolver
        if self.delegate is not None:
            kwargs["experimental_delegates"] = [self.delegate]
        try:
            self.interpreter = module.Interpreter(**kwargs)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelRefusedError(f"{self.path}: not a loadable TFLite model ({str(exc).splitlines()[0]})") from exc
        self._setup_io(spec, classifier)
        self._use_contract(spec, review_threshold, views, warn)  # the model file decides the input size

    def time_inference(self, repeats: int = 10) -> float:
        """Median milliseconds of one inference (one view) on a mid-grey frame, after a warm-up."""
        if self.warmup_ms is None:
            self.warm_up()
        frame = np.full((self.input_size, self.input_size), 128, np.uint8)
        times = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            self.run(frame)
            times.append((time.perf_counter() - t) * 1000)
        return float(np.median(times))

    def auto_views(self, budget_ms: float, repeats: int = 10) -> tuple[int, float]:
        """Measure one inference here and use the most views that fit `budget_ms` (see views_for_budget).
        Returns (views chosen, median ms of one inference)."""
        infer_ms = self.time_inference(repeats)
        count = views_for_budget(self.offered_views(), infer_ms, budget_ms)
        self.use_views(count)
        return count, infer_ms

    def _setup_io(self, spec: Contract, classifier: bool = True) -> None:
        """Inputs and outputs from the interpreter; a damaged model's interpreter error names the file
        (found by tests/test_fuzz.py: an out-of-range tensor index surfaced as a bare ValueError)."""
        try:
            self._read_io(spec, classifier)
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            if isinstance(exc, ValueError) and text.startswith(f"{self.path}: "):
                raise
            raise ValueError(f"{self.path}: not a loadable TFLite model ({text})") from exc

    def _read_io(self, spec: Contract, classifier: bool) -> None:
        signatures = self.interpreter.get_signature_list()
        if not signatures:
            raise ValueError(f"{self.path}: model has no signature; convert it with `semhinet convert`")
        key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
        self.runner = self.interpreter.get_signature_runner(key)
        inputs = self.runner.get_input_details()
        self.input_name = "image" if "image" in inputs else next(iter(inputs))
        detail = inputs[self.input_name]
        self.input_shape = tuple(int(d) for d in detail["shape"])
        if len(self.input_shape) != 4 or self.input_shape[0] != 1 or self.input_shape[1] != self.input_shape[2] \
                or self.input_shape[3] != 1:
            raise ValueError(f"{self.path}: input shape {list(self.input_shape)}, expected one grey square frame "
                             f"[1, S, S, 1]; not a model written by `semhinet convert`")
        self.input_size = self.input_shape[1]
        self.input_dtype = np.dtype(detail["dtype"])
        self.input_quant = detail.get("quantization", (0.0, 0))
        self.output_details = self.runner.get_output_details()
        self.output_names = list(self.output_details)
        if classifier:
            spec.taxonomy().check_outputs(self.output_names, str(self.path))

    # ---------------------------------------------------------------- inference
    def _to_input(self, frame: np.ndarray) -> np.ndarray:
        x = frame.reshape(self.input_shape)
        if self.input_dtype in (np.uint8, np.int8):
            scale, zero = self.input_quant
            info = np.iinfo(self.input_dtype)
            q = np.round(x.astype(np.float32) / scale + zero)
            return np.clip(q, info.min, info.max).astype(self.input_dtype)
        return x.astype(self.input_dtype)

    def _dequantize(self, name: str, value: np.ndarray) -> np.ndarray:
        detail = self.output_details[name]
        scale, zero = detail.get("quantization", (0.0, 0))
        if np.issubdtype(value.dtype, np.integer) and scale:
            return (value.astype(np.float32) - zero) * scale
        return value.astype(np.float32)

    def run(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        """One decoded uint8 frame (S, S) -> head probabilities keyed by output name (h1..h5)."""
        out = self.runner(**{self.input_name: self._to_input(frame)})
        return {name: self._dequantize(name, v).reshape(-1) for name, v in out.items()}

    def _infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """The interpreter takes one frame (batch 1): frames run one after another."""
        rows = [self.run(f) for f in frames]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
