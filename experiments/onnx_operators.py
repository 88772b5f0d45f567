"""Which int8 operators does onnxruntime compute differently from TFLite? Each one alone, on real activations.

    python experiments/onnx_operators.py RUN --data TEST_DATA [--frames 8] [--out RESULT.md]

Every operator of RUN/model_int8.tflite is cut out as a one-operator .tflite (`onnx_tables.single_operator_model`)
and fed the same inputs: the activations it receives when the whole model runs on TFLite's built-in kernels
(the only engine whose intermediate tensors can be read) over a few test frames. Each one-operator model then
runs on TFLite's default CPU engine (XNNPACK, what `eval`, `predict` and the board runtime use on a host), on
TFLite's built-in kernels, and through tf2onnx on onnxruntime: as plain QDQ, with int8 activations
held as uint8, and as `semhinet export-onnx` writes it by default (uint8 activations and tables). The table
says, per operator type, how many operators and what share of their output elements land on another int8 code
than XNNPACK's.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from results_file import write_result

ENGINES = ("TFLite built-in kernels", "onnxruntime, plain QDQ", "onnxruntime, uint8 activations",
           "onnxruntime, as exported (uint8 + tables)")


def _capture(tflite: Path, frames: np.ndarray) -> list[dict[int, np.ndarray]]:
    """Every tensor of the whole model, per frame, on TFLite's built-in kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(str(tflite), experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    image = it.get_input_details()[0]
    out = []
    for frame in frames:
        it.set_tensor(image["index"], frame[None, :, :, None].astype(image["dtype"]))
        it.invoke()
        out.append({d["index"]: it.get_tensor(d["index"]).copy() for d in it.get_tensor_details() if d["index"] >= 0})
    return out


def _run_tflite(path: Path, captured, builtin: bool) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw = {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if builtin else {}
    it = Interpreter(str(path), **kw)
    it.allocate_tensors()
    res = []
    for cap in captured:
        for d in it.get_input_details():
            it.set_tensor(d["index"], cap[d["index"]])
        it.invoke()
        res.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
    return np.stack(res)


def _run_onnx(path: Path, live: list[int], tensors, captured, variant: str, like: np.ndarray) -> np.ndarray:
    """The one-operator model through tf2onnx on onnxruntime: "plain", "uint8" (activations as uint8, like the
    export; the operator's own int8 inputs and output too, fed and read as codes + 128) or "export" (and tables)."""
    import onnxruntime as ort
    import tf2onnx

    from semhinet_tf.export.onnx_tables import tabulate_elementwise, uint8_activations

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_tflite(str(path), opset=17)
    if variant != "plain":
        uint8_activations(proto, graph_io=True)
    if variant == "export":
        tabulate_elementwise(proto, path)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    by_name = {tensors[i].name.decode(): i for i in live}
    inputs = session.get_inputs()
    index = [by_name.get(x.name, live[k]) for k, x in enumerate(inputs)]  # tf2onnx keeps names, else order

    def feed(x, value):
        return (value.astype(np.int16) + 128).astype(np.uint8) if x.type == "tensor(uint8)" and value.dtype == np.int8 \
            else value

    shift = 128 if session.get_outputs()[0].type == "tensor(uint8)" and like.dtype == np.int8 else 0
    res = [session.run(None, {x.name: feed(x, cap[i]) for x, i in zip(inputs, index, strict=True)})[0]
           for cap in captured]
    return (np.stack(res).astype(np.int64) - shift).reshape(like.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("experiments/results/onnx_operators.md"))
    args = p.parse_args()

    from tensorflow.lite.tools import flatbuffer_utils

    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.engines import load_model
    from semhinet_tf.export.onnx_tables import operator_names, single_operator_model
    from semhinet_tf.workflow import decode_items

    tflite = args.run / "model_int8.tflite"
    engine = load_model(tflite)
    taxonomy, pre = engine.taxonomy, engine.preprocess
    items, _, notes = eval_items(args.data, taxonomy, args.run, "all")
    step = max(1, len(items) // args.frames)
    frames, _, _ = decode_items(items[::step][:args.frames], pre, taxonomy, notes, progress=False)
    captured = _capture(tflite, frames)
    model = flatbuffer_utils.read_model(str(tflite))
    tensors = model.subgraphs[0].tensors
    names = operator_names(model)
    # per type: operators, then per engine [operators with any different element, different elements], elements
    stats: dict[str, list] = defaultdict(lambda: [0, {e: [0, 0] for e in ENGINES}, 0])
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(names):
            path = Path(tmp) / f"op{index}.tflite"
            live = single_operator_model(model, index, path)
            xnn_codes = _run_tflite(path, captured, builtin=False)
            xnn = xnn_codes.astype(np.int64)
            got = {ENGINES[0]: _run_tflite(path, captured, builtin=True)}
            for engine, variant in zip(ENGINES[1:], ("plain", "uint8", "export"), strict=True):
                got[engine] = _run_onnx(path, live, tensors, captured, variant, xnn_codes)
            st = stats[name]
            st[0] += 1
            st[2] += xnn.size
            for engine, out in got.items():
                off = int(np.sum(out.astype(np.int64) != xnn))
                st[1][engine][0] += int(off > 0)
                st[1][engine][1] += off
            print(index, name, {e: int(np.sum(o.astype(np.int64) != xnn)) for e, o in got.items()}, flush=True)
    lines = [f"Run `{args.run}`, {len(frames)} frames of `{args.data}`; each operator of the int8 .tflite alone, "
             "fed the activations of a whole-model run.", "",
             "Operators (and output elements) on another int8 code than TFLite's default engine (XNNPACK):", "",
             "| operator | count | " + " | ".join(ENGINES) + " |", "|---|---|" + "---|" * len(ENGINES)]
    for name, (count, per, elements) in sorted(stats.items()):
        cells = [f"{per[e][0]} ({per[e][1] / elements:.1e})" if per[e][0] else "0" for e in ENGINES]
        lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
