"""Do the ONNX exports answer like the models they came from? Both paths, on a held-out set, and how far
TFLite's own int8 kernels agree with each other, for scale.

    python experiments/onnx_agreement.py RUN --data TEST_DATA [--split all] [--out RESULT.md]

Path 1: the int8 .tflite (RUN/model_int8.tflite) -> ONNX, compared with the .tflite: as exported by
default (int8 hard-swish and add as tables taken from TFLite) and with `--plain-qdq` (tf2onnx's QDQ operators,
which onnxruntime computes in float and rounds its own way).
Path 2: the float Keras model (RUN/float.keras) -> ONNX, compared with Keras.
Same decoded frames for every model; reports leaf agreement (argmax of the hierarchical leaf
probability), the largest absolute difference of any head probability, and each model's leaf accuracy.

Then the same int8 .tflite on four int8 engines: TFLite's default (XNNPACK), TFLite's built-in optimized
kernels, TFLite's reference kernels and onnxruntime (both exports), plus, for scale, the default engine
on the same frames with random +-1 grey-level noise added. Each engine rounds differently, and the
board's NPU is one more such engine; the pairwise table says how many verdicts that moves, and whether
any of them is one the model answers with confidence (leaf probability at or above the run's review
threshold) rather than one it already sends to review.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from results_file import write_result


def _pair_rows(outs: dict[str, dict[str, np.ndarray]], taxonomy, threshold: float) -> list[str]:
    leaf = {k: taxonomy.leaf_probabilities(v) for k, v in outs.items()}
    names = list(outs)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            la, lb = leaf[a].argmax(1), leaf[b].argmax(1)
            differ = la != lb
            confident = (leaf[a].max(1) >= threshold) | (leaf[b].max(1) >= threshold)
            top = max(float(leaf[a].max(1)[differ].max()), float(leaf[b].max(1)[differ].max())) if differ.any() else 0.0
            diff = max(float(np.abs(outs[a][h] - outs[b][h]).max()) for h in taxonomy.head_names)
            rows.append(f"| {a} | {b} | {np.mean(~differ):.2%} ({int((~differ).sum())}/{len(la)}) | {diff:.4f} "
                        f"| {int((differ & confident).sum())} | {top:.3f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="all")
    p.add_argument("--out", type=Path, default=Path("experiments/results/onnx_agreement.md"))
    p.add_argument("--no-reference", action="store_true", help="skip TFLite's reference kernels")
    args = p.parse_args()

    from semhinet_tf.board.runtime import BoardModel
    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.engines import load_model
    from semhinet_tf.export.onnx import export_onnx
    from semhinet_tf.workflow import decode_items

    int8 = args.run / "model_int8.tflite"
    pairs = [("int8 .tflite -> ONNX (default: uint8 activations and weights, TFLite's tables)", int8, True),
             ("int8 .tflite -> ONNX (--plain-qdq)", int8, False),
             ("float Keras -> ONNX", args.run / "float.keras", True)]
    lines = [f"Run `{args.run}`, data `{args.data}` (split: {args.split}); onnxruntime on the CPU.", "",
             "| path | images | leaf agreement | largest probability difference | source leaf acc | ONNX leaf acc |",
             "|---|---|---|---|---|---|"]
    engines: dict[str, dict[str, np.ndarray]] = {}
    stability: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, tables in pairs:
            onnx_path = Path(tmp) / f"{source.stem}_{tables}.onnx"
            export_onnx(source, onnx_path, tflite_tables=tables)
            ref, onnx = load_model(source), load_model(onnx_path)
            taxonomy, pre = ref.taxonomy, ref.preprocess
            items, split, notes = eval_items(args.data, taxonomy, args.run, args.split)
            frames, _, truth = decode_items(items, pre, taxonomy, notes, progress=False)
            a, b = ref.predict(frames), onnx.predict(frames)
            la, lb = taxonomy.leaf_probabilities(a).argmax(1), taxonomy.leaf_probabilities(b).argmax(1)
            diff = max(float(np.abs(a[h] - b[h]).max()) for h in taxonomy.head_names)
            lines.append(f"| {name} | {len(frames)} | {np.mean(la == lb):.2%} ({int((la == lb).sum())}/{len(la)}) "
                         f"| {diff:.4f} | {np.mean(la == truth):.3f} | {np.mean(lb == truth):.3f} |")
            print(lines[-1], flush=True)
            if source == int8 and not tables:
                engines["onnxruntime (--plain-qdq)"] = b
                continue
            nudged = np.clip(frames.astype(np.int16) + np.random.default_rng(0).integers(-1, 2, frames.shape),
                             0, 255).astype(np.uint8)
            c = ref.predict(nudged)  # for scale: a perturbation far below what a detector resolves
            ln = taxonomy.leaf_probabilities(c).argmax(1)
            stability.append(f"{source.name} keeps {np.mean(ln == la):.2%} of its verdicts under +-1 grey-level noise")
            if source == int8:
                engines["TFLite default (XNNPACK)"] = a
                engines["TFLite built-in kernels"] = BoardModel(int8, kernels="builtin").predict(frames)
                if not args.no_reference:  # not offered to users: these kernels abort on some PTQ models
                    engines["TFLite reference kernels"] = BoardModel(int8, kernels="reference").predict(frames)
                engines["onnxruntime (as exported)"] = b
                engines["TFLite default, input +-1 grey level"] = c
                engine_truth, engine_taxonomy = truth, taxonomy
    threshold = float(json.loads((args.run / "review_threshold.json").read_text())["threshold"])
    lines += ["", f"The int8 .tflite on {len(engines)} int8 engines ({len(engine_truth)} frames; review threshold "
              f"{threshold:.3f} from the run):", "",
              "| engine | engine | leaf agreement | largest probability difference | confident disagreements "
              "| highest leaf probability among disagreements |", "|---|---|---|---|---|---|"]
    lines += _pair_rows(engines, engine_taxonomy, threshold)
    accs = ", ".join(f"{k} {np.mean(engine_taxonomy.leaf_probabilities(v).argmax(1) == engine_truth):.4f}"
                     for k, v in engines.items())
    lines += ["", f"Leaf accuracy: {accs}.", "", "Stability: " + "; ".join(stability) + "."]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
