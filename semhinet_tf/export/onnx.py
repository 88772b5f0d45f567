"""Secondary export: ONNX (tf2onnx) from the int8 .tflite or from a Keras run, and an onnxruntime runner.

Both paths give one input `image` (N or 1, S, S, 1) of raw grey pixels 0..255 and float32 softmax
outputs named after the heads (h1..h5), so the same frames feed every format. The .tflite path keeps
the uint8 input (a QDQ graph that onnxruntime runs with integer kernels) and dequantizes the uint8
outputs inside the graph with the .tflite's own output scales. The model's JSON contract travels in
the ONNX metadata_props under the same key as in the .tflite, and the graph's own digest (sha256 of the
serialized graph: weights and nodes, not the metadata) under DIGEST_KEY, checked when OnnxModel loads it.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.contract import (
    DIGEST_ALGORITHM,
    Contract,
    ModelRefusedError,
    default_contract,
    load_tflite_contract,
    validate_contract,
)
from semhinet_tf.export.tflite_meta import CONTRACT_NAME, contract_json, read_model

EXPORT_KEY = "semhinet_export"  # metadata: where the graph came from (the contract stays byte-for-byte the .tflite's)
DIGEST_KEY = "semhinet_digest"  # metadata: {"algorithm": "sha256", "value": hex} of the serialized graph
INPUT_NAME = "image"
BATCH_DIM = "N"
_ONNX_INT = {"UINT8": 2, "INT8": 3}  # onnx.TensorProto element types
_NP_OF_ORT = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(float)": np.float32}


# ---------------------------------------------------------------- export
def export_onnx(model_path: str | Path, out: str | Path, opset: int = 17, overwrite: bool = False,
                tflite_tables: bool = True, progress: bool = True) -> dict:
    """A .tflite (int8 QDQ graph) or a run directory / .keras / .h5 (float or QAT) -> .onnx, written atomically.

    From a .tflite, `tflite_tables` holds int8 activations as uint8 and replaces the int8 hard-swish and add
    that onnxruntime rounds differently by tables taken from the TFLite interpreter (`onnx_tables`), so
    onnxruntime gives TFLite's answers; False keeps tf2onnx's graph as it is, for ONNX toolchains that fuse
    its QDQ patterns themselves.
    Returns what was written: path, bytes, source ("tflite" | "keras"), model file, opset, input, outputs,
    whether a contract was embedded, and (from a .tflite) what was tabulated. `progress`: the elapsed time of
    each step on stderr (tf2onnx reports nothing while it converts).
    """
    from semhinet_tf.progress import step

    model_path, out = Path(model_path), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (use overwrite=True / --overwrite)")
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: model file not found")
    tables = None
    if model_path.suffix == ".tflite":
        checked = load_tflite_contract(model_path.read_bytes(), model_path, allow_missing=True)
        contract = checked.raw if checked.present else None
        with step("converting to ONNX (tf2onnx)", enabled=progress):
            proto, source = _from_tflite(model_path, opset), "tflite"
        model_file = model_path
        if tflite_tables:
            from semhinet_tf.export.onnx_tables import match_tflite

            with step("matching TFLite's rounding (tables)", enabled=progress):
                tables = match_tflite(proto, model_path).as_dict()
    elif model_path.is_dir() or model_path.suffix in (".keras", ".h5"):
        with step("converting to ONNX (tf2onnx)", enabled=progress):
            proto, contract, model_file = _from_keras(model_path, opset)
        source = "keras"
    else:
        raise ValueError(f"{model_path}: cannot export to ONNX (expected a .tflite, .keras, .h5 or run directory)")
    _name_batch_dims(proto)
    export = {"source": source, "model": model_file.name, "outputs": "float32 probabilities"}
    if source == "tflite":
        export["match_tflite"] = ({"tables_from": "TFLite interpreter",
                                   **{k: tables[k] for k in ("uint8_tensors", "tabulated", "exact", "left")}}
                                  if tables else "no: tf2onnx's QDQ graph as written (--plain-qdq)")
    _set_metadata(proto, contract, export)
    _check(proto, model_path)
    _write_atomic(proto, out)
    graph = proto.graph
    return {"path": str(out), "bytes": out.stat().st_size, "source": source, "model": str(model_file), "opset": opset,
            "input": _value_info(graph.input[0]), "outputs": [o.name for o in graph.output],
            "contract": contract is not None, "tables": tables}


def _from_tflite(path: Path, opset: int):
    """tf2onnx's tflite front end, then names by the signature (never by position) and float outputs."""
    import tf2onnx

    model = read_model(path)
    if not model.signatures:
        raise ValueError(f"{path}: model has no signature; convert it with `semhinet convert`")
    sig = model.signatures.get("serving_default") or next(iter(model.signatures.values()))
    if sig.subgraph_index != 0:
        raise ValueError(f"{path}: signature '{sig.key}' is not on the main subgraph")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter deprecation notice inside tf2onnx
        proto, _ = tf2onnx.convert.from_tflite(str(path), opset=opset)
    graph = proto.graph
    in_name = INPUT_NAME if INPUT_NAME in sig.inputs else next(iter(sig.inputs))
    _rename(graph, _graph_name(graph.input, model.tensors[sig.inputs[in_name]].name, path), INPUT_NAME)
    heads = list(sig.outputs)
    for head in heads:
        tensor = model.tensors[sig.outputs[head]]
        _name_output(graph, _graph_name(graph.output, tensor.name, path), head, tensor)
    _order_outputs(graph, heads)
    return proto


def _graph_name(values, tensor_name: str, path: Path) -> str:
    names = [v.name for v in values]
    if tensor_name not in names:
        raise ValueError(f"{path}: tf2onnx did not keep tensor '{tensor_name}' as a graph input/output ({names})")
    return tensor_name


def _rename(graph, old: str, new: str) -> None:
    """Rename a tensor everywhere it appears (nodes, graph inputs/outputs, value_info)."""
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.name == old:
            v.name = new


def _name_output(graph, old: str, head: str, tensor) -> None:
    """Output `head` as float32: a DequantizeLinear with the .tflite's scale/zero point for integer outputs."""
    from onnx import TensorProto, helper

    if tensor.dtype not in _ONNX_INT or tensor.quantization is None:
        _rename(graph, old, head)
        return
    q = tensor.quantization
    if q.per_channel:
        raise ValueError(f"output '{head}' is quantized per channel; expected one scale")
    raw = f"{head}_quantized"
    _rename(graph, old, raw)
    zp_dtype = np.uint8 if tensor.dtype == "UINT8" else np.int8
    graph.initializer.extend([
        helper.make_tensor(f"{head}_scale", TensorProto.FLOAT, [], [float(q.scale[0])]),
        helper.make_tensor(f"{head}_zero_point", _ONNX_INT[tensor.dtype], [], [int(zp_dtype(q.zero_point[0]))]),
    ])
    graph.node.append(helper.make_node("DequantizeLinear", [raw, f"{head}_scale", f"{head}_zero_point"], [head],
                                       name=f"{head}_dequantize"))
    for v in graph.output:
        if v.name == raw:
            v.name = head
            v.type.tensor_type.elem_type = TensorProto.FLOAT


def _order_outputs(graph, names: list[str]) -> None:
    rank = {n: i for i, n in enumerate(names)}
    outs = sorted(graph.output, key=lambda v: rank.get(v.name, len(rank)))
    del graph.output[:]
    graph.output.extend(outs)


def _from_keras(path: Path, opset: int):
    """A run directory's (or file's) Keras model, traced with a dynamic batch, -> (proto, contract, model file)."""
    import tensorflow as tf
    import tf2onnx

    from semhinet_tf.model.io import load_model, resolve_model_file
    from semhinet_tf.workflow import find_run_dir

    model_file = resolve_model_file(path)
    model = load_model(model_file)
    img_size = int(model.inputs[0].shape[1])
    fn = _keras_function(model)
    spec = [tf.TensorSpec([None, img_size, img_size, 1], tf.float32, name=INPUT_NAME)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    names = _keras_output_names(model)
    got = [o.name for o in proto.graph.output]
    if sorted(got) != sorted(names) or [i.name for i in proto.graph.input] != [INPUT_NAME]:
        raise ValueError(f"{model_file}: tf2onnx named the graph {[i.name for i in proto.graph.input]} -> {got}, "
                         f"expected {INPUT_NAME} -> {names}")
    _order_outputs(proto.graph, names)
    run_dir = find_run_dir(Path(path)) or find_run_dir(model_file)
    quantized = any(type(layer).__name__.startswith("QuantizeWrapper") for layer in model.layers)
    contract = _keras_contract(run_dir, img_size, quantized) if run_dir is not None else None
    return proto, contract, model_file


def _keras_output_names(model) -> list[str]:
    return [n.removeprefix("quant_") for n in model.output_names]


def _keras_function(model):
    """Like export.tflite.serving_function, but with a free batch dimension (onnxruntime batches on the host)."""
    import tensorflow as tf

    names = list(model.output_names)

    @tf.function
    def serve(image):
        out = model(image, training=False)
        if not isinstance(out, dict):
            out = dict(zip(names, out if isinstance(out, (list, tuple)) else [out], strict=True))
        return {k.removeprefix("quant_"): tf.identity(v) for k, v in out.items()}

    return serve


def _keras_contract(run_dir: Path, img_size: int, quantized: bool) -> dict:
    """The contract `semhinet convert` would embed, adjusted for a float32-input, dynamic-batch graph."""
    from semhinet_tf.export.convert import _validation_threshold, run_contract

    config = json.loads((run_dir / "config.json").read_text())
    taxonomy = json.loads((run_dir / "taxonomy.json").read_text())
    granularity = config.get("train", {}).get("granularity", "per-channel")
    quantization = {"source": "qat", "granularity": granularity, "io": "float32", "float_heads": False} \
        if quantized else None
    # no file digest in the contract: the ONNX graph carries its own (DIGEST_KEY)
    return run_contract(run_dir, config, taxonomy, img_size=img_size, io_type="float32", quantization=quantization,
                        review_threshold=_validation_threshold(run_dir), batch=-1, digest=False)


def _name_batch_dims(proto) -> None:
    """tf2onnx calls a free batch dimension 'unk__123'; call it N on the graph's inputs and outputs."""
    for v in list(proto.graph.input) + list(proto.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = BATCH_DIM


def _set_metadata(proto, contract: dict | None, export: dict) -> None:
    from onnx import helper

    props = {EXPORT_KEY: json.dumps(export),
             DIGEST_KEY: json.dumps({"algorithm": DIGEST_ALGORITHM, "value": graph_digest(proto.graph)})}
    if contract is not None:
        props[CONTRACT_NAME] = contract_json(contract).decode("utf-8")
    helper.set_model_props(proto, props)


def graph_digest(graph) -> str:
    """sha256 of the serialized GraphProto (weights and nodes; the model's metadata lies outside it)."""
    import hashlib

    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


def _check(proto, source: Path) -> None:
    """Refuse a graph onnx or onnxruntime cannot load (tf2onnx converts with continue_on_error)."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(proto)
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime raise many unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{source}: the converted ONNX graph does not load ({first})") from exc


def _write_atomic(proto, out: Path) -> None:
    import onnx

    from semhinet_tf.artifacts.files import atomic_save

    atomic_save(out, lambda tmp: onnx.save(proto, str(tmp)))


def _value_info(v) -> dict:
    from onnx import helper

    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
    return {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            "shape": dims}


# ---------------------------------------------------------------- runtime
class OnnxModel:
    """An .onnx model on onnxruntime (CPU); size, dtype and input quantization come from the graph."""

    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 64, warn=None):
        import onnxruntime as ort

        self.path = Path(path)
        self._warn = warn or (lambda msg: print(msg, file=sys.stderr))
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
        self.spec = self._read_contract()
        self.contract = self.spec.raw if self.spec.present else None
        self._verify_digest()
        self._setup_io()
        self.batch_size = batch_size if self.dynamic_batch else self.input_shape[0]
        self._setup_context()

    def _read_contract(self) -> Contract:
        """The validated contract (ContractError naming the field otherwise); defaults for a contract-less
        export (from a bare .keras file, which knows no run)."""
        text = self.session.get_modelmeta().custom_metadata_map.get(CONTRACT_NAME)
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

        text = self.session.get_modelmeta().custom_metadata_map.get(DIGEST_KEY)
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

    def _setup_context(self) -> None:
        """Taxonomy and preprocessing from the contract, as the board runtime does (size from the graph)."""
        self.taxonomy = self.spec.taxonomy()
        self.preprocess = self.spec.preprocessing(self.input_size)

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

    def predict_frames(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """(N, S, S) uint8 frames -> dict of (N, k) float32 head probabilities (looped for batch-1 graphs)."""
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.shape[1:] != (self.input_size, self.input_size):
            raise ValueError(f"{self.path}: frames have shape {frames.shape}, "
                             f"expected (N, {self.input_size}, {self.input_size})")
        if not len(frames):
            return {o.name: np.zeros((0, *o.shape[1:]), np.float32) for o in self.session.get_outputs()}
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
