"""How visible are the generator's defects? An ideal-observer bound on what any classifier can reach.

    python experiments/detectability.py --seed 202 --per-class 100 [--size 256] [--difficulty 0.5] \
        [--predictions RUN_PREDICTIONS.csv] [--out experiments/results/detectability.md]

For every defect frame the generator can also render its clean twin (same pattern, same noise) and the
same clean frame with an independent noise draw. The defect's signature is then delta = frame - twin and the
pixel noise is sigma = std(twin - twin') / sqrt(2), with the scan-line offsets (one per row, which an
observer could subtract) removed first. The matched-filter SNR d = ||delta|| / sigma is what an observer who
knows exactly *what* and *where* the defect is could use; no classifier can do better. At a false-alarm rate
alpha on normal frames such an observer detects the frame with probability Phi(d - z_(1-alpha)), so the mean
over frames bounds the gatekeeper's defect recall at normal recall 1 - alpha (Gaussian, white-noise model).

With --predictions (the JSON lines of `semhinet predict MODEL FOLDER` on the same generated folder) a
second table shows the model's recall by defect severity (the generator's per-frame s, 0 = faint, 1 =
obvious) and how often each class is called `normal`: the evidence of where the errors sit.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
from results_file import write_result

from semhinet_tf.data import synth


def frame_snr(leaf: str, seed: int, k: int, size: int, difficulty: float) -> tuple[float, float]:
    """(matched-filter SNR of image k's defect against its clean twin, the defect's severity s)."""
    rng = np.random.default_rng(synth.image_seed(seed, leaf, k))
    scene_seed, defect_seed, noise_seed = synth._streams(rng)
    scene_rng, defect_rng = np.random.default_rng(scene_seed), np.random.default_rng(defect_seed)
    scene = synth._sample_scene(scene_rng, size, difficulty)
    pat = synth._make_pattern(scene, scene_rng)
    clean_h, clean_y = pat.height.copy(), pat.yield_map.copy()
    severity = synth._severity(defect_rng, difficulty)
    synth.DEFECT_FUNCS[leaf](pat, defect_rng, severity)
    np.clip(pat.height, 0.0, 1.3, out=pat.height)

    def shot(height, yield_map, noise):
        return synth._to_uint8(synth._image(height, yield_map, scene, np.random.default_rng(noise))).astype(np.float64)

    frame, twin = shot(pat.height, pat.yield_map, noise_seed), shot(clean_h, clean_y, noise_seed)
    other = shot(clean_h, clean_y, noise_seed + 1)
    noise = twin - other
    noise -= noise.mean(axis=1, keepdims=True)  # scan-line offsets: known per row, not pixel noise
    sigma = max(noise.std() / math.sqrt(2.0), 1e-6)
    return float(np.linalg.norm(frame - twin) / sigma), severity


def phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def z_quantile(p: float) -> float:
    """Inverse of the standard normal CDF by bisection (no scipy.special needed)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p else (lo, mid)
    return (lo + hi) / 2


def read_predictions(path: Path) -> tuple[dict[tuple[str, int], str], dict[str, list[float]]]:
    """From `semhinet predict` JSON lines: (true class, image index) -> predicted leaf, and per true class
    the gatekeeper's defect probabilities (for how well it separates each class from normal at all)."""
    out, defect = {}, {}
    for line in path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        m = re.match(r"(.+)_(\d+)\.\w+$", Path(row["path"]).name)
        if m and "class" in row:
            out[(m.group(1), int(m.group(2)))] = row["class"]
            if "defect" in row.get("heads", {}).get("h1", {}):
                defect.setdefault(m.group(1), []).append(float(row["heads"]["h1"]["defect"]))
    return out, defect


def auc(negatives: list[float], positives: list[float]) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting half."""
    neg, pos = np.asarray(negatives)[None, :], np.asarray(positives)[:, None]
    return float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))


SEVERITY_BINS = ((0.0, 1 / 3, "faint (s < 1/3)"), (1 / 3, 2 / 3, "medium"), (2 / 3, 1.01, "obvious (s > 2/3)"))


def severity_table(per_class: dict[str, tuple[np.ndarray, np.ndarray]], preds: dict,
                   defect: dict[str, list[float]]) -> list[str]:
    lines = ["| class | " + " | ".join(f"recall, {b[2]}" for b in SEVERITY_BINS)
             + " | called normal | gatekeeper AUC vs normal | n |", "|---|---|---|---|---|---|---|"]
    for leaf, (_, sev) in per_class.items():
        got = np.array([preds.get((leaf, k), "") for k in range(len(sev))])
        cells = []
        for lo, hi, _ in SEVERITY_BINS:
            inside = (sev >= lo) & (sev < hi)
            cells.append(f"{np.mean(got[inside] == leaf):.2f} (n={inside.sum()})" if inside.any() else "-")
        separation = f"{auc(defect['normal'], defect[leaf]):.2f}" if defect.get("normal") and defect.get(leaf) else "-"
        lines.append(f"| {leaf} | " + " | ".join(cells) + f" | {np.mean(got == 'normal'):.2f} | {separation} "
                     f"| {len(sev)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=202)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--difficulty", type=float, default=synth.DEFAULT_DIFFICULTY)
    p.add_argument("--alpha", type=float, default=0.01, help="false-alarm rate on normal frames")
    p.add_argument("--predictions", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("experiments/results/detectability.md"))
    args = p.parse_args()

    z = z_quantile(1.0 - args.alpha)
    preds, defect = read_predictions(args.predictions) if args.predictions else ({}, {})
    lines = [f"Generator {synth.GENERATOR_VERSION}, difficulty {args.difficulty}, {args.size} px, seed {args.seed}, "
             f"{args.per_class} frames a class; ideal observer at {100 * args.alpha:g}% false alarms on normal "
             "frames.", "",
             "| class | median SNR | min SNR | frames with SNR < 4 | ideal-observer detection bound |"
             + (" model: median SNR right / wrong (n wrong) |" if preds else ""),
             "|---|---|---|---|---|" + ("---|" if preds else "")]
    all_snr, per_class = [], {}
    for leaf in synth.DEFECTS:
        pairs = [frame_snr(leaf, args.seed, k, args.size, args.difficulty) for k in range(args.per_class)]
        snr, sev = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        per_class[leaf] = (snr, sev)
        all_snr.append(snr)
        row = (f"| {leaf} | {np.median(snr):.1f} | {snr.min():.1f} | {np.mean(snr < 4):.1%} | "
               f"{phi(snr - z).mean():.4f} |")
        if preds:
            right = [s for k, s in enumerate(snr) if preds.get((leaf, k)) == leaf]
            wrong = [s for k, s in enumerate(snr) if (leaf, k) in preds and preds[(leaf, k)] != leaf]
            row += (f" {np.median(right) if right else float('nan'):.1f} / "
                    f"{np.median(wrong) if wrong else float('nan'):.1f} ({len(wrong)}) |")
        lines.append(row)
        print(row, flush=True)
    snr = np.concatenate(all_snr)
    lines.append(f"| all defects | {np.median(snr):.1f} | {snr.min():.1f} | {np.mean(snr < 4):.1%} | "
                 f"{phi(snr - z).mean():.4f} |" + (" |" if preds else ""))
    if preds:
        lines += ["", f"Model: `{args.predictions}`", "", *severity_table(per_class, preds, defect)]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
