"""What test-time views buy: a run's float and int8 models scored on 1, 2, 4 and 8 flips/quarter turns of
each frame, log-averaged (semhinet_tf.data.views), with what each costs in inferences and milliseconds.

    python experiments/test_time_views.py RUN --test TEST [--limit N] [--out experiments/results/test_time_views.md]

Each view of each frame is predicted once and the averages over the first 2, 4 and 8 views are formed from
those predictions, so the rows of one model differ only in how many views are averaged. "gained / lost"
counts the frames whose leaf verdict turns right / wrong against one view, the paired evidence that a
difference is more than noise. A row with a plain (arithmetic) mean of the same eight views shows what
the log-average adds. Milliseconds are the wall time of this script's passes per frame (the engine's
batch on the host, not the board's one-frame latency; `python -m semhinet_tf.board --views N` reports that).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from results_file import write_result


def per_view_predictions(predictor, frames: np.ndarray, views: list[str]) -> tuple[list[dict], list[float]]:
    from tqdm import tqdm

    from semhinet_tf.data.views import apply_view

    out, seconds = [], []
    for name in tqdm(views, desc=f"{predictor.path.name} views", unit="view"):
        t = time.perf_counter()
        out.append(predictor.predict(apply_view(frames, name)))
        seconds.append(time.perf_counter() - t)
    return out, seconds


def scores(result: dict) -> dict:
    s = result["summary"]
    precision = {k: v for k, v in s["specialist_precision"].items() if v is not None}
    return {"leaf": result["leaf"]["accuracy"], "h1": s["h1_recall"], "router": s["h2_router_accuracy"],
            "precision": precision}


def leaf_right(probs: dict, truth: np.ndarray, taxonomy) -> np.ndarray:
    return taxonomy.leaf_probabilities(probs).argmax(1) == truth


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("leaf", "router", "defect"),
                              ("leaf accuracy", "router accuracy", "gatekeeper recall of defects"), strict=True):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = [(r["views"], r[key]) for r in rows if r["model"] == model and r["mean"] == "log"]
            ax.plot(*zip(*pts, strict=True), marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("test-time views")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `semhinet train` run folder (float.keras, model_int8.tflite)")
    ap.add_argument("--test", type=Path, required=True, help="labelled test folder (every image is used)")
    ap.add_argument("--models", default="float.keras,model_int8.tflite", help="files of the run to score")
    ap.add_argument("--limit", type=int, default=0, help="score a seeded random subset of this many frames")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/test_time_views.md"))
    args = ap.parse_args()

    from semhinet_tf.data.dataset import eval_items
    from semhinet_tf.data.views import log_average, view_counts
    from semhinet_tf.engines import load_model
    from semhinet_tf.evaluate import evaluate
    from semhinet_tf.workflow import decode_items

    rows = []
    frames = truth = None
    for name in args.models.split(","):
        predictor = load_model(args.run / name)
        taxonomy, pre = predictor.taxonomy, predictor.preprocess
        if frames is None:
            items, _, notes = eval_items(args.test, taxonomy, None, "all")
            if args.limit:
                keep = np.random.default_rng(0).permutation(len(items))[:args.limit]
                items = [items[i] for i in sorted(keep)]
            frames, _, truth = decode_items(items, pre, taxonomy, notes)
        available = predictor.spec.view_names()
        views = available[:max(view_counts(available))]
        per_view, seconds = per_view_predictions(predictor, frames, views)
        right_1 = leaf_right(per_view[0], truth, taxonomy)
        for n, mean in [(n, "log") for n in view_counts(views)] + [(len(views), "plain")]:
            if mean == "plain" and n == 1:
                continue
            probs = per_view[0] if n == 1 else (
                log_average(per_view[:n]) if mean == "log"
                else {h: np.mean([p[h] for p in per_view[:n]], axis=0) for h in per_view[0]})
            s = scores(evaluate(truth, probs, taxonomy, model_name=name, fmt=predictor.format))
            right = leaf_right(probs, truth, taxonomy)
            rows.append({"model": name, "views": n, "mean": mean, "leaf": s["leaf"], "router": s["router"],
                         "defect": s["h1"]["defect"], "h1": s["h1"], "precision": s["precision"],
                         "gained": int(np.sum(right & ~right_1)), "lost": int(np.sum(~right & right_1)),
                         "ms": 1000 * sum(seconds[:n]) / len(frames)})
            print(f"{name} {n} views ({mean}): leaf {s['leaf']:.4f} router {s['router']:.3f}", flush=True)

    leaves = list(rows[0]["precision"])
    lines = [f"Run `{args.run.name}`, test `{args.test.name}` ({len(truth)} frames"
             f"{', a seeded random subset' if args.limit else ''}); log = mean of log-probabilities renormalised "
             "(the shipped rule), plain = arithmetic mean of probabilities.", "",
             "| model | views | mean | leaf acc | gained / lost vs 1 view | h1 recall bogus / normal / defect | "
             "h2 router acc | specialist precision " + " / ".join(leaves) + " | ms per frame (host, batched) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h1 = " / ".join(f"{r['h1'][k]:.3f}" for k in ("bogus", "normal", "defect"))
        prec = " / ".join(f"{r['precision'][leaf]:.3f}" if leaf in r["precision"] else "-" for leaf in leaves)
        lines.append(f"| {r['model']} | {r['views']} | {r['mean']} | {r['leaf']:.4f} | {r['gained']} / {r['lost']} | "
                     f"{h1} | {r['router']:.3f} | {prec} | {r['ms']:.1f} |")
    png = args.out.with_suffix(".png")
    plot(rows, png)
    lines += ["", f"![accuracy against test-time views]({png.name})"]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
