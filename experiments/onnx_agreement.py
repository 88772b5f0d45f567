"""Do the ONNX exports answer like the models they came from? Both paths, on a held-out set.

    python experiments/onnx_agreement.py RUN --data TEST_DATA [--out experiments/results/onnx_agreement.md]

Path 1: the int8 .tflite (RUN/model_int8.tflite) -> ONNX (QDQ), compared with the .tflite.
Path 2: the float Keras model (RUN/float.keras) -> ONNX, compared with Keras.
Same decoded frames for all four models; reports leaf agreement (argmax of the hierarchical leaf
probability), the largest absolute difference of any head probability, and each model's leaf accuracy.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="all")
    p.add_argument("--out", type=Path, default=Path("experiments/results/onnx_agreement.md"))
    args = p.parse_args()

    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.export.onnx import export_onnx
    from semhinet_tf.predict import Predictor
    from semhinet_tf.workflow import decode_items, model_context

    pairs = [("int8 .tflite -> ONNX (QDQ)", args.run / "model_int8.tflite"),
             ("float Keras -> ONNX", args.run / "float.keras")]
    lines = [f"Run `{args.run}`, data `{args.data}` (split: {args.split}); onnxruntime on the CPU.", "",
             "| path | images | leaf agreement | largest probability difference | source leaf acc | ONNX leaf acc |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in pairs:
            onnx_path = Path(tmp) / f"{source.stem}.onnx"
            export_onnx(source, onnx_path)
            ref, onnx = Predictor(source), Predictor(onnx_path)
            taxonomy, pre, run_dir = model_context(ref)
            items, split, notes = eval_items(args.data, taxonomy, args.run, args.split)
            frames, _, truth = decode_items(items, pre, taxonomy, notes, progress=False)
            a, b = ref.predict(frames), onnx.predict(frames)
            la, lb = taxonomy.leaf_probabilities(a).argmax(1), taxonomy.leaf_probabilities(b).argmax(1)
            diff = max(float(np.abs(a[h] - b[h]).max()) for h in taxonomy.head_names)
            lines.append(f"| {name} | {len(frames)} | {np.mean(la == lb):.2%} ({int((la == lb).sum())}/{len(la)}) "
                         f"| {diff:.4f} | {np.mean(la == truth):.3f} | {np.mean(lb == truth):.3f} |")
            print(lines[-1], flush=True)
    lines += ["", "Reproduce: `python " + " ".join(shlex.quote(x) for x in sys.argv) + "`"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
