"""Make onnxruntime compute the int8 ONNX graph (tf2onnx's QDQ export of a .tflite) exactly as TFLite does.

Operator by operator (experiments/results/onnx_operators.md), onnxruntime and TFLite's XNNPACK kernels differ in
two ways on our models:
- tf2onnx writes an int8 HARD_SWISH or ADD as DequantizeLinear -> float op -> QuantizeLinear, which onnxruntime
  computes in float and rounds once where TFLite uses fixed point: one int8 step apart on about 1 element in
  5,000. An elementwise int8 operator is a function of its input code(s) alone, so it can be tabulated exactly:
  run the operator, cut out of the .tflite as a one-operator model, on every input code (256 for one input,
  65,536 for two), and replace DequantizeLinear -> op -> QuantizeLinear by Cast -> Gather.
- On x86, onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into an integer QLinearConv only for
  uint8 activations; with int8 ones most convolutions run in float, which breaks float32 ties the other way
  from XNNPACK (about 1 output in 3 million). Storing every int8 activation as uint8 (zero point + 128, exact)
  lets it fuse them, which also makes it faster.
- Those fused kernels multiply uint8 activations by int8 weights (U8S8); on an x86 CPU without VNNI (AVX2 or
  AVX-512 alone, e.g. the AMD EPYC the project measures on) MLAS sums pairs of those products in int16 and
  saturates (onnxruntime PR #12088 describes it): on 2026-12-07's quickstart model the first convolution's outputs
  were up to 33 codes off on 8% of its elements, and verdicts differed on 1 frame in 25. Its
  `session.x64quantprecision` option, made for this, fails to initialise our graphs in onnxruntime 1.32.
  Holding the weights as uint8 too (zero point + 128, exact) makes it use U8U8 kernels, which do not saturate.
Together (`match_tflite`) the ONNX graph gave the .tflite's outputs bit for bit on 2,000 test frames (2026-11-30,
an Intel Xeon, before the weights were retyped) and on 800 new frames (2026-12-07, an AMD EPYC without VNNI, with).
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# TFLite operator -> inputs it may have that vary per frame (a constant operand is folded into the table).
# Unary activations cost 256 bytes; a two-input ADD 64 KiB. MUL is left out: onnxruntime's QLinearMul already
# gives TFLite's results bit for bit on our models, and its tables would cost 64 KiB each for nothing.
TABULATED_OPS: dict[str, int] = {"HARD_SWISH": 1, "LOGISTIC": 1, "TANH": 1, "ADD": 2}
_INT8_TYPES = (np.dtype(np.int8), np.dtype(np.uint8))
_TABLE_PREFIX = "tfl_table_"
_U8_SUFFIX = "_as_uint8"
# operators that only move or reshape their first input: its type passes through them
_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")
# operators that only gather codes from all their inputs (TFLite gives a CONCATENATION's inputs its output's grid)
_JOIN_OPS = ("Concat",)


@dataclass(frozen=True)
class TableReport:
    """What was tabulated, what was left as tf2onnx wrote it (with why), and the bytes the tables take."""

    uint8_tensors: int  # int8 activation tensors now held as uint8
    uint8_weights: int  # int8 constant tensors (weights) now held as uint8
    tabulated: dict[str, int]
    exact: dict[str, int]  # operators onnxruntime already computes as TFLite on every input code: kept as QDQ
    left: dict[str, str]
    table_bytes: int

    def as_dict(self) -> dict:
        return {"uint8_tensors": self.uint8_tensors, "uint8_weights": self.uint8_weights,
                "tabulated": dict(self.tabulated), "exact": dict(self.exact), "left": dict(self.left),
                "table_bytes": self.table_bytes}


def match_tflite(proto, tflite_path: str | Path, only_where_needed: bool = True) -> TableReport:
    """uint8 activations and weights, then tables (see the module's docstring); `proto` is changed in place."""
    retyped = uint8_activations(proto)
    weights = uint8_weights(proto) if retyped else 0  # int8 activations are not fused: no U8S8 kernel to avoid
    report = tabulate_elementwise(proto, tflite_path, only_where_needed)
    return TableReport(retyped, weights, report.tabulated, report.exact, report.left, report.table_bytes)


def uint8_weights(proto) -> int:
    """Hold every int8 constant that a DequantizeLinear reads (the weights) as uint8 with its zero point + 128: the
    same real values, code for code, and onnxruntime's fused kernels become U8U8, which do not saturate on x86
    CPUs without VNNI as its U8S8 ones do (the module's docstring). Returns how many constants changed."""
    graph = proto.graph
    init = {t.name: t for t in graph.initializer}
    changed = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        value, zero_point = node.input[0], node.input[2]
        if all(name in init and init[name].data_type == 3 for name in (value, zero_point)):  # INT8 constants
            node.input[0], node.input[2] = _as_uint8(graph, init, value), _as_uint8(graph, init, zero_point)
            changed += 1
    _drop_unused_initializers(graph)
    return changed


def _as_uint8(graph, init: dict, name: str) -> str:
    """The name of an int8 initializer's uint8 twin (codes + 128: the same real values), made once and shared."""
    from onnx import numpy_helper

    new = name + _U8_SUFFIX
    if new not in init:
        codes = numpy_helper.to_array(init[name]).astype(np.int16) + 128
        init[new] = numpy_helper.from_array(codes.astype(np.uint8), new)
        graph.initializer.append(init[new])
    return new


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def uint8_activations(proto, graph_io: bool = False) -> int:
    """Hold every int8 activation as uint8 (zero point + 128: the same real values, code for code); returns how
    many tensors changed, 0 (graph untouched) when an operator other than DequantizeLinear or a layout operator
    reads one, since its arithmetic would see other codes. With `graph_io`, int8 graph inputs and outputs
    change too (their users then feed and read codes + 128); without, a graph with int8 outputs is left alone."""

    graph = proto.graph
    init = {t.name: t for t in graph.initializer}

    def int8_zero_point(node) -> bool:
        return len(node.input) > 2 and node.input[2] in init and init[node.input[2]].data_type == 3  # INT8

    tensors = {n.output[0] for n in graph.node
               if n.op_type == "QuantizeLinear" and n.input[0] not in init and int8_zero_point(n)}
    if graph_io:
        tensors |= {i.name for i in graph.input if i.type.tensor_type.elem_type == 3 and i.name not in init}

    def passes_type(node) -> bool:
        if node.op_type in _LAYOUT_OPS:
            return node.input[0] in tensors
        return node.op_type in _JOIN_OPS and all(name in tensors for name in node.input)

    grown = True
    while grown:
        grown = False
        for node in graph.node:
            if node.output[0] not in tensors and passes_type(node):
                tensors.add(node.output[0])
                grown = True
    for node in graph.node:
        reads = [name for name in node.input if name in tensors]
        if reads and not passes_type(node) and not (node.op_type == "DequantizeLinear" and int8_zero_point(node)):
            return 0
    if not tensors or (not graph_io and any(o.name in tensors for o in graph.output)):
        return 0

    for node in graph.node:
        if (node.op_type == "QuantizeLinear" and node.output[0] in tensors) or (
                node.op_type == "DequantizeLinear" and node.input[0] in tensors):
            node.input[2] = _as_uint8(graph, init, node.input[2])
    for info in [*graph.value_info, *graph.input, *graph.output]:
        if info.name in tensors:
            info.type.tensor_type.elem_type = 2  # UINT8
    _drop_unused_initializers(graph)
    return len(tensors)


def tabulate_elementwise(proto, tflite_path: str | Path, only_where_needed: bool = True) -> TableReport:
    """Replace the elementwise int8 operators of `proto` (tf2onnx's QDQ graph of `tflite_path`) by tables, in place.

    With `only_where_needed`, an operator onnxruntime already computes as TFLite on every input code stays as
    it is (a Gather per element costs time)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(tflite_path))
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    constant = _constant_tensors(model)
    tabulated: dict[str, int] = {}
    exact: dict[str, int] = {}
    left: dict[str, str] = {}
    replacements: dict[int, list] = {}
    removed: set[int] = set()
    subgraph = model.subgraphs[0]
    for index, op_name in enumerate(operator_names(model)):
        if op_name not in TABULATED_OPS:
            continue
        op = subgraph.operators[index]
        if subgraph.tensors[op.outputs[0]].type not in _int8_tensor_types():
            continue  # a float operator (e.g. the heads of a --float-heads model): onnxruntime computes it as TFLite
        out_name = subgraph.tensors[op.outputs[0]].name.decode()
        where = f"{op_name} {out_name}"
        live = [i for i in op.inputs if i >= 0 and i not in constant]
        if any(np.prod(subgraph.tensors[i].shape) != 1 for i in op.inputs if i in constant):
            left[where] = "a constant operand that differs by position (not elementwise in the codes alone)"
            continue
        pattern = _qdq_pattern(producer, readers, out_name, {i.name for i in graph.initializer})
        if isinstance(pattern, str):
            left[where] = pattern
            continue
        nodes_to_drop, sources = pattern
        if len(sources) != len(live) or not 1 <= len(live) <= TABULATED_OPS[op_name]:
            left[where] = f"{len(sources)} int8 inputs in ONNX, {len(live)} in TFLite"
            continue
        table = _tabulate(model, index)
        if isinstance(table, str):
            left[where] = table
            continue
        quantize = nodes_to_drop[0]
        table = _as_type(table, _zero_point_type(graph, quantize))
        if only_where_needed and np.array_equal(_onnxruntime_table(proto, nodes_to_drop, sources), table):
            exact[op_name] = exact.get(op_name, 0) + 1  # a table would only cost time (a Gather per element)
            continue
        replacements[id(quantize)] = _table_nodes(graph, table_name(index), table, sources, quantize.output[0])
        removed.update(id(n) for n in nodes_to_drop)
        tabulated[op_name] = tabulated.get(op_name, 0) + 1
    _splice(graph, replacements, removed)
    table_bytes = sum(len(t.raw_data) for t in graph.initializer if t.name.startswith(_TABLE_PREFIX))
    return TableReport(0, 0, tabulated, exact, left, table_bytes)


def operator_names(model) -> list[str]:
    """Builtin operator name of each operator of the main subgraph (flatbuffer_utils' object form)."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = model.operatorCodes
    return [names.get(codes[op.opcodeIndex].builtinCode, "?") for op in model.subgraphs[0].operators]


def _int8_tensor_types() -> tuple[int, int]:
    from tensorflow.lite.python import schema_py_generated as schema

    return schema.TensorType.INT8, schema.TensorType.UINT8


def table_name(index: int) -> str:
    """Prefix of the ONNX nodes and initializers that replace TFLite operator `index`."""
    return f"{_TABLE_PREFIX}{index}"


def _constant_tensors(model) -> set[int]:
    buffers = model.buffers
    return {i for i, t in enumerate(model.subgraphs[0].tensors)
            if buffers[t.buffer].data is not None and len(buffers[t.buffer].data)}


def _qdq_pattern(producer: dict, readers: dict, out_name: str, initializers: set[str]):
    """(nodes to drop, int8 source tensors in operand order) for QuantizeLinear <- [Clip] <- op <- DequantizeLinear,
    or why the operator does not have that shape in the ONNX graph."""
    quantize = producer.get(out_name)
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return "no QuantizeLinear named after its output"
    chain = [quantize]
    op = producer.get(quantize.input[0])
    if op is not None and op.op_type in ("Clip", "Relu"):  # a fused activation (ADD + RELU6)
        chain.append(op)
        op = producer.get(op.input[0])
    if op is None:
        return "no operator before its QuantizeLinear"
    chain.append(op)
    if any(readers.get(n.input[0], 0) != 1 for n in chain[:-1]):
        return "its float result is read by more than its QuantizeLinear"
    sources = []
    for name in op.input:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return f"{op.op_type} has an input that is not dequantized int8"
        chain.append(dq)
        if dq.input[0] not in initializers:
            sources.append(dq.input[0])
    return chain, sources


def single_operator_model(model, index: int, path: str | Path) -> list[int]:
    """Write operator `index` of `model` (flatbuffer_utils' object form) alone as a .tflite at `path`, with
    its varying inputs as the model's inputs; returns those inputs' tensor indices, in operand order."""
    from tensorflow.lite.tools import flatbuffer_utils

    one = copy.deepcopy(model)
    subgraph = one.subgraphs[0]
    op = subgraph.operators[index]
    constant = _constant_tensors(model)
    live = [i for i in op.inputs if i >= 0 and i not in constant]
    subgraph.operators = [op]
    subgraph.inputs = np.array(live, dtype=np.int32)
    subgraph.outputs = np.array([op.outputs[0]], dtype=np.int32)
    one.signatureDefs = []
    flatbuffer_utils.write_model(one, str(path))
    return live


def _tabulate(model, index: int) -> np.ndarray | str:
    """The operator's int8 output for every combination of its int8 input codes, run on TFLite's default CPU
    kernels (those `semhinet eval`, `predict` and the board runtime use on a host)."""
    from semhinet_tf.board.runtime import _interpreter_module

    module, _ = _interpreter_module(for_delegate=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "one_op.tflite")
        single_operator_model(model, index, path)
        interpreter = module.Interpreter(model_path=path)
        interpreter.allocate_tensors()
        inputs = interpreter.get_input_details()
        output = interpreter.get_output_details()[0]
        if any(np.dtype(d["dtype"]) not in _INT8_TYPES for d in [*inputs, output]):
            return "not int8 / uint8"
        if any(tuple(d["shape"]) != tuple(inputs[0]["shape"]) for d in inputs):
            return "its inputs broadcast (a table needs them elementwise)"
        codes = np.meshgrid(*[_all_codes(d["dtype"]) for d in inputs], indexing="ij")
        codes = [c.reshape(-1) for c in codes]
        size = int(np.prod(inputs[0]["shape"]))
        table = np.empty(codes[0].size, dtype=output["dtype"])
        for start in range(0, table.size, size):
            stop = min(start + size, table.size)
            for detail, values in zip(inputs, codes, strict=True):
                block = np.zeros(size, dtype=detail["dtype"])
                block[:stop - start] = values[start:stop]
                interpreter.set_tensor(detail["index"], block.reshape(detail["shape"]))
            interpreter.invoke()
            table[start:stop] = interpreter.get_tensor(output["index"]).reshape(-1)[:stop - start]
    return table


def _onnxruntime_table(proto, chain: list, sources: list[str]) -> np.ndarray | None:
    """What onnxruntime makes of the QDQ operator `chain` (QuantizeLinear first) on every input code, in the
    order of `_tabulate`; None without onnxruntime (then every operator gets its table)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from onnx import helper

    graph = proto.graph
    types = _source_types(graph, sources)
    codes = [c.reshape(-1) for c in np.meshgrid(*[_all_codes(t) for t in types], indexing="ij")]
    needed = {name for node in chain for name in node.input}
    initializers = [t for t in graph.initializer if t.name in needed]
    out_type = _zero_point_type(graph, chain[0])
    inputs = [helper.make_tensor_value_info(s, helper.np_dtype_to_tensor_dtype(t), [codes[0].size])
              for s, t in zip(sources, types, strict=True)]
    output = helper.make_tensor_value_info(chain[0].output[0], helper.np_dtype_to_tensor_dtype(out_type), None)
    piece = helper.make_graph(list(reversed(chain)), "one_operator", inputs, [output], initializers)
    proto = helper.make_model(piece, opset_imports=list(proto.opset_import))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(sources, codes, strict=True)))[0]


def _as_type(table: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """TFLite's int8 codes as the ONNX graph holds them: the same, or shifted by 128 where it holds uint8."""
    shift = int(np.iinfo(table.dtype).min) - int(np.iinfo(dtype).min)
    return (table.astype(np.int16) - shift).astype(dtype)


def _all_codes(dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.arange(info.min, info.max + 1).astype(dtype)


def _table_nodes(graph, tag: str, table: np.ndarray, sources: list[str], output: str) -> list:
    """output = Gather(table, index) with index = sum_k code_k * 256^(n-1-k) on the signed codes as they are.

    Gather counts a negative index from the end, so rolling the table (built in code order from each type's
    minimum, as `_tabulate` does) by the offset saves an addition per operand on every element."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    terms = []
    offset = 0
    for k, (source, dtype) in enumerate(zip(sources, _source_types(graph, sources), strict=True)):
        stride = 256 ** (len(sources) - 1 - k)
        offset += -int(np.iinfo(dtype).min) * stride
        nodes.append(helper.make_node("Cast", [source], [f"{tag}_code{k}"], to=TensorProto.INT32))
        term = f"{tag}_code{k}"
        if stride != 1:
            graph.initializer.append(numpy_helper.from_array(np.array(stride, np.int32), f"{tag}_stride{k}"))
            nodes.append(helper.make_node("Mul", [term, f"{tag}_stride{k}"], [f"{tag}_scaled{k}"]))
            term = f"{tag}_scaled{k}"
        terms.append(term)
    index = terms[0]
    for k, term in enumerate(terms[1:]):
        nodes.append(helper.make_node("Add", [index, term], [f"{tag}_sum{k}"]))
        index = f"{tag}_sum{k}"
    graph.initializer.append(numpy_helper.from_array(np.roll(table, -offset), f"{tag}_values"))
    nodes.append(helper.make_node("Gather", [f"{tag}_values", index], [output], axis=0))
    return nodes


def _source_types(graph, sources: list[str]) -> list[np.dtype]:
    """numpy dtype of each int8 source: from the zero point of a DequantizeLinear that reads it."""
    return [_zero_point_type(graph, next(n for n in graph.node if n.op_type == "DequantizeLinear"
                                         and n.input[0] == source)) for source in sources]


def _zero_point_type(graph, node) -> np.dtype:
    """The int8 type a QuantizeLinear writes or a DequantizeLinear reads (uint8 when it has no zero point)."""
    from onnx import numpy_helper

    name = node.input[2] if len(node.input) > 2 else None
    tensor = next((t for t in graph.initializer if t.name == name), None)
    return numpy_helper.to_array(tensor).dtype if tensor is not None else np.dtype(np.uint8)


def _splice(graph, replacements: dict[int, list], removed: set[int]) -> None:
    """Put each table's nodes where its QuantizeLinear was (its sources come earlier), drop the replaced
    nodes and any DequantizeLinear left without readers, and the initializers nothing reads any more."""
    readers: dict[str, int] = {}
    for node in graph.node:
        if id(node) not in removed:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
    for nodes in replacements.values():
        for node in nodes:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
    kept = []
    for node in graph.node:
        kept.extend(replacements.get(id(node), []))
        if id(node) in removed and node.op_type == "DequantizeLinear" and readers.get(node.output[0], 0):
            kept.append(node)  # another operator still reads this dequantized tensor
        elif id(node) not in removed:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
