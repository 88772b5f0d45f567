"""Secondary export: ONNX (tf2onnx) from the int8 .tflite or from a Keras run (run by engines/onnx.py).

Both paths give one input `image` (N or 1, S, S, 1) of raw grey pixels 0..255 and float32 softmax
outputs named after the heads (h1..h5), so the same frames feed every format. The .tflite path keeps
the uint8 input (a QDQ graph that onnxruntime runs with integer kernels) and dequantizes the uint8
outputs inside the graph with the .tflite's own output scales. The model's JSON contract travels in
the ONNX metadata_props under the same key as in the .tflite, and the graph's own digest (sha256 of the
serialized graph: weights and nodes, not the metadata) under DIGEST_KEY, checked when the ONNX engine
(semhinet_tf/engines/onnx.py) loads it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.contract import (
    DIGEST_ALGORITHM,
    load_tflite_contract,
)
from semhinet_tf.artifacts.run import CONFIG, TAXONOMY
from semhinet_tf.export.tflite_meta import CONTRACT_NAME, contract_json, read_model

EXPORT_KEY = "semhinet_export"  # metadata: where the graph came from (the contract stays byte-for-byte the .tflite's)
DIGEST_KEY = "semhinet_digest"  # metadata: {"algorithm": "sha256", "value": hex} of the serialized graph
INPUT_NAME = "image"
BATCH_DIM = "N"
_ONNX_INT = {"UINT8": 2, "INT8": 3}  # onnx.TensorProto element types


# ---------------------------------------------------------------- export
def export_onnx(model_path: str | Path, out: str | Path, opset: int = 17, overwrite: bool = False,
                tflite_tables: bool = True, progress: bool = True) -> dict:
    """A .tflite (int8 QDQ graph) or a run directory / .keras / .h5 (float or QAT) -> .onnx, written atomically.

    From a .tflite, `tflite_tables` (the default) holds int8 activations and weights as uint8 and replaces the
    int8 hard-swish and add that onnxruntime rounds differently by tables taken from the TFLite interpreter
    (`onnx_tables`): onnxruntime then gives the .tflite's outputs bit for bit (800/800 new frames for the
    quickstart's model, 2026-12-07; 800/800 of 2026-11-30's 160 px model). Without it, tf2onnx's QDQ graph as
    written (97-99% of head verdicts the same on those frames).
    Returns what was written: path, bytes, source ("tflite" | "keras"), model file, opset, input, outputs,
    whether a contract was embedded, and (from a .tflite) what was tabulated. `progress`: the elapsed time of
    each step on stderr (tf2onnx reports nothing while it converts).
    """
    from semhinet_tf.artifacts.files import check_outputs
    from semhinet_tf.artifacts.run import model_inputs
    from semhinet_tf.progress import step

    model_path, out = Path(model_path), Path(out)
    check_outputs([out], overwrite, inputs=model_inputs(model_path))
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
        kept = ("uint8_tensors", "uint8_weights", "tabulated", "exact", "left")
        export["match_tflite"] = ({"tables_from": "TFLite interpreter", **{k: tables[k] for k in kept}}
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

    from semhinet_tf.engines.base import find_run_dir
    from semhinet_tf.model.io import load_model, resolve_model_file

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
    from semhinet_tf.artifacts.run import validation_threshold
    from semhinet_tf.export.convert import run_contract

    config = json.loads((run_dir / CONFIG).read_text())
    taxonomy = json.loads((run_dir / TAXONOMY).read_text())
    granularity = config.get("train", {}).get("granularity", "per-channel")
    quantization = {"source": "qat", "granularity": granularity, "io": "float32", "float_heads": False} \
        if quantized else None
    # no file digest in the contract: the ONNX graph carries its own (DIGEST_KEY)
    return run_contract(run_dir, config, taxonomy, img_size=img_size, io_type="float32", quantization=quantization,
                        review_threshold=validation_threshold(run_dir), batch=-1, digest=False)


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
