"""Which int8 route keeps the float model's accuracy: QAT vs post-training quantization, per-channel vs per-tensor.

    python experiments/quantization.py RUN --data DATA [--extra-run RUN_PER_TENSOR_QAT] [--test TEST_DATA] \
        [--out experiments/results/quantization.md]

Converts the run's models several ways (QAT as trained; PTQ of the float model per-channel and
per-tensor; optionally a second run trained with --granularity per-tensor), evaluates each .tflite on
the run's held-out split (or on every image of a separately generated --test set), and writes a
Markdown table of the summary metrics with float-vs-int8 deltas
and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from results_file import write_result


def variants(run: Path, extra: Path | None) -> list[tuple[str, Path, dict]]:
    out = [("QAT, as trained", run, {"source": "qat"}),
           ("PTQ per-channel", run, {"source": "float", "granularity": "per-channel"}),
           ("PTQ per-tensor", run, {"source": "float", "granularity": "per-tensor"})]
    if extra is not None:
        out.append(("QAT per-tensor (second run)", extra, {"source": "qat"}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--extra-run", type=Path, default=None, help="a run trained with --granularity per-tensor")
    p.add_argument("--test", type=Path, default=None, help="evaluate on all of this folder instead of the val split")
    p.add_argument("--out", type=Path, default=Path("experiments/results/quantization.md"))
    args = p.parse_args()
    data, split = (args.test, "all") if args.test else (args.data, "val")

    from semhinet_tf.export.convert import convert_run
    from semhinet_tf.workflow import eval_model

    work = args.out.parent / "quantization_models"
    work.mkdir(parents=True, exist_ok=True)
    float_eval = eval_model(args.run / "float.keras", data, split=split, progress=False)["result"]
    rows = [("float (Keras)", float_eval, None, None)]
    for i, (name, run, opts) in enumerate(variants(args.run, args.extra_run)):
        t = time.time()
        tflite = work / f"variant{i}.tflite"
        info = convert_run(run, tflite, overwrite=True, progress=False, **opts)
        res = eval_model(tflite, data, split=split, progress=False, run_dir=run)["result"]
        rows.append((name, res, info["npu_ok"], time.time() - t))
    write_result([render(rows, float_eval)], args.out)


def headline(result: dict) -> dict:
    """The seed's headline figures from an eval result: worst gatekeeper recall, router, worst specialist."""
    s = result["summary"]
    recalls = [v for v in s["h1_recall"].values() if v is not None]
    precisions = [v for v in s["specialist_precision"].values() if v is not None]
    return {"h1_recall_min": min(recalls) if recalls else None, "h2_router_accuracy": s["h2_router_accuracy"],
            "specialist_precision_min": min(precisions) if precisions else None}


def render(rows, float_eval) -> str:
    ref = float_eval["leaf"]["accuracy"]
    lines = ["| model | leaf acc | Δ vs float (points) | h1 recall min | h2 router acc | specialist precision min "
             "| NPU check | convert+eval s |", "|---|---|---|---|---|---|---|---|"]
    for name, res, npu_ok, seconds in rows:
        h = headline(res)
        acc = res["leaf"]["accuracy"]
        lines.append(f"| {name} | {acc:.4f} | {100 * (acc - ref):+.2f} | {_fmt(h.get('h1_recall_min'))} | "
                     f"{_fmt(h.get('h2_router_accuracy'))} | {_fmt(h.get('specialist_precision_min'))} | "
                     f"{'-' if npu_ok is None else ('PASS' if npu_ok else 'FAIL')} | "
                     f"{'-' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    main()
