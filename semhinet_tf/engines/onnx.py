"""The ONNX engine: an .onnx written by `semhinet export-onnx`, on onnxruntime (CPU).

Size, dtype and input quantization come from the graph; taxonomy, preprocessing, views and review thresholds
from the contract in its metadata (validated), else from the run directory it sits in, else the defaults. The
graph's digest (export/onnx.py DIGEST_KEY) is checked before it runs: a damaged or modified file is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.contract import (
    DIGEST_ALGORITHM,
    Contract,
    ModelRefusedError,
    default_contract,
    validate_contract,
)
from semhinet_tf.engines.base import Engine, find_run_dir, run_settings, warn_stderr
from semhinet_tf.export.onnx import DIGEST_KEY, graph_digest
from semhinet_tf.export.tflite_meta import CONTRACT_NAME

_NP_OF_ORT = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(float)": np.float32}


class OnnxEngine(Engine):
    """An .onnx model on onnxruntime; a fixed-batch graph is fed in chunks of its batch (the last one padded)."""

    format = "onnx"
    no_views_hint = "its contract records no test-time views; export it again from a converted run"

    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 64,
                 review_threshold: float | None = None, views: int = 1, progress: bool = False, warn=None):
        import onnxruntime as ort

        self.path = Path(path)
        self.progress = progress
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: model file not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have no common base
            reason = str(exc).strip().splitlines()[0]
            raise ModelRefusedError(f"{self.path}: not a loadable ONNX model ({reason})") from exc
        self._meta = self.session.get_modelmeta().custom_metadata_map
        spec = self._read_contract()
        self._setup_io()
        self.batch_size = batch_size if self.dynamic_batch else self.input_shape[0]
        self._warn = warn or warn_stderr
        self._verify_digest()
        self._retype_old_weights(opts)
        self.run_dir = None
        if not spec.present:  # a contract-less export (from a bare .keras) that sits in its run
            self.run_dir = find_run_dir(self.path)
            spec = run_settings(self.run_dir) if self.run_dir is not None else spec
        spec.taxonomy().check_outputs(self.output_names, str(self.path))
        self._use_contract(spec, review_threshold, views, warn)

    def _retype_old_weights(self, opts) -> None:
        """A tables export written before 2026-12-07 holds uint8 activations but int8 weights: onnxruntime's fused
        U8S8 kernels saturate on x86 CPUs without VNNI (export/onnx_tables.py) and its answers drift from the
        .tflite's. Its weights are held as uint8 in memory (the same values; the file is left as it is, its
        digest was checked first) and the user is told to export again."""
        import onnx
        import onnxruntime as ort

        from semhinet_tf.export.onnx import EXPORT_KEY
        from semhinet_tf.export.onnx_tables import uint8_weights

        try:
            match = json.loads(self._meta.get(EXPORT_KEY, "{}")).get("match_tflite")
        except (json.JSONDecodeError, AttributeError):
            return
        if not isinstance(match, dict) or not match.get("uint8_tensors") or "uint8_weights" in match:
            return
        proto = onnx.load(str(self.path))
        if uint8_weights(proto):
            self.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            self._warn(f"note: {self.path}: exported before its weights were held as uint8, which on x86 CPUs "
                       f"without VNNI made onnxruntime's answers differ from the .tflite's; its weights are held as "
                       f"uint8 in memory (the same values): export it again to skip this")

    def _read_contract(self) -> Contract:
        """The validated contract (ContractError naming the field otherwise); defaults for a contract-less
        export (from a bare .keras file, which knows no run)."""
        text = self._meta.get(CONTRACT_NAME)
        if text is None:
            return default_contract()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelRefusedError(f"{self.path}: metadata '{CONTRACT_NAME}' is not JSON ({exc})") from None
        return validate_contract(raw, str(self.path))

    def _verify_digest(self) -> None:
        """Refuse a graph whose weights or nodes changed since export; warn for an export that carries no digest.
        (The contract's own digest, if any, is the source .tflite's and does not apply to this file.)"""
        import onnx

        text = self._meta.get(DIGEST_KEY)
        if text is None:
            self._warn(f"warning: {self.path}: no weights digest (exported before models carried one; export again "
                       f"to detect a damaged file)")
            return
        try:
            want = json.loads(text)["value"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelRefusedError(f"{self.path}: metadata '{DIGEST_KEY}' is malformed; export the model "
                                    f"again") from None
        if graph_digest(onnx.load(str(self.path), load_external_data=False).graph) != want:
            raise ModelRefusedError(f"{self.path}: damaged or modified: its weights digest does not match its "
                                    f"metadata ({DIGEST_ALGORITHM} {str(want)[:12]}...); copy the file again or "
                                    f"export again")

    def _setup_io(self) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input image, found {[i.name for i in inputs]}")
        inp = inputs[0]
        shape = list(inp.shape)
        if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 1:
            raise ValueError(f"{self.path}: input '{inp.name}' has shape {shape}, expected (N, S, S, 1)")
        if inp.type not in _NP_OF_ORT:
            raise ValueError(f"{self.path}: input '{inp.name}' has type {inp.type}, expected uint8, int8 or float")
        self.input_name = inp.name
        self.dynamic_batch = not isinstance(shape[0], int)
        self.input_shape = (1 if self.dynamic_batch else shape[0], shape[1], shape[2], 1)
        self.input_size = int(shape[1])
        self.input_dtype = np.dtype(_NP_OF_ORT[inp.type])
        self.input_quant = self._input_quantization() if self.input_dtype != np.float32 else (1.0, 0)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _input_quantization(self) -> tuple[float, int]:
        """(scale, zero point) of the DequantizeLinear that reads the integer input; identity if there is none."""
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(self.path), load_external_data=False).graph
        consts = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] == self.input_name and node.input[1] in consts:
                scale = float(numpy_helper.to_array(consts[node.input[1]]).reshape(-1)[0])
                zero = consts.get(node.input[2]) if len(node.input) > 2 else None
                return scale, int(numpy_helper.to_array(zero).reshape(-1)[0]) if zero is not None else 0
        return 1.0, 0

    def _to_input(self, frames: np.ndarray) -> np.ndarray:
        x = frames.reshape(len(frames), self.input_size, self.input_size, 1)
        if self.input_dtype == np.float32:
            return x.astype(np.float32)
        scale, zero = self.input_quant
        if abs(scale - 1.0) < 0.01 and zero == 0 and self.input_dtype == np.uint8:
            return x.astype(np.uint8)
        info = np.iinfo(self.input_dtype)
        q = np.round(x.astype(np.float32) / scale + zero)
        return np.clip(q, info.min, info.max).astype(self.input_dtype)

    def _infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for i in range(0, len(frames), self.batch_size):
            for name, value in self._run(frames[i:i + self.batch_size]).items():
                parts[name].append(value)
        return {n: np.concatenate(v) for n, v in parts.items()}

    def _run(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        batch = self._to_input(chunk)
        if not self.dynamic_batch and len(batch) < self.batch_size:  # a fixed batch > 1: pad the last one
            batch = np.concatenate([batch, np.zeros((self.batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        values = self.session.run(self.output_names, {self.input_name: batch})
        return {name: np.asarray(v, np.float32).reshape(len(batch), -1)[:len(chunk)]
                for name, v in zip(self.output_names, values, strict=True)}
