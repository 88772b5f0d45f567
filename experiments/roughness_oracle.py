"""Can anything tell a line-edge-roughness frame from a normal one? An observer that reads the edges directly.

    python experiments/roughness_oracle.py [--train-seed 505] [--train-sizes 500,2000,8000] [--test-seed 606] \
        [--test-per-class 1000] [--bench-seed 202] [--bench-per-class 100] [--predictions PREDICTIONS.jsonl] \
        [--out experiments/results/roughness_oracle.md]

Line-edge roughness (ler) is the defect the gatekeeper misses most (detectability.md: 63% of ler frames
called normal). The matched filter there knows the frame's clean twin, so it cannot say whether a ler frame
is *ambiguous*: normal frames have natural roughness of their own, of a strength and correlation length
that vary from frame to frame. This script asks the question with an observer that needs no image at
all: it reads every visible edge's trajectory (its displacement along the line, per pixel) straight from
the generator, summarises each frame by roughness statistics (amplitude, slope and curvature of every edge,
their spread over the frame, the roughest stretch against the frame's median) and learns ler vs normal
with gradient-boosted trees from many more frames than the model ever sees. Three observers, each with
more information than the frame holds, so each bounds the image model from above on these statistics:

- exact edges: the trajectories themselves, noiseless, at the generator's full 256 px resolution;
- edges as imaged: the trajectories smoothed by the frame's own sidewall slope and beam blur, plus the
  position noise of an ideal edge locator (the Cramer-Rao bound for a blurred step in the frame's shot
  noise), then box-averaged to the model's input pixels (--model-px);
- edges as imaged + the frame's natural roughness (its sigma and correlation length, which no frame shows).

Line frames only: contact-hole frames (18% of scenes) carry roughness as hole-shape harmonics; they are
counted in the model's figures split by pattern. The model row comes from `semhinet predict` on the same
generated test frames (--predictions), its gatekeeper's `defect` probability as the score.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from detectability import auc as separation_auc
from results_file import write_result

from semhinet_tf.data import synth

WINDOW = 32  # samples of the local-roughness window along an edge (px at 256 px frames)


@contextmanager
def recorded_edges():
    """Record every soft-limited edge profile the generator draws (what the frame's coverage is built from)."""
    calls: list[np.ndarray] = []
    original = synth._soft_limit

    def recording(r, out_lim, in_lim):
        out = original(r, out_lim, in_lim)
        calls.append(out)
        return out

    synth._soft_limit = recording
    try:
        yield calls
    finally:
        synth._soft_limit = original


def frame_edges(leaf: str, seed: int, k: int, difficulty: float) -> dict | None:
    """Visible edge trajectories of image k (256 px) and its scene, or None for a contact-hole frame.

    The streams are those of `synth._render`, so image k here is image k of `semhinet synth --seed seed`.
    """
    rng = np.random.default_rng(synth.image_seed(seed, leaf, k))
    scene_seed, defect_seed, _ = synth._streams(rng)
    scene_rng, defect_rng = np.random.default_rng(scene_seed), np.random.default_rng(defect_seed)
    scene = synth._sample_scene(scene_rng, 256, difficulty)
    if scene.kind != "lines":
        return None
    with recorded_edges() as calls:
        pat = synth._make_pattern(scene, scene_rng)
        severity = float("nan")
        if leaf != "normal":
            severity = synth._severity(defect_rng, difficulty)
            synth.DEFECT_FUNCS[leaf](pat, defect_rng, severity)
    # _make_lines limits (left, right) once; _ler limits the rough profiles, then the clean ones again
    left, right = (calls[2], calls[3]) if leaf != "normal" else (calls[0], calls[1])
    n, nv = left.shape
    seen = np.zeros(n * nv, bool)
    seen[np.unique(pat.geo["flat"])] = True
    seen = seen.reshape(n, nv)
    edges = []
    for i in range(n):
        idx = np.flatnonzero(seen[i])
        if idx.size >= WINDOW:
            edges += [left[i, idx[0]:idx[-1] + 1].astype(np.float64), right[i, idx[0]:idx[-1] + 1].astype(np.float64)]
    return {"scene": scene, "edges": edges, "severity": severity}


def imaged(edges: list[np.ndarray], scene: synth.Scene, model_px: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Edges as an ideal locator would measure them in the frame: smoothed, noisy, at the model's pixels."""
    from scipy import ndimage

    blur = math.sqrt(scene.topo_sigma ** 2 + (0.5 * (scene.blur[0] + scene.blur[1])) ** 2)
    step_height = abs(scene.line_level - scene.space_level)
    peak = scene.edge_gain * scene.topo_sigma / blur  # the bright edge line, after the beam blur
    mean_signal = 0.5 * (scene.line_level + scene.space_level) + 0.3 * scene.edge_gain
    # Cramer-Rao for locating a profile in white noise of variance s^2 (shot noise: s^2 = signal / dose), per
    # px of edge length: Fisher information = sum of profile'(x)^2 / s^2. A step of height C blurred by a
    # Gaussian of sigma b gives C^2 / (2 sqrt(pi) b); the edge peak of height A and width b gives
    # A^2 sqrt(pi) / (2 b); their cross term vanishes (odd times even).
    information = (step_height ** 2 / (2 * math.sqrt(math.pi)) + peak ** 2 * math.sqrt(math.pi) / 2) / (
        blur * mean_signal / scene.dose)
    position_noise = 1 / math.sqrt(information)
    step = 256 / model_px
    out = []
    for e in edges:
        seen = ndimage.gaussian_filter1d(e, blur, mode="nearest") + rng.normal(0, position_noise, e.size)
        if step > 1:  # box-average to the model's pixel pitch along the edge
            m = int(e.size // step)
            seen = np.add.reduceat(seen, (np.arange(m) * step).astype(int)) / np.diff(
                np.append((np.arange(m) * step).astype(int), e.size))
        out.append(seen * (1 / step if step > 1 else 1.0))  # displacement in model pixels
    return out


def features(edges: list[np.ndarray]) -> np.ndarray:
    """Roughness statistics of one frame: per-edge amplitude, slope and curvature; spread; roughest stretch."""
    amp, slope, curv, local = [], [], [], []
    for e in edges:
        x = e - e.mean()
        d1, d2 = np.diff(x), np.diff(x, 2)
        amp.append(x.std())
        slope.append(d1.std())
        curv.append(d2.std())
        w = max(8, min(WINDOW, x.size // 2))
        starts = range(0, d1.size - w + 1, max(w // 2, 1))
        local.append(max(d1[s:s + w].std() for s in starts))
    stats = []
    for v in (np.asarray(amp), np.asarray(slope), np.asarray(curv), np.asarray(local)):
        stats += [np.median(v), v.mean(), v.max(), np.percentile(v, 90), v.std() / (v.mean() + 1e-9)]
    for band in band_powers(edges):
        stats.append(band)
    slope_med = np.median(slope) + 1e-9
    stats += [np.max(local) / slope_med, np.median(slope) / (np.median(amp) + 1e-9),
              np.median(curv) / slope_med, float(len(edges))]
    return np.asarray(stats, np.float64)


def band_powers(edges: list[np.ndarray], bands: int = 8) -> list[float]:
    """The frame's mean edge power spectrum in octave-like bands (log), and its shape (each band / the total)."""
    length = min(e.size for e in edges)
    spec = np.mean([np.abs(np.fft.rfft(e[:length] - e[:length].mean())) ** 2 / length for e in edges], axis=0)[1:]
    edges_f = np.unique(np.geomspace(1, spec.size, bands + 1).astype(int))
    power = np.asarray([spec[a - 1:b].mean() for a, b in zip(edges_f[:-1], edges_f[1:], strict=False)] + [0.0]
                       * (bands + 1 - edges_f.size))
    return [*np.log(power + 1e-12), *(power / (power.sum() + 1e-12))]


def observer_inputs(frames: list[dict], view: str, model_px: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for f in frames:
        edges = f["edges"] if view == "exact" else imaged(f["edges"], f["scene"], model_px, rng)
        row = features(edges)
        if view == "imaged+scene":
            row = np.append(row, [f["scene"].rough_sigma, f["scene"].rough_corr])
        rows.append(row)
    return np.vstack(rows)


def scene_kind(leaf: str, seed: int, k: int, difficulty: float) -> str:
    """"lines" or "holes": the pattern of image k (the first draw of its scene stream)."""
    scene_seed = synth._streams(np.random.default_rng(synth.image_seed(seed, leaf, k)))[0]
    return synth._sample_scene(np.random.default_rng(scene_seed), 256, difficulty).kind


def render_set(seed: int, per_class: int, difficulty: float) -> tuple[list[dict], np.ndarray, list[int]]:
    """Line frames of normal (label 0) and ler (label 1) among the first `per_class` of each; their indices."""
    frames, labels, index = [], [], []
    for label, leaf in enumerate(("normal", "ler")):
        for k in range(per_class):
            f = frame_edges(leaf, seed, k, difficulty)
            if f is not None:
                frames.append(f)
                labels.append(label)
                index.append(k)
    return frames, np.asarray(labels), index


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """detectability.auc for (scores, 0/1 labels): ler frames are the positives."""
    return separation_auc(scores[labels == 0], scores[labels == 1])


def recall_at(scores: np.ndarray, labels: np.ndarray, normal_recall: float) -> float:
    """ler recall when the threshold keeps `normal_recall` of the normal frames below it."""
    threshold = np.quantile(scores[labels == 0], normal_recall, method="higher")
    return float(np.mean(scores[labels == 1] > threshold))


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    hit = labels[order]
    tpr = np.concatenate([[0], np.cumsum(hit) / max(hit.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(1 - hit) / max((1 - hit).sum(), 1)])
    return fpr, tpr


def model_scores(path: Path, index: list[int], labels: np.ndarray) -> np.ndarray | None:
    """The gatekeeper's `defect` probability for the given (class, index) frames from `semhinet predict` lines."""
    got = {}
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            m = re.match(r"(normal|ler)_(\d+)\.\w+$", Path(row["path"]).name)
            if m and "h1" in row.get("heads", {}):
                got[(m.group(1), int(m.group(2)))] = float(row["heads"]["h1"]["defect"])
    keys = [("normal", "ler")[y] for y in labels]
    if not all((c, k) in got for c, k in zip(keys, index, strict=True)):
        return None
    return np.asarray([got[(c, k)] for c, k in zip(keys, index, strict=True)])


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=name, drawstyle="steps-post")
    ax.axvline(0.01, color="grey", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_xlabel("normal frames called defect (false alarms)")
    ax.set_ylabel("ler frames called defect (recall)")
    ax.set_title("ler vs normal on line frames: edge observers and the model")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)
    plt.close(fig)


def edge_tensor(frames: list[dict], model_px: int, seed: int, edges_max: int = 48,
                length: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Imaged edges as a (frames, edges, samples) array, each edge centred and cut or zero-padded; a mask."""
    rng = np.random.default_rng(seed)
    x = np.zeros((len(frames), edges_max, length), np.float32)
    mask = np.zeros((len(frames), edges_max), np.float32)
    for i, f in enumerate(frames):
        for j, e in enumerate(imaged(f["edges"], f["scene"], model_px, rng)[:edges_max]):
            cut = e[max(0, (e.size - length) // 2):][:length]
            x[i, j, :cut.size] = cut - cut.mean()
            mask[i, j] = 1.0
    return x, mask


def network_scores(train: tuple, labels: np.ndarray, tests: dict[str, tuple], epochs: int) -> dict[str, np.ndarray]:
    """A learned observer on the raw imaged edge profiles: 1-D convolutions along every edge, pooled over the
    edge (energy and its largest local value) and over the frame's edges (mean and max); no hand features."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    keras = tf.keras
    profiles = keras.Input(train[0].shape[1:])
    valid = keras.Input(train[1].shape[1:])
    h = keras.layers.Reshape((*train[0].shape[1:], 1))(profiles)
    for dilation in (1, 2, 4):
        h = keras.layers.Conv2D(24, (1, 5), dilation_rate=(1, dilation), padding="same", activation="relu")(h)
    energy = keras.layers.Conv2D(16, 1)(h)
    energy = keras.layers.Lambda(lambda t: t * t)(energy)
    local = keras.layers.AveragePooling2D((1, 16), strides=(1, 8))(energy)
    per_edge = keras.layers.Concatenate()([keras.layers.Lambda(lambda t: tf.math.log(tf.reduce_mean(t, 2) + 1e-4))(
        energy), keras.layers.Lambda(lambda t: tf.math.log(tf.reduce_max(t, 2) + 1e-4))(local)])
    m = keras.layers.Reshape((train[1].shape[1], 1))(valid)
    mean = keras.layers.Lambda(lambda a: tf.reduce_sum(a[0] * a[1], 1) / (tf.reduce_sum(a[1], 1) + 1e-6))([per_edge, m])
    top = keras.layers.Lambda(lambda a: tf.reduce_max(a[0] * a[1] - 1e3 * (1 - a[1]), 1))([per_edge, m])
    z = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([mean, top]))
    out = keras.layers.Dense(1, activation="sigmoid")(z)
    model = keras.Model([profiles, valid], out)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    order = np.random.default_rng(0).permutation(len(labels))  # the frames come sorted by class
    model.fit([train[0][order], train[1][order]], labels[order], batch_size=64, epochs=epochs, verbose=2)
    return {k: model.predict(list(v), batch_size=256, verbose=0)[:, 0] for k, v in tests.items()}


VIEWS = {"exact": "exact edges (256 px, noiseless)",
         "imaged": "edges as imaged (blur, ideal-locator noise, at the model's pixels)",
         "imaged+scene": "edges as imaged + the frame's natural roughness"}


def fit_observer(x: np.ndarray, labels: np.ndarray, per_class_index: np.ndarray, n: int):
    """Gradient-boosted trees on the frames whose index within their class is below n."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    keep = per_class_index < n
    clf = HistGradientBoostingClassifier(max_iter=400, learning_rate=0.05, random_state=0)
    return clf.fit(x[keep], labels[keep])


def severity_cells(score: np.ndarray, labels: np.ndarray, severity: np.ndarray) -> list[str]:
    """ler recall at normal recall 0.99, by the generator's severity thirds."""
    threshold = np.quantile(score[labels == 0], 0.99, method="higher")
    cells = []
    for lo, hi in ((0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.01)):
        inside = (labels == 1) & (severity >= lo) & (severity < hi)
        cells.append(f"{np.mean(score[inside] > threshold):.2f} (n={inside.sum()})")
    return cells


def model_lines(path: Path, bench: tuple, bench_seed: int, n: int, difficulty: float,
                curves: dict) -> list[str]:
    """The model's table row on the bench set's line frames, and its figures on all frames and on holes."""
    _, b, index = bench
    m = model_scores(path, index, b)
    if m is None:
        print(f"{path}: does not cover every normal and ler frame of the bench set; model row left out")
        return []
    curves["the model (bench_test line frames)"] = roc(m, b)
    out = [f"| the model: gatekeeper `defect` probability (`{path}`) | - | - | - | {auc(m, b):.3f} | "
           f"{recall_at(m, b, 0.95):.3f} |"]
    every = np.asarray([0] * n + [1] * n)
    m_all = model_scores(path, list(range(n)) * 2, every)
    if m_all is not None:
        kinds = np.asarray([scene_kind(("normal", "ler")[y], bench_seed, k, difficulty)
                            for y, k in zip(every, list(range(n)) * 2, strict=True)])
        holes = ((kinds == "holes") & (every == 1)) | (every == 0)
        out += ["", f"The model's gatekeeper on all {n} normal and {n} ler frames of the bench set: AUC "
                f"{auc(m_all, every):.3f}, ler recall at normal recall 0.95 {recall_at(m_all, every, 0.95):.3f}; "
                f"on the {int(holes.sum()) - n} ler frames of contact holes (against all normal frames) AUC "
                f"{auc(m_all[holes], every[holes]):.3f}."]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-seed", type=int, default=505)
    p.add_argument("--train-sizes", default="500,2000,8000",
                   help="frames a class (before dropping hole patterns) the observers learn from; the table "
                        "uses the largest, a second table all")
    p.add_argument("--test-seed", type=int, default=606)
    p.add_argument("--test-per-class", type=int, default=1000)
    p.add_argument("--bench-seed", type=int, default=202, help="the seed of the model's test set (bench_test)")
    p.add_argument("--bench-per-class", type=int, default=100)
    p.add_argument("--difficulty", type=float, default=synth.DEFAULT_DIFFICULTY)
    p.add_argument("--model-px", type=int, default=160, help="the model's input size (for the imaged observer)")
    p.add_argument("--network-epochs", type=int, default=0,
                   help="also train the 1-D network observer on the imaged edge profiles for this many epochs")
    p.add_argument("--predictions", type=Path, default=None, help="`semhinet predict MODEL BENCH_TEST` output")
    p.add_argument("--out", type=Path, default=Path("experiments/results/roughness_oracle.md"))
    args = p.parse_args()
    sizes = sorted(int(v) for v in args.train_sizes.split(","))

    sets = {name: render_set(seed, n, args.difficulty) for name, seed, n in (
        ("train", args.train_seed, sizes[-1]), ("test", args.test_seed, args.test_per_class),
        ("bench", args.bench_seed, args.bench_per_class))}
    for name, (_, labels, _) in sets.items():
        print(f"{name}: {int((labels == 0).sum())} normal and {int((labels == 1).sum())} ler line frames", flush=True)
    train_index, t, b = np.asarray(sets["train"][2]), sets["test"][1], sets["bench"][1]
    severity = np.asarray([f["severity"] for f in sets["test"][0]])

    lines = [f"Generator {synth.GENERATOR_VERSION}, difficulty {args.difficulty}, 256 px frames, line patterns only; "
             f"the imaged observer at {args.model_px} px. Observers trained on seed {args.train_seed} "
             f"({sizes[-1]} frames a class before dropping hole patterns: {int((sets['train'][1] == 0).sum())} "
             f"normal, {int((sets['train'][1] == 1).sum())} ler), tested on seed {args.test_seed} "
             f"({int((t == 0).sum())} normal, {int((t == 1).sum())} ler) and on the model's test set, seed "
             f"{args.bench_seed} ({int((b == 0).sum())} normal, {int((b == 1).sum())} ler line frames of bench_test).",
             "", "| observer | AUC, test | ler recall at normal recall 0.99, test | at 0.95, test | AUC, bench_test | "
             "ler recall at normal recall 0.95, bench_test |", "|---|---|---|---|---|---|"]
    curves, severity_rows = {}, []
    curve_rows = ["| observer | " + " | ".join(f"{n} a class" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for view, name in VIEWS.items():
        x = {k: observer_inputs(s[0], view, args.model_px, seed=7 + i) for i, (k, s) in enumerate(sets.items())}
        cells = []
        for n in sizes:
            clf = fit_observer(x["train"], sets["train"][1], train_index, n)
            score = {k: clf.predict_proba(x[k])[:, 1] for k in sets}
            cells.append(f"{recall_at(score['test'], t, 0.99):.3f} / {auc(score['test'], t):.3f}")
            print(f"{view}, {n} a class: ler recall at normal recall 0.99 / AUC {cells[-1]}", flush=True)
        curve_rows.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(f"| {name} | {auc(score['test'], t):.3f} | {recall_at(score['test'], t, 0.99):.3f} | "
                     f"{recall_at(score['test'], t, 0.95):.3f} | {auc(score['bench'], b):.3f} | "
                     f"{recall_at(score['bench'], b, 0.95):.3f} |")
        curves[name] = roc(score["test"], t)
        severity_rows.append(f"| {name} | " + " | ".join(severity_cells(score["test"], t, severity)) + " |")
    if args.network_epochs:
        tensors = {k: edge_tensor(s[0], args.model_px, seed=7 + i) for i, (k, s) in enumerate(sets.items())}
        score = network_scores(tensors.pop("train"), sets["train"][1], tensors, args.network_epochs)
        name = f"edges as imaged, a 1-D network on the raw profiles ({sizes[-1]} a class)"
        lines.append(f"| {name} | {auc(score['test'], t):.3f} | {recall_at(score['test'], t, 0.99):.3f} | "
                     f"{recall_at(score['test'], t, 0.95):.3f} | {auc(score['bench'], b):.3f} | "
                     f"{recall_at(score['bench'], b, 0.95):.3f} |")
        print(lines[-1], flush=True)
        curves[name] = roc(score["test"], t)
        severity_rows.append(f"| {name} | " + " | ".join(severity_cells(score["test"], t, severity)) + " |")
    if args.predictions:
        lines += model_lines(args.predictions, sets["bench"], args.bench_seed, args.bench_per_class,
                             args.difficulty, curves)
    lines += ["", "ler recall at normal recall 0.99 (test set) by the generator's severity s (0 faint, 1 obvious):", "",
              "| observer | faint (s < 1/3) | medium | obvious (s > 2/3) |", "|---|---|---|---|", *severity_rows,
              "", "The observers' own learning curve: ler recall at normal recall 0.99 / AUC on the test set, by "
              "training frames a class:", "", *curve_rows]
    png = args.out.with_suffix(".png")
    plot(curves, png)
    lines += ["", f"![ROC curves]({png.name})"]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
