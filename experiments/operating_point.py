"""Where the gatekeeper's operating point puts leaf accuracy: one trained hierarchical model, its heads'
class balancing undone step by step at decision time, against flat softmax models.

    python experiments/operating_point.py --test TEST --hier RUN [RUN ...] --flat RUN [RUN ...] \
        [--out experiments/results/operating_point.md]

The default training weights every head's classes equally (losses.head_class_weights), so a head learns
p(c|x) / pi(c) up to a constant, pi(c) being the class's share under the sampler (leaf-balanced sampling:
bogus 1/8, normal 1/8, defect 6/8 at the gatekeeper), and calls bogus, normal and defect with similar
recall. A flat softmax learns p(leaf|x) itself, which on a test set with the sampler's leaf shares (the
benchmark's: 100 a class) is the decision that maximises leaf accuracy. Multiplying each head's
probabilities by pi(c)^t, t from 0 to 1, moves the same model from the first decision to the second
without retraining. The table and the plot show leaf accuracy and gatekeeper recalls along the way, and
where the flat models sit. Runs are `semhinet train` output folders; their float.keras is evaluated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from results_file import write_result

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def training_priors(run: Path, taxonomy) -> dict[str, np.ndarray]:
    """Per head, each class's share among the training images it applies to, under the run's sampler."""
    from semhinet_tf.losses import head_class_priors

    split = json.loads((run / "split.json").read_text())
    sampler = json.loads((run / "config.json").read_text())["train"].get("sampler", "balanced")
    counts = [split["counts"].get(leaf, {}).get("train", 0) for leaf in taxonomy.leaves]
    leaf_ids = np.repeat(np.arange(len(counts)), counts)
    priors = head_class_priors(taxonomy.label_matrix(), leaf_ids, sampler, [h.num_classes for h in taxonomy.heads])
    return {h.name: np.asarray(p) for h, p in zip(taxonomy.heads, priors, strict=True)}


def shifted(probs: dict[str, np.ndarray], priors: dict[str, np.ndarray], strength: float) -> dict[str, np.ndarray]:
    """Each head's probabilities times prior^strength, renormalised (classes never trained on keep factor 1)."""
    out = {}
    for name, p in probs.items():
        prior = priors[name]
        factor = np.where(prior > 0, np.maximum(prior, 1e-12) ** strength, 1.0)
        q = np.asarray(p, dtype=np.float64) * factor
        out[name] = q / q.sum(axis=1, keepdims=True)
    return out


def scores(result: dict, root: str) -> dict:
    s = result["summary"]
    precision = [v for v in s["specialist_precision"].values() if v is not None]
    router = [v for k, v in s.items() if k.endswith("_router_accuracy")]
    return {"leaf": result["leaf"]["accuracy"], "recall": dict(s[f"{root}_recall"]),
            "router": router[0] if router else None, "precision_min": min(precision) if precision else None}


def evaluate_run(run: Path, test: Path, strengths: tuple[float, ...] | None) -> list[dict]:
    """Scores of RUN/float.keras on TEST, at each strength (hierarchical) or as it is (strengths None)."""
    from semhinet_tf.evaluate import evaluate, root_head
    from semhinet_tf.taxonomy import load_taxonomy
    from semhinet_tf.workflow import eval_model

    taxonomy = load_taxonomy(run / "taxonomy.json")
    root = root_head(taxonomy)
    out = eval_model(run / "float.keras", test, split="all", progress=False)
    if strengths is None:
        return [scores(out["result"], root)]
    probs = taxonomy.as_head_probabilities(out["probs"])
    priors = training_priors(run, taxonomy)
    return [scores(evaluate(out["leaf_ids"], shifted(probs, priors, t), taxonomy, str(run), "keras"), root)
            for t in strengths]


def mean_row(name: str, per_run: list[dict]) -> str:
    def m(values):
        values = [v for v in values if v is not None]
        return f"{np.mean(values):.3f}" if values else "-"

    leaf = " / ".join(f"{r['leaf']:.3f}" for r in per_run)
    classes = list(per_run[0]["recall"])
    recalls = " | ".join(m([r["recall"][c] for r in per_run]) for c in classes)
    return (f"| {name} | {m([r['leaf'] for r in per_run])} [{leaf}] | {recalls} "
            f"| {m([min(v for v in r['recall'].values() if v is not None) for r in per_run])} "
            f"| {m([r['router'] for r in per_run])} | {m([r['precision_min'] for r in per_run])} |")


def plot(hier: list[list[dict]], flat: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, curve in enumerate(hier):
        x = [min(v for v in r["recall"].values() if v is not None) for r in curve]
        ax.plot(x, [r["leaf"] for r in curve], "o-", color="tab:blue", alpha=0.8,
                label="five heads, balancing undone by t = 0 ... 1" if i == 0 else None)
        ax.annotate("t=0", (x[0], curve[0]["leaf"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.plot([min(v for v in r["recall"].values() if v is not None) for r in flat], [r["leaf"] for r in flat],
            "s", color="tab:red", label="flat 8-way softmax")
    ax.set_xlabel("gatekeeper recall, lowest of its classes")
    ax.set_ylabel("leaf accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--hier", type=Path, nargs="+", required=True, help="runs of the five-head model (seeds)")
    p.add_argument("--flat", type=Path, nargs="*", default=[], help="runs of the flat model (seeds)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/operating_point.md"))
    args = p.parse_args()

    hier = [evaluate_run(run, args.test, STRENGTHS) for run in args.hier]
    flat = [evaluate_run(run, args.test, None)[0] for run in args.flat]
    classes = list(hier[0][0]["recall"])
    lines = [f"Test: `{args.test}` (every image); float models; each figure the mean over the runs listed, leaf "
             "accuracy per run in brackets. t = 0 is the model's own decision, t = 1 undoes the heads' class "
             "balancing completely.", "",
             "| decision | leaf acc | " + " | ".join(f"gatekeeper recall {c}" for c in classes)
             + " | gatekeeper recall min | router acc | specialist precision min |",
             "|---|---|" + "---|" * len(classes) + "---|---|---|"]
    for i, t in enumerate(STRENGTHS):
        lines.append(mean_row(f"five heads, t = {t:g}", [curve[i] for curve in hier]))
    if flat:
        lines.append(mean_row("flat 8-way softmax", flat))
    figure = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(hier, flat, figure)
    lines += ["", f"![leaf accuracy against the gatekeeper's lowest recall]({figure.name})", "",
              "Runs: five heads " + ", ".join(f"`{r}`" for r in args.hier)
              + ("; flat " + ", ".join(f"`{r}`" for r in args.flat) if flat else "") + "."]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
