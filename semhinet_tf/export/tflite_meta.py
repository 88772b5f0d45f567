"""Read a .tflite file without TensorFlow, and keep the model's JSON contract in its metadata.

The board has neither TensorFlow nor the `flatbuffers` package, so reading is a small read-only
FlatBuffers walker over the TFLite schema (numpy + stdlib only). Field ids and enum tables follow
tensorflow/lite/schema/schema.fbs as shipped in TF 2.21 (schema_py_generated.py). Writing
(`embed_contract`) runs on the host and uses TensorFlow's generated object API.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CONTRACT_NAME",
    "BUILTIN_OPERATORS",
    "TENSOR_TYPES",
    "Quantization",
    "Tensor",
    "Operator",
    "Signature",
    "SubGraph",
    "TFLiteModel",
    "read_model",
    "read_contract",
    "embed_contract",
    "contract_json",
]

CONTRACT_NAME = "semhinet_contract"
_FILE_ID = b"TFL3"
_CUSTOM = 32
_BUFFER_ALIGN = 16  # schema.fbs: Buffer.data (force_align: 16)

# BuiltinOperator names by code, generated once from TF 2.21's schema_py_generated.py (codes 0..209).
BUILTIN_OPERATORS: tuple[str, ...] = (
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEPTH_TO_SPACE", "DEQUANTIZE",
    "EMBEDDING_LOOKUP", "FLOOR", "FULLY_CONNECTED", "HASHTABLE_LOOKUP", "L2_NORMALIZATION", "L2_POOL_2D",
    "LOCAL_RESPONSE_NORMALIZATION", "LOGISTIC", "LSH_PROJECTION", "LSTM", "MAX_POOL_2D", "MUL", "RELU",
    "RELU_N1_TO_1", "RELU6", "RESHAPE", "RESIZE_BILINEAR", "RNN", "SOFTMAX", "SPACE_TO_DEPTH", "SVDF", "TANH",
    "CONCAT_EMBEDDINGS", "SKIP_GRAM", "CALL", "CUSTOM", "EMBEDDING_LOOKUP_SPARSE", "PAD",
    "UNIDIRECTIONAL_SEQUENCE_RNN", "GATHER", "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND", "TRANSPOSE", "MEAN", "SUB",
    "DIV", "SQUEEZE", "UNIDIRECTIONAL_SEQUENCE_LSTM", "STRIDED_SLICE", "BIDIRECTIONAL_SEQUENCE_RNN", "EXP",
    "TOPK_V2", "SPLIT", "LOG_SOFTMAX", "DELEGATE", "BIDIRECTIONAL_SEQUENCE_LSTM", "CAST", "PRELU", "MAXIMUM",
    "ARG_MAX", "MINIMUM", "LESS", "NEG", "PADV2", "GREATER", "GREATER_EQUAL", "LESS_EQUAL", "SELECT", "SLICE",
    "SIN", "TRANSPOSE_CONV", "SPARSE_TO_DENSE", "TILE", "EXPAND_DIMS", "EQUAL", "NOT_EQUAL", "LOG", "SUM", "SQRT",
    "RSQRT", "SHAPE", "POW", "ARG_MIN", "FAKE_QUANT", "REDUCE_PROD", "REDUCE_MAX", "PACK", "LOGICAL_OR",
    "ONE_HOT", "LOGICAL_AND", "LOGICAL_NOT", "UNPACK", "REDUCE_MIN", "FLOOR_DIV", "REDUCE_ANY", "SQUARE",
    "ZEROS_LIKE", "FILL", "FLOOR_MOD", "RANGE", "RESIZE_NEAREST_NEIGHBOR", "LEAKY_RELU", "SQUARED_DIFFERENCE",
    "MIRROR_PAD", "ABS", "SPLIT_V", "UNIQUE", "CEIL", "REVERSE_V2", "ADD_N", "GATHER_ND", "COS", "WHERE", "RANK",
    "ELU", "REVERSE_SEQUENCE", "MATRIX_DIAG", "QUANTIZE", "MATRIX_SET_DIAG", "ROUND", "HARD_SWISH", "IF", "WHILE",
    "NON_MAX_SUPPRESSION_V4", "NON_MAX_SUPPRESSION_V5", "SCATTER_ND", "SELECT_V2", "DENSIFY", "SEGMENT_SUM",
    "BATCH_MATMUL", "PLACEHOLDER_FOR_GREATER_OP_CODES", "CUMSUM", "CALL_ONCE", "BROADCAST_TO", "RFFT2D",
    "CONV_3D", "IMAG", "REAL", "COMPLEX_ABS", "HASHTABLE", "HASHTABLE_FIND", "HASHTABLE_IMPORT", "HASHTABLE_SIZE",
    "REDUCE_ALL", "CONV_3D_TRANSPOSE", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "BROADCAST_ARGS",
    "RANDOM_STANDARD_NORMAL", "BUCKETIZE", "RANDOM_UNIFORM", "MULTINOMIAL", "GELU", "DYNAMIC_UPDATE_SLICE",
    "RELU_0_TO_1", "UNSORTED_SEGMENT_PROD", "UNSORTED_SEGMENT_MAX", "UNSORTED_SEGMENT_SUM", "ATAN2",
    "UNSORTED_SEGMENT_MIN", "SIGN", "BITCAST", "BITWISE_XOR", "RIGHT_SHIFT", "STABLEHLO_LOGISTIC",
    "STABLEHLO_ADD", "STABLEHLO_DIVIDE", "STABLEHLO_MULTIPLY", "STABLEHLO_MAXIMUM", "STABLEHLO_RESHAPE",
    "STABLEHLO_CLAMP", "STABLEHLO_CONCATENATE", "STABLEHLO_BROADCAST_IN_DIM", "STABLEHLO_CONVOLUTION",
    "STABLEHLO_SLICE", "STABLEHLO_CUSTOM_CALL", "STABLEHLO_REDUCE", "STABLEHLO_ABS", "STABLEHLO_AND",
    "STABLEHLO_COSINE", "STABLEHLO_EXPONENTIAL", "STABLEHLO_FLOOR", "STABLEHLO_LOG", "STABLEHLO_MINIMUM",
    "STABLEHLO_NEGATE", "STABLEHLO_OR", "STABLEHLO_POWER", "STABLEHLO_REMAINDER", "STABLEHLO_RSQRT",
    "STABLEHLO_SELECT", "STABLEHLO_SUBTRACT", "STABLEHLO_TANH", "STABLEHLO_SCATTER", "STABLEHLO_COMPARE",
    "STABLEHLO_CONVERT", "STABLEHLO_DYNAMIC_SLICE", "STABLEHLO_DYNAMIC_UPDATE_SLICE", "STABLEHLO_PAD",
    "STABLEHLO_IOTA", "STABLEHLO_DOT_GENERAL", "STABLEHLO_REDUCE_WINDOW", "STABLEHLO_SORT", "STABLEHLO_WHILE",
    "STABLEHLO_GATHER", "STABLEHLO_TRANSPOSE", "DILATE", "STABLEHLO_RNG_BIT_GENERATOR", "REDUCE_WINDOW",
    "STABLEHLO_COMPOSITE", "STABLEHLO_SHIFT_LEFT", "STABLEHLO_CBRT", "STABLEHLO_CASE",
)

# TensorType names by code (same source).
TENSOR_TYPES: tuple[str, ...] = (
    "FLOAT32", "FLOAT16", "INT32", "UINT8", "INT64", "STRING", "BOOL", "INT16", "COMPLEX64", "INT8", "FLOAT64",
    "COMPLEX128", "UINT64", "RESOURCE", "VARIANT", "UINT32", "UINT16", "INT4", "BFLOAT16", "INT2", "UINT4",
)

_FLOAT_TYPES = frozenset({"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"})

_U8 = struct.Struct("<B")
_I8 = struct.Struct("<b")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Table:
    """One FlatBuffers table: a position in the buffer plus its vtable (fields addressed by schema id)."""

    __slots__ = ("buf", "pos", "vt", "vt_len")

    def __init__(self, buf: bytes, pos: int):
        if not 0 <= pos < len(buf):
            raise ValueError(f"table offset {pos} outside the file")
        self.buf = buf
        self.pos = pos
        self.vt = pos - _I32.unpack_from(buf, pos)[0]
        if not 0 <= self.vt < len(buf):
            raise ValueError(f"vtable offset {self.vt} outside the file")
        self.vt_len = _U16.unpack_from(buf, self.vt)[0]

    def _field(self, fid: int) -> int:
        slot = 4 + 2 * fid
        if slot >= self.vt_len:
            return 0
        off = _U16.unpack_from(self.buf, self.vt + slot)[0]
        return self.pos + off if off else 0

    def _target(self, fid: int) -> int:
        p = self._field(fid)
        return p + _U32.unpack_from(self.buf, p)[0] if p else 0

    def scalar(self, fid: int, fmt: struct.Struct, default: int = 0) -> int:
        p = self._field(fid)
        return fmt.unpack_from(self.buf, p)[0] if p else default

    def string(self, fid: int) -> str | None:
        p = self._target(fid)
        if not p:
            return None
        n = _U32.unpack_from(self.buf, p)[0]
        return bytes(self.buf[p + 4 : p + 4 + n]).decode("utf-8", errors="replace")

    def table(self, fid: int) -> _Table | None:
        p = self._target(fid)
        return _Table(self.buf, p) if p else None

    def vector(self, fid: int) -> tuple[int, int] | None:
        """(start of the elements, element count), or None when the field is absent."""
        p = self._target(fid)
        return (p + 4, _U32.unpack_from(self.buf, p)[0]) if p else None

    def ints(self, fid: int, dtype: str = "<i4") -> tuple[int, ...] | None:
        v = self.vector(fid)
        if v is None:
            return None
        return tuple(int(x) for x in np.frombuffer(self.buf, dtype=dtype, count=v[1], offset=v[0]))

    def floats(self, fid: int) -> tuple[float, ...] | None:
        v = self.vector(fid)
        if v is None:
            return None
        return tuple(float(x) for x in np.frombuffer(self.buf, dtype="<f4", count=v[1], offset=v[0]))

    def tables(self, fid: int) -> list[_Table]:
        v = self.vector(fid)
        if v is None:
            return []
        start, n = v
        out = []
        for i in range(n):
            p = start + 4 * i
            out.append(_Table(self.buf, p + _U32.unpack_from(self.buf, p)[0]))
        return out


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: real = scale * (q - zero_point), per tensor or per channel."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    quantized_dimension: int = 0

    @property
    def per_channel(self) -> bool:
        return len(self.scale) > 1


@dataclass(frozen=True)
class Tensor:
    """A tensor of a subgraph as stored in the file (shape is the static one; -1 in shape_signature = dynamic)."""

    index: int
    name: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    dtype: str
    buffer: int
    quantization: Quantization | None
    is_constant: bool
    is_variable: bool = False

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_TYPES

    @property
    def is_dynamic(self) -> bool:
        return any(d < 0 for d in self.shape_signature)


@dataclass(frozen=True)
class Operator:
    """One node. `name` is what the interpreter reports: the builtin name, or the custom code for custom ops."""

    index: int
    opcode_index: int
    name: str
    builtin_code: int
    custom_code: str | None
    version: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    @property
    def is_custom(self) -> bool:
        return self.builtin_code == _CUSTOM


@dataclass(frozen=True)
class Signature:
    """A SignatureDef: names the runner uses, mapped to tensor indices of `subgraph_index`."""

    key: str
    subgraph_index: int
    inputs: dict[str, int]
    outputs: dict[str, int]


@dataclass
class SubGraph:
    """One graph of the model; op and tensor indices are positions in `operators` and `tensors`."""

    name: str
    tensors: list[Tensor]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    operators: list[Operator]

    def producers(self) -> dict[int, int]:
        """Tensor index -> index of the op that writes it."""
        return {t: op.index for op in self.operators for t in op.outputs if t >= 0}

    def consumers(self) -> dict[int, list[int]]:
        """Tensor index -> indices of the ops that read it (in execution order)."""
        out: dict[int, list[int]] = {}
        for op in self.operators:
            for t in op.inputs:
                if t >= 0 and op.index not in out.setdefault(t, []):
                    out[t].append(op.index)
        return out


@dataclass
class TFLiteModel:
    """What `read_model` returns. `tensors`/`operators`/`inputs`/`outputs` are the main subgraph's (index 0)."""

    source: str
    version: int
    description: str
    subgraphs: list[SubGraph]
    signatures: dict[str, Signature]
    metadata: dict[str, int]
    buffer_spans: list[tuple[int, int]] = field(repr=False)
    external_buffers: bool = False
    raw: bytes = field(default=b"", repr=False)

    @property
    def main(self) -> SubGraph:
        return self.subgraphs[0]

    @property
    def tensors(self) -> list[Tensor]:
        return self.main.tensors

    @property
    def operators(self) -> list[Operator]:
        return self.main.operators

    @property
    def inputs(self) -> tuple[int, ...]:
        return self.main.inputs

    @property
    def outputs(self) -> tuple[int, ...]:
        return self.main.outputs

    @property
    def input_tensors(self) -> list[Tensor]:
        return [self.main.tensors[i] for i in self.main.inputs]

    @property
    def output_tensors(self) -> list[Tensor]:
        return [self.main.tensors[i] for i in self.main.outputs]

    @property
    def op_names(self) -> list[str]:
        return [op.name for op in self.main.operators]

    @property
    def metadata_names(self) -> list[str]:
        return list(self.metadata)

    def buffer_data(self, index: int) -> bytes:
        """The bytes of buffer `index` (empty for activations and the sentinel buffer 0)."""
        start, size = self.buffer_spans[index]
        return bytes(self.raw[start : start + size])

    def metadata_bytes(self, name: str) -> bytes | None:
        index = self.metadata.get(name)
        return None if index is None else self.buffer_data(index)

    def signature_list(self) -> dict[str, dict[str, list[str]]]:
        """Same shape as the interpreter's get_signature_list(): {key: {"inputs": [...], "outputs": [...]}}."""
        return {k: {"inputs": list(s.inputs), "outputs": list(s.outputs)} for k, s in self.signatures.items()}


def _load(path_or_bytes) -> tuple[bytes, str]:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes), "<bytes>"
    path = os.fspath(path_or_bytes)
    with open(path, "rb") as f:
        return f.read(), str(path)


def _enum_name(table: tuple[str, ...], code: int, prefix: str) -> str:
    return table[code] if 0 <= code < len(table) else f"{prefix}_{code}"


def _quantization(t: _Table | None) -> Quantization | None:
    if t is None:
        return None
    scale = t.floats(2) or ()
    if not scale:
        return None
    zero_point = t.ints(3, "<i8") or (0,) * len(scale)
    return Quantization(scale, zero_point, t.scalar(6, _I32, 0))


def _buffer_span(t: _Table) -> tuple[tuple[int, int], bool]:
    """(start, size) of a buffer's bytes, and whether it lives outside the flatbuffer (>2 GB layout)."""
    data = t.vector(0)
    if data is not None:
        return data, False
    offset, size = t.scalar(1, _U64, 0), t.scalar(2, _U64, 0)
    if offset > 1:
        return (offset, size), True
    return (0, 0), False


def _tensor(index: int, t: _Table, buffer_sizes: list[int]) -> Tensor:
    shape = t.ints(0) or ()
    signature = t.ints(7)
    buffer = t.scalar(2, _U32, 0)
    return Tensor(
        index=index,
        name=t.string(3) or "",
        shape=shape,
        shape_signature=signature if signature is not None else shape,
        dtype=_enum_name(TENSOR_TYPES, t.scalar(1, _I8, 0), "TYPE"),
        buffer=buffer,
        quantization=_quantization(t.table(4)),
        is_constant=0 < buffer < len(buffer_sizes) and buffer_sizes[buffer] > 0,
        is_variable=bool(t.scalar(5, _U8, 0)),
    )


def _opcode(t: _Table) -> tuple[int, str | None, int]:
    # schema.fbs: the real code is max(builtin_code, deprecated_builtin_code); the int8 field tops out at 127.
    code = max(t.scalar(3, _I32, 0), t.scalar(0, _I8, 0))
    return code, t.string(1), t.scalar(2, _I32, 1)


def _operator(index: int, t: _Table, opcodes: list[tuple[int, str | None, int]]) -> Operator:
    opcode_index = t.scalar(0, _U32, 0)
    code, custom, version = opcodes[opcode_index]
    name = custom if code == _CUSTOM and custom else _enum_name(BUILTIN_OPERATORS, code, "BUILTIN")
    return Operator(index, opcode_index, name, code, custom, version, t.ints(1) or (), t.ints(2) or ())


def _subgraph(t: _Table, opcodes, buffer_sizes: list[int]) -> SubGraph:
    return SubGraph(
        name=t.string(4) or "",
        tensors=[_tensor(i, x, buffer_sizes) for i, x in enumerate(t.tables(0))],
        inputs=t.ints(1) or (),
        outputs=t.ints(2) or (),
        operators=[_operator(i, x, opcodes) for i, x in enumerate(t.tables(3))],
    )


def _tensor_map(t: _Table) -> dict[str, int]:
    return {x.string(0) or "": x.scalar(1, _U32, 0) for x in t.tables(0)}


def _signature(t: _Table) -> Signature:
    inputs = {x.string(0) or "": x.scalar(1, _U32, 0) for x in t.tables(0)}
    outputs = {x.string(0) or "": x.scalar(1, _U32, 0) for x in t.tables(1)}
    return Signature(t.string(2) or "", t.scalar(4, _U32, 0), inputs, outputs)


def _parse(raw: bytes, source: str) -> TFLiteModel:
    root = _Table(raw, _U32.unpack_from(raw, 0)[0])
    spans = [_buffer_span(b) for b in root.tables(4)]
    buffer_spans = [s for s, _ in spans]
    sizes = [size for _, size in buffer_spans]
    opcodes = [_opcode(x) for x in root.tables(1)]
    subgraphs = [_subgraph(x, opcodes, sizes) for x in root.tables(2)]
    if not subgraphs:
        raise ValueError("no subgraph")
    signatures = [_signature(x) for x in root.tables(7)]
    metadata = {(x.string(0) or ""): x.scalar(1, _U32, 0) for x in root.tables(6)}
    for name, index in metadata.items():
        if index >= len(buffer_spans):  # checked here, so a reader of the metadata never meets a bare IndexError
            raise ValueError(f"metadata '{name}' points at buffer {index} of {len(buffer_spans)}")
    return TFLiteModel(
        source=source,
        version=root.scalar(0, _U32, 0),
        description=root.string(3) or "",
        subgraphs=subgraphs,
        signatures={s.key: s for s in signatures},
        metadata=metadata,
        buffer_spans=buffer_spans,
        external_buffers=any(ext for _, ext in spans),
        raw=raw,
    )


def read_model(path_or_bytes) -> TFLiteModel:
    """Parse a .tflite file (path) or its bytes; read-only, numpy + stdlib only."""
    raw, source = _load(path_or_bytes)
    if len(raw) < 8 or raw[4:8] != _FILE_ID:
        raise ValueError(f"{source}: not a TFLite model (no '{_FILE_ID.decode()}' file identifier)")
    try:
        return _parse(raw, source)
    except (struct.error, ValueError, IndexError) as exc:
        raise ValueError(f"{source}: corrupt TFLite flatbuffer ({exc})") from exc


def read_contract(path_or_bytes, name: str = CONTRACT_NAME) -> dict | None:
    """The JSON contract stored under metadata `name`, or None when the model has none."""
    model = path_or_bytes if isinstance(path_or_bytes, TFLiteModel) else read_model(path_or_bytes)
    payload = model.metadata_bytes(name)
    if payload is None:
        return None
    try:
        contract = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{model.source}: metadata '{name}' is not UTF-8 JSON ({exc})") from exc
    if not isinstance(contract, dict):
        raise ValueError(f"{model.source}: metadata '{name}' is JSON but not an object")
    return contract


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"contract value of type {type(value).__name__} is not JSON serialisable")


def contract_json(contract: dict) -> bytes:
    """The exact UTF-8 bytes `embed_contract` stores (strict JSON: no NaN/Infinity)."""
    text = json.dumps(contract, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default)
    return text.encode("utf-8")


def _free_buffer(obj, index: int, name: str) -> bool:
    """True when buffer `index` belongs to metadata `name` alone, so its bytes can be replaced in place."""
    if index <= 0 or index >= len(obj.buffers):
        return False
    for sg in obj.subgraphs or []:
        if any(t.buffer == index for t in sg.tensors or []):
            return False
    others = [m for m in obj.metadata or [] if _text(m.name) != name]
    return all(m.buffer != index for m in others) and index not in list(obj.metadataBuffer or [])


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _aligned_buffers(schema, buffers: list) -> list:
    """Copies of the BufferT list whose data vectors start on 16-byte boundaries, as the C++ writer does.

    The Python object API aligns vectors to their element size only (1 for bytes); kernels on 32-bit
    ARM must not be handed misaligned float/int32 weights.
    """

    class _AlignedBufferT(schema.BufferT):
        def Pack(self, builder):  # noqa: N802 - overrides the generated API
            if self.data is not None and len(self.data):
                builder.Prep(_BUFFER_ALIGN, len(self.data))
            return super().Pack(builder)

    out = []
    for b in buffers:
        data = None if b.data is None else np.ascontiguousarray(np.asarray(b.data, dtype=np.uint8).ravel())
        out.append(_AlignedBufferT(data=data, offset=b.offset, size=b.size))
    return out


def embed_contract(tflite_bytes: bytes, contract: dict, name: str = CONTRACT_NAME) -> bytes:
    """Return the model with `contract` stored as UTF-8 JSON in metadata `name` (replacing one already there).

    Host only: imports TensorFlow's generated schema and the `flatbuffers` package lazily.
    """
    if not isinstance(contract, dict):
        raise TypeError(f"contract must be a dict, not {type(contract).__name__}")
    payload = contract_json(contract)
    model = read_model(tflite_bytes)  # validates the bytes before TF sees them
    if model.external_buffers:
        raise ValueError(f"{model.source}: buffers stored outside the flatbuffer (>2 GB layout) are not supported")
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    obj = schema.ModelT.InitFromPackedBuf(bytearray(tflite_bytes), 0)
    obj.buffers = list(obj.buffers or [])
    entries = list(obj.metadata or [])
    old = [m for m in entries if _text(m.name) == name]
    data = np.frombuffer(payload, dtype=np.uint8)
    if old and _free_buffer(obj, old[0].buffer, name):
        index = old[0].buffer
        obj.buffers[index] = schema.BufferT(data=data)
    else:
        index = len(obj.buffers)
        obj.buffers.append(schema.BufferT(data=data))
    obj.metadata = [m for m in entries if _text(m.name) != name] + [schema.MetadataT(name=name, buffer=index)]
    obj.buffers = _aligned_buffers(schema, obj.buffers)
    builder = flatbuffers.Builder(len(tflite_bytes) + len(payload) + 4096)
    builder.Finish(obj.Pack(builder), file_identifier=_FILE_ID)
    return bytes(builder.Output())
