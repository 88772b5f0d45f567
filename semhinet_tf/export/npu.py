"""Will the i.MX 8M Plus NPU (VX delegate) take this .tflite whole? A static check, no TensorFlow needed.

Ops the VX delegate refuses fall back to the CPU and split the graph, which usually costs more than
the NPU saves; this module names every op and tensor that would, from the rules in the
project's NPU notes (the delegate's op map and its per-op conditions), before a model goes to a board.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from semhinet_tf.export.tflite_meta import Operator, SubGraph, Tensor, TFLiteModel, read_model

__all__ = ["ARM_MIN_FC_DEPTH", "TARGETS", "VX_DELEGATE_OPS", "NpuIssue", "NpuReport", "check_cora_z7", "check_npu",
           "check_target", "count_macs", "op_macs"]

# tflite-runtime 2.14's optimized int8 FULLY_CONNECTED dies with SIGSEGV on arm64 and armv7 when its input depth
# (the weights' last axis) is under 8: measured under qemu (cortex-a53, cortex-a9) on one-op models, depths 1-7 crash,
# 8, 9, 12, 13, 16 run; x86 and the reference kernels run them all. The boards' CPUs run every op the NPU does not.
ARM_MIN_FC_DEPTH = 8

# `npu-check --target`: the i.MX 8M Plus NPU (the default), or the Cora Z7's Cortex-A9 CPU (see check_cora_z7).
TARGETS = ("imx8mp", "cora-z7")

# Builtin ops the VX delegate registers (its op map, as listed in the project's NPU notes; "comparison and
# logical ops" and "RNN/LSTM variants" spelled out).
VX_DELEGATE_OPS: frozenset[str] = frozenset(
    """
    ADD SUB MUL DIV POW MAXIMUM MINIMUM CONV_2D DEPTHWISE_CONV_2D TRANSPOSE_CONV CONV_3D FULLY_CONNECTED
    AVERAGE_POOL_2D MAX_POOL_2D MEAN SUM REDUCE_MAX REDUCE_MIN REDUCE_PROD REDUCE_ANY SOFTMAX LOGISTIC TANH
    RELU RELU6 RELU_N1_TO_1 LEAKY_RELU PRELU ELU GELU HARD_SWISH QUANTIZE DEQUANTIZE CONCATENATION RESHAPE
    SQUEEZE EXPAND_DIMS TRANSPOSE PAD MIRROR_PAD STRIDED_SLICE SLICE SPLIT SPLIT_V PACK UNPACK GATHER
    GATHER_ND RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR SPACE_TO_DEPTH DEPTH_TO_SPACE SPACE_TO_BATCH_ND
    BATCH_TO_SPACE_ND L2_NORMALIZATION LOCAL_RESPONSE_NORMALIZATION ARG_MAX ARG_MIN CAST SHAPE SELECT
    SELECT_V2 EQUAL NOT_EQUAL LESS LESS_EQUAL GREATER GREATER_EQUAL LOGICAL_AND LOGICAL_OR LOGICAL_NOT ABS
    NEG EXP LOG SQRT RSQRT SQUARE SIN FLOOR FLOOR_DIV ADD_N ONE_HOT BATCH_MATMUL REVERSE_V2 BROADCAST_TO
    SQUARED_DIFFERENCE SCATTER_ND EMBEDDING_LOOKUP HASHTABLE_LOOKUP RNN LSTM UNIDIRECTIONAL_SEQUENCE_RNN
    UNIDIRECTIONAL_SEQUENCE_LSTM BIDIRECTIONAL_SEQUENCE_RNN BIDIRECTIONAL_SEQUENCE_LSTM
    """.split()
)

# Ops whose input and weight types must match (the delegate refuses hybrid kernels).
_WEIGHTED_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})
# Tensor types the delegate refuses in several ops (float is handled apart: it has its own boundary rules).
_REFUSED_TYPES = frozenset({"INT16", "INT64", "UINT64", "STRING", "COMPLEX64", "COMPLEX128"})
_INT8_TYPES = frozenset({"INT8", "UINT8"})


@dataclass(frozen=True)
class NpuIssue:
    """One reason the VX delegate would leave an op (or the ops using a tensor) on the CPU."""

    kind: str
    op_index: int | None
    op_name: str | None
    tensor: str | None
    message: str

    def format(self) -> str:
        where = f"op {self.op_index} {self.op_name}" if self.op_index is not None else "model"
        tensor = f", tensor '{self.tensor}'" if self.tensor else ""
        return f"  [{self.kind}] {where}{tensor}: {self.message}"


@dataclass
class NpuReport:
    """Result of `check_npu`; `ok` when nothing would leave the NPU (a requested float tail aside)."""

    source: str
    n_ops: int
    op_histogram: dict[str, int]
    issues: list[NpuIssue] = field(default_factory=list)
    cpu_ops: list[int] = field(default_factory=list)
    macs: int = 0
    cpu_macs: int = 0
    allow_float_tail: bool = False
    float_io: bool = False
    hint: str = ""
    target: str = "imx8mp"

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def cpu_mac_share(self) -> float:
        return self.cpu_macs / self.macs if self.macs else 0.0

    @property
    def cpu_op_share(self) -> float:
        return len(self.cpu_ops) / self.n_ops if self.n_ops else 0.0

    @property
    def verdict(self) -> str:
        name = "Cora Z7 check" if self.target == "cora-z7" else "NPU check"
        if not self.ok:
            kinds = Counter(i.kind for i in self.issues)
            detail = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
            text = f"{name}: FAIL - {len(self.issues)} issue{'s' if len(self.issues) != 1 else ''} ({detail})"
            return f"{text}; {self.hint}" if self.hint else text
        if self.target == "cora-z7":
            return f"{name}: PASS - {self.n_ops} ops, every one on int8/uint8/int32 tensors (no float kernel)"
        if self.cpu_ops:
            npu = self.n_ops - len(self.cpu_ops)
            return (
                f"NPU check: PASS - {self.n_ops} ops: {npu} on the VX delegate, "
                f"{len(self.cpu_ops)} float ops on the CPU downstream of a DEQUANTIZE "
                f"({100 * self.cpu_mac_share:.1f}% of MACs, {100 * self.cpu_op_share:.1f}% of ops)"
            )
        integer = "integer inside, float I/O converted at the boundary" if self.float_io else "fully integer"
        return f"NPU check: PASS - {self.n_ops} ops, all on the VX delegate's list, {integer}"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "ok": self.ok,
            "verdict": self.verdict,
            "n_ops": self.n_ops,
            "op_histogram": dict(self.op_histogram),
            "issues": [asdict(i) for i in self.issues],
            "cpu_ops": list(self.cpu_ops),
            "macs": self.macs,
            "cpu_macs": self.cpu_macs,
            "cpu_mac_share": self.cpu_mac_share,
            "cpu_op_share": self.cpu_op_share,
            "allow_float_tail": self.allow_float_tail,
            "target": self.target,
        }

    def format(self, limit: int | None = None) -> str:
        """Human text: op histogram, one line per issue (the first `limit` if given), the verdict last."""
        ops = ", ".join(f"{name} x{n}" for name, n in self.op_histogram.items())
        lines = [f"{self.source}: {self.n_ops} ops ({ops}), {self.macs:,} MACs"]
        shown = self.issues if limit is None else self.issues[:limit]
        lines += [i.format() for i in shown]
        if len(shown) < len(self.issues):
            lines.append(f"  ... and {len(self.issues) - len(shown)} more issues")
        if self.cpu_ops:
            lines.append(f"  CPU (float tail): ops {', '.join(map(str, self.cpu_ops))}")
        lines.append(self.verdict)
        return "\n".join(lines)


def _as_model(model) -> TFLiteModel:
    return model if isinstance(model, TFLiteModel) else read_model(model)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= max(int(v), 1)
    return out


def op_macs(sg: SubGraph, op: Operator) -> int:
    """Multiply-accumulates of one CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED from its static shapes; 0 else."""
    if op.name not in _WEIGHTED_OPS or len(op.inputs) < 2 or op.inputs[1] < 0 or not op.outputs:
        return 0
    weights = sg.tensors[op.inputs[1]].shape
    out = _prod(sg.tensors[op.outputs[0]].shape)
    if op.name == "DEPTHWISE_CONV_2D":  # weights [1, KH, KW, C*M]: one KHxKW window per output element
        return out * _prod(weights[1:3])
    return out * _prod(weights[1:])  # CONV_2D [OC, KH, KW, IC/groups], FULLY_CONNECTED [units, in]


def count_macs(model) -> int:
    """Multiply-accumulates of the main subgraph's convolutions and fully connected layers (batch as stored)."""
    sg = _as_model(model).main
    return sum(op_macs(sg, op) for op in sg.operators)


class _Graph:
    """Producer/consumer maps of the main subgraph, built once per check."""

    def __init__(self, sg: SubGraph):
        self.sg = sg
        self.producer = sg.producers()
        self.consumers = sg.consumers()
        self.inputs = set(sg.inputs)
        self.outputs = set(sg.outputs)

    def tensor(self, index: int) -> Tensor:
        return self.sg.tensors[index]

    def op_tensors(self, op: Operator) -> list[int]:
        return [t for t in (*op.inputs, *op.outputs) if t >= 0]

    def successors(self, op: Operator) -> set[int]:
        return {c for t in op.outputs if t >= 0 for c in self.consumers.get(t, [])}

    def predecessors(self, op: Operator) -> set[int]:
        return {self.producer[t] for t in op.inputs if t in self.producer}


def _float_tail(g: _Graph) -> set[int]:
    """Ops after a DEQUANTIZE of an integer activation that never lead back into a QUANTIZE from float."""
    ops = g.sg.operators
    starts = [
        op.index
        for op in ops
        if op.name == "DEQUANTIZE" and op.inputs and not g.tensor(op.inputs[0]).is_constant
        and not g.tensor(op.inputs[0]).is_float
    ]
    reach: set[int] = set()
    todo = [s for start in starts for s in g.successors(ops[start])]
    while todo:
        i = todo.pop()
        if i not in reach:
            reach.add(i)
            todo.extend(g.successors(ops[i]))
    requant = {i for i in reach if ops[i].name == "QUANTIZE" and g.tensor(ops[i].inputs[0]).is_float}
    back: set[int] = set()
    todo = list(requant)
    while todo:
        i = todo.pop()
        if i not in back:
            back.add(i)
            todo.extend(p for p in g.predecessors(ops[i]) if p in reach)
    return reach - back


def _float_ok(g: _Graph, index: int, npu: set[int]) -> bool:
    """A float tensor is fine only at the I/O boundary: a model input read by QUANTIZE, or a DEQUANTIZE result
    that leaves the model (or feeds only the CPU tail)."""
    readers = [i for i in g.consumers.get(index, []) if i in npu]
    ops = g.sg.operators
    if index in g.inputs:
        return all(ops[i].name == "QUANTIZE" for i in readers)
    writer = g.producer.get(index)
    return writer is not None and ops[writer].name == "DEQUANTIZE" and not readers


def _issue(kind: str, op: Operator | None, tensor: Tensor | None, message: str) -> NpuIssue:
    return NpuIssue(kind, op.index if op else None, op.name if op else None, tensor.name if tensor else None, message)


def _op_issues(g: _Graph, op: Operator, npu: set[int]) -> list[NpuIssue]:
    """Issues of one op that would run on the NPU: not on the list, custom, hybrid, computing in float."""
    if op.is_custom:
        return [_issue("custom_op", op, None, f"custom op '{op.name}': the VX delegate never takes custom ops")]
    out = []
    if op.name not in VX_DELEGATE_OPS:
        out.append(_issue("unsupported_op", op, None, f"{op.name} is not on the VX delegate's op list"))
    if op.name in _WEIGHTED_OPS and len(op.inputs) >= 2 and min(op.inputs[:2]) >= 0:
        x, w = g.tensor(op.inputs[0]), g.tensor(op.inputs[1])
        if x.dtype != w.dtype:
            msg = f"hybrid {op.name}: {x.dtype} input with {w.dtype} weights; the model must be fully integer"
            return [*out, _issue("hybrid_op", op, w, msg)]
    floats = [g.tensor(t) for t in g.op_tensors(op) if g.tensor(t).is_float and not _float_ok(g, t, npu)]
    if floats:
        names = ", ".join(f"'{t.name}'" for t in floats[:3]) + (" ..." if len(floats) > 3 else "")
        out.append(_issue("float_op", op, floats[0], f"{op.name} computes in {floats[0].dtype} ({names})"))
    out += _convert_issues(g, op)
    return out + _arm_cpu_issues(g, op)


def _arm_cpu_issues(g: _Graph, op: Operator) -> list[NpuIssue]:
    """An integer FULLY_CONNECTED shallower than ARM_MIN_FC_DEPTH: the ARM boards' tflite-runtime crashes on it."""
    if op.name != "FULLY_CONNECTED" or len(op.inputs) < 2 or min(op.inputs[:2]) < 0:
        return []
    w = g.tensor(op.inputs[1])
    if w.is_float or not w.shape or w.shape[-1] >= ARM_MIN_FC_DEPTH:
        return []
    return [_issue("shallow_fully_connected", op, w, f"integer FULLY_CONNECTED with an input depth of {w.shape[-1]} "
                   f"(under {ARM_MIN_FC_DEPTH}): tflite-runtime 2.14 crashes on it on arm64 and armv7")]


def _convert_issues(g: _Graph, op: Operator) -> list[NpuIssue]:
    """QUANTIZE to / DEQUANTIZE from a per-channel tensor is refused."""
    if op.name not in ("QUANTIZE", "DEQUANTIZE") or not op.inputs or not op.outputs:
        return []
    src, dst = g.tensor(op.inputs[0]), g.tensor(op.outputs[0])
    side = dst if op.name == "QUANTIZE" else src
    if (src.is_float or dst.is_float) and side.quantization is not None and side.quantization.per_channel:
        return [_issue("per_channel_io", op, side, f"{op.name} with a per-channel quantized side is refused")]
    return []


def _tensor_issues(g: _Graph, index: int, npu: set[int]) -> list[NpuIssue]:
    """Type and quantization issues of one tensor touched by an NPU op."""
    t = g.tensor(index)
    writer = g.producer.get(index)
    readers = [i for i in g.consumers.get(index, []) if i in npu]
    op = g.sg.operators[writer] if writer is not None else (g.sg.operators[readers[0]] if readers else None)
    if t.is_float and not t.is_constant and not _float_ok(g, index, npu):
        if index in g.inputs:
            where = "model input read by other ops than QUANTIZE"
        elif index in g.outputs:
            where = "model output not produced by a boundary DEQUANTIZE"
        else:
            where = "activation inside the graph"
        return [_issue("float_tensor", op, t, f"{t.dtype} {where}")]
    if t.dtype in _REFUSED_TYPES:
        return [_issue(f"{t.dtype.lower()}_tensor", op, t, f"{t.dtype} tensor: refused by several VX ops")]
    if t.dtype in _INT8_TYPES and t.quantization is None:
        return [_issue("no_quant_params", op, t, f"{t.dtype} tensor without quantization parameters")]
    return []


def _shape_issues(g: _Graph) -> list[NpuIssue]:
    """Dynamic shapes (where they start), batch other than 1 and per-channel quantized model I/O."""
    out = []
    ops = g.sg.operators
    for i, t in enumerate(g.sg.tensors):
        if not t.is_dynamic:
            continue
        writer = g.producer.get(i)
        if writer is None and i not in g.inputs:
            continue
        if writer is None or not any(g.tensor(x).is_dynamic for x in ops[writer].inputs if x >= 0):
            op = ops[writer] if writer is not None else None
            msg = f"dynamic shape {list(t.shape_signature)}: export with a fixed batch of 1 and fixed sizes"
            out.append(_issue("dynamic_shape", op, t, msg))
    for i in g.sg.inputs:
        t = g.tensor(i)
        if len(t.shape) >= 2 and t.shape_signature[0] >= 0 and t.shape[0] != 1:
            out.append(_issue("batch_not_1", None, t, f"model input batch {t.shape[0]}: export with a batch of 1"))
    for i in (*g.sg.inputs, *g.sg.outputs):
        t = g.tensor(i)
        if t.quantization is not None and t.quantization.per_channel and not t.is_float:
            msg = f"per-channel quantized model {'input' if i in g.inputs else 'output'}: must be per-tensor"
            out.append(_issue("per_channel_io", None, t, msg))
    return out


def check_npu(path_or_bytes, allow_float_tail: bool = False) -> NpuReport:
    """List every op and tensor of the main subgraph that the i.MX 8M Plus VX delegate would not take.

    `allow_float_tail=True` accepts float ops downstream of a DEQUANTIZE (a --float-heads export): they are
    reported as CPU ops with their share of MACs instead of failing the check. Custom ops fail everywhere.
    """
    model = _as_model(path_or_bytes)
    g = _Graph(model.main)
    ops = g.sg.operators
    tail = _float_tail(g) if allow_float_tail else set()
    npu = {op.index for op in ops} - tail
    issues = [i for op in ops if op.index in npu for i in _op_issues(g, op, npu)]
    tail_custom = [ops[i] for i in sorted(tail) if ops[i].is_custom]
    issues += [_issue("custom_op", op, None, f"custom op '{op.name}' (CPU tail)") for op in tail_custom]
    touched = sorted({t for i in npu for t in g.op_tensors(ops[i])})
    issues += [i for t in touched for i in _tensor_issues(g, t, npu)]
    issues += _shape_issues(g)
    issues.sort(key=lambda i: (i.op_index if i.op_index is not None else -1))
    report = NpuReport(
        source=model.source,
        n_ops=len(ops),
        op_histogram=dict(Counter(op.name for op in ops).most_common()),
        issues=issues,
        cpu_ops=sorted(tail),
        macs=sum(op_macs(g.sg, op) for op in ops),
        cpu_macs=sum(op_macs(g.sg, ops[i]) for i in tail),
        allow_float_tail=allow_float_tail,
        float_io=any(g.tensor(i).is_float for i in (*g.sg.inputs, *g.sg.outputs)),
    )
    if issues and not allow_float_tail and check_npu(model, allow_float_tail=True).ok:
        report.hint = ("all of them downstream of a DEQUANTIZE (a --float-heads export? check with "
                       "allow_float_tail=True)")
    return report


def check_cora_z7(path_or_bytes) -> NpuReport:
    """Can the Cora Z7's Cortex-A9 run this .tflite with tflite_runtime? Only if no operator computes in float.

    The tflite_runtime wheels for 32-bit ARM (2.14.0 manylinux_2_34_armv7l, 2.13.0 before it) are built for VFPv4:
    their float kernels contain fused multiply-add instructions, which the A9 (VFPv3 + NEON) does not have, and a
    float model dies with SIGILL there (tools/arm_board_check.sh shows it under qemu's cortex-a9). Its int8 kernels
    run: an instruction trace of the int8 model executed no FMA. So every operator whose tensors include a float one
    fails, the boundary QUANTIZE / DEQUANTIZE of a float-I/O model too (they compute x / scale + zero point in
    float, with the same compiler flags), and so do custom ops (tflite_runtime has none). The NPU's rules (its op
    list, per-channel I/O, dynamic shapes) do not apply: the CPU's built-in kernels take them.
    """
    model = _as_model(path_or_bytes)
    g = _Graph(model.main)
    ops = g.sg.operators
    issues = []
    for op in ops:
        if op.is_custom:
            issues.append(_issue("custom_op", op, None, f"custom op '{op.name}': tflite_runtime has no such kernel"))
            continue
        floats = [g.tensor(t) for t in g.op_tensors(op) if g.tensor(t).is_float]
        if floats:
            names = ", ".join(f"'{t.name}'" for t in floats[:3]) + (" ..." if len(floats) > 3 else "")
            issues.append(_issue("float_op", op, floats[0], f"{op.name} computes in {floats[0].dtype} ({names}): "
                                 "float kernels of the armv7 wheel use VFPv4 FMA, which the Cortex-A9 lacks"))
            continue
        issues += _arm_cpu_issues(g, op)
    return NpuReport(
        source=model.source,
        n_ops=len(ops),
        op_histogram=dict(Counter(op.name for op in ops).most_common()),
        issues=issues,
        macs=sum(op_macs(g.sg, op) for op in ops),
        float_io=any(g.tensor(i).is_float for i in (*g.sg.inputs, *g.sg.outputs)),
        target="cora-z7",
    )


def check_target(path_or_bytes, target: str = "imx8mp", allow_float_tail: bool = False) -> NpuReport:
    """`check_npu` for the i.MX 8M Plus NPU, `check_cora_z7` for the Cora Z7 (no float tail can be allowed there)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    if target == "cora-z7":
        if allow_float_tail:
            raise ValueError("--allow-float-tail has no meaning for cora-z7: a float operator crashes the Cortex-A9")
        return check_cora_z7(path_or_bytes)
    return check_npu(path_or_bytes, allow_float_tail=allow_float_tail)
