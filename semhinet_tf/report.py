"""Human report of one evaluation: index.html and README.md with the same content, plus PNG figures.

The report is built once as a list of neutral blocks (heading, paragraph, table, image, ...) and
rendered twice, so the HTML (for a browser) and the Markdown (for a repository or a terminal) can
not drift apart. Figures are drawn with matplotlib's Agg canvas through `Figure` objects, never
pyplot, so no global backend state is touched and nothing needs a display. Every file is written
atomically. No TensorFlow here.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from semhinet_tf.evaluate import (
    DEFAULT_PURITY_TARGET,
    EvaluationError,
    atomic_write_bytes,
    atomic_write_text,
    class_intervals,
    coverage_curve,
    coverage_section,
    headline_details,
    headline_metrics,
    leaf_predictions,
)
from semhinet_tf.stats import FEW_FRAMES, format_interval, interval
from semhinet_tf.taxonomy import Taxonomy

DEFAULT_TITLE = "SEM-HiNet-TF evaluation report"
FIG_DPI = 110
THUMB_PX = 256
CMAP = "Blues"

ImageLoader = Callable[[str], np.ndarray]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
 padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.meta{color:#666;margin-top:0}
.summary{background:#f4f7fb;border:1px solid #c9d6e8;border-radius:6px;padding:.6em 1.2em;margin:1em 0}
.summary table{border:none}.summary td,.summary th{border:none;padding:.15em 1.2em .15em 0}
.note{background:#fff6e0;border-left:4px solid #e0a000;padding:.5em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.8em 0;font-size:.95em}
th,td{border:1px solid #d0d0d0;padding:.3em .7em;text-align:left}
th{background:#f0f0f0}.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
"""


# ---------------------------------------------------------------- document model and renderers
class _Doc:
    """An ordered list of blocks; each renderer turns the same blocks into HTML or Markdown."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", list(header), [[_cell(c) for c in r] for r in rows]))

    def image(self, file: str, alt: str, caption: str = "") -> None:
        self.blocks.append(("img", file, alt, caption))

    def summary(self, rows: Sequence[tuple[str, str]]) -> None:
        self.blocks.append(("summary", list(rows)))


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _is_num(text: str) -> bool:
    try:
        float(text.split()[0].rstrip("%"))
        return True
    except (ValueError, IndexError):
        return False


def _numeric_columns(rows: Sequence[Sequence[str]], width: int) -> list[bool]:
    """Right-align a column when every cell is a number or '-' and at least one is a number."""
    cols = [[r[i] for r in rows] for i in range(width)]
    return [bool(c) and any(_is_num(x) for x in c) and all(_is_num(x) or x == "-" for x in c) for c in cols]


def _html_cell(tag: str, text: str, numeric: bool) -> str:
    cls = ' class="num"' if numeric else ""
    return f"<{tag}{cls}>{html.escape(text)}</{tag}>"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    num = _numeric_columns(rows, len(header))
    head = "".join(_html_cell("th", h, n) for h, n in zip(header, num, strict=True))
    body = "".join("<tr>" + "".join(_html_cell("td", c, n) for c, n in zip(r, num, strict=True)) + "</tr>\n"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def render_html(doc: _Doc, title: str, meta: str) -> str:
    e = html.escape
    parts = [f"<h1>{e(title)}</h1>", f'<p class="meta">{e(meta)}</p>']
    for b in doc.blocks:
        kind = b[0]
        if kind == "h2":
            parts.append(f"<h2>{e(b[1])}</h2>")
        elif kind == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif kind == "note":
            parts.append(f'<div class="note">{e(b[1])}</div>')
        elif kind == "table":
            parts.append(_html_table(b[1], b[2]))
        elif kind == "img":
            cap = f"<figcaption>{e(b[3])}</figcaption>" if b[3] else ""
            parts.append(f'<figure><img src="{e(b[1])}" alt="{e(b[2])}">{cap}</figure>')
        elif kind == "summary":
            rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in b[1])
            parts.append(f'<div class="summary"><table>{rows}</table></div>')
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{e(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---:" if n else "---" for n in _numeric_columns(rows, len(header))]
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(doc: _Doc, title: str, meta: str) -> str:
    parts = [f"# {title}", f"_{meta}_"]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h2":
            parts.append(f"## {b[1]}")
        elif kind == "p":
            parts.append(b[1])
        elif kind == "note":
            parts.append(f"> **Note:** {b[1]}")
        elif kind == "table":
            parts.append(_md_table(b[1], b[2]))
        elif kind == "img":
            parts.append(f"![{b[2]}]({b[1]})" + (f"\n\n_{b[3]}_" if b[3] else ""))
        elif kind == "summary":
            parts.append(_md_table(["summary", ""], [[k, v] for k, v in b[1]]))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- figures
def _save(fig: Figure, path: Path, grey: bool = False) -> Path:
    """`grey`: a figure of grey SEM thumbnails and black text is stored as an 8-bit grey PNG (a third of
    the RGBA size, which matters for reports committed to a repository)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, bbox_inches="tight", facecolor="white")
    data = buf.getvalue()
    if grey:
        from PIL import Image

        out = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("L").save(out, format="png", optimize=True)
        data = out.getvalue()
    return atomic_write_bytes(path, data)


def _draw_confusion(ax: Any, cm: np.ndarray, labels: Sequence[str], title: str, fontsize: float = 10):
    """Counts written in the cells, colour = share of the true class (row-normalised), absent rows white."""
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap=CMAP, vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fontsize,
                    color="white" if norm[i, j] > 0.55 else ("#222" if cm[i, j] else "#aaa"))
    k = len(labels)
    ax.set_xticks(range(k), labels=list(labels), rotation=35, ha="right", fontsize=fontsize)
    ax.set_yticks(range(k), labels=[f"{c} (n={int(n)})" for c, n in zip(labels, rows[:, 0], strict=True)],
                  fontsize=fontsize)
    ax.set_xlabel("predicted", fontsize=fontsize + 1)
    ax.set_ylabel("true", fontsize=fontsize + 1)
    ax.set_title(title, fontsize=fontsize + 2)
    return im


def plot_leaf_confusion(results: Mapping[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(8, 7))
    ax = fig.add_subplot()
    acc = results["leaf"]["accuracy"]
    im = _draw_confusion(ax, results["leaf"]["confusion"], results["leaf"]["labels"],
                         f"Leaf confusion (accuracy {_cell(acc)}, n={results['n']})", fontsize=11)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("share of the true class (row)")
    return _save(fig, path)


def plot_head_confusions(results: Mapping[str, Any], taxonomy: Taxonomy, path: Path) -> Path:
    heads = [h for h in taxonomy.heads if h.name in results["heads"]]
    ncols = min(3, len(heads))
    nrows = math.ceil(len(heads) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 4.8 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, head in zip(axes, heads, strict=False):
        m = results["heads"][head.name]
        scope = "all images" if head.parent is None else f"true {head.parent[1]}"
        _draw_confusion(ax, m["confusion"], m["labels"],
                        f"{head.name} {head.role}: acc {_cell(m['accuracy'])}\n(n={m['n']}, {scope})", fontsize=12)
    for ax in axes[len(heads):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_class(results: Mapping[str, Any], path: Path) -> Path:
    per = results["per_class"]
    leaves = list(per)
    x = np.arange(len(leaves))
    fig = Figure(figsize=(max(7.0, 1.1 * len(leaves)), 4.2))
    ax = fig.add_subplot()
    for k, (key, colour) in enumerate((("precision", "#4c72b0"), ("recall", "#dd8452"), ("f1", "#55a868"))):
        vals = np.array([np.nan if per[c][key] is None else per[c][key] for c in leaves], dtype=float)
        ax.bar(x + (k - 1) * 0.27, np.nan_to_num(vals), width=0.27, label=key, color=colour)
        for xi, v in zip(x, vals, strict=True):
            if np.isnan(v):
                ax.text(xi + (k - 1) * 0.27, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels=[f"{c}\nn={per[c]['support']}" for c in leaves], fontsize=10)
    ax.set_ylim(0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=3, fontsize=10, frameon=False)
    ax.set_title("Per-class precision, recall and F1 (end-to-end, leaf level)")
    return _save(fig, path)


def plot_coverage(curve: Mapping[str, np.ndarray], point: Mapping[str, Any], path: Path) -> Path:
    t, cov, pur = (np.asarray(curve[k]) for k in ("thresholds", "coverage", "purity"))
    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(t, cov, label="coverage (automatic share)", color="#4c72b0", drawstyle="steps-post")
    ax1.plot(t, pur, label="purity (accuracy kept)", color="#dd8452", drawstyle="steps-post")
    ax1.axhline(point["target"], color="#888", ls=":", lw=1, label=f"target purity {point['target']:.2f}")
    ax2.plot(cov, pur, color="#55a868")
    ax2.axhline(point["target"], color="#888", ls=":", lw=1)
    if point.get("threshold") is not None:
        label = f"threshold {point['threshold']:.3f}" + ("" if point["reached"] else " (target not reached)")
        ax1.axvline(point["threshold"], color="#c44e52", ls="--", lw=1.2, label=label)
        ax2.plot([point["coverage"]], [point["purity"]], "o", color="#c44e52", label=label)
        ax2.legend(loc="lower left", fontsize=9)
    ax1.set_xlabel("review threshold on top leaf probability")
    ax1.set_ylim(0, 1.02)
    ax1.legend(loc="lower left", fontsize=9)
    ax1.set_title("Images kept automatic vs their accuracy")
    ax2.set_xlabel("coverage (share kept automatic)")
    ax2.set_ylabel("purity")
    ax2.set_xlim(0, 1.02)
    ax2.set_title("Purity vs coverage")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- training history
def read_history(path: str | Path) -> tuple[dict[str, np.ndarray], list[tuple[str, int, int]]]:
    """Numeric columns of a Keras CSVLogger file and its phases as (name, first row, end row).

    Phases come from a "phase" column (float/qat) or, without one, from the epoch counter restarting.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    except OSError as exc:
        raise EvaluationError(f"{path}: cannot read training history ({exc.strerror})") from exc
    if not fields:
        raise EvaluationError(f"{path}: training history is empty (no CSV header)")
    cols: dict[str, np.ndarray] = {}
    for name in fields:
        if name == "phase":
            continue
        vals = np.array([_to_float(r.get(name)) for r in rows], dtype=float)
        if vals.size and not np.all(np.isnan(vals)):
            cols[name] = vals
    if "phase" in fields:
        labels = [str(r.get("phase") or "") for r in rows]
    else:
        epoch = cols.get("epoch", np.arange(len(rows), dtype=float))
        seg = np.concatenate([[0], np.cumsum(np.diff(epoch) <= 0)]) if len(rows) else np.zeros(0)
        labels = [f"phase {int(s) + 1}" if seg.size and seg.max() > 0 else "" for s in seg]
    phases: list[tuple[str, int, int]] = []
    for i, lab in enumerate(labels):
        if phases and phases[-1][0] == lab:
            phases[-1] = (lab, phases[-1][1], i + 1)
        else:
            phases.append((lab, i, i + 1))
    return cols, phases


def _to_float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _history_panels(cols: Mapping[str, np.ndarray]) -> list[tuple[str, list[str]]]:
    val = [c for c in cols if c.startswith("val_")]
    panels = [("Loss", [c for c in ("loss", "val_loss") if c in cols]),
              ("Validation loss per head", [c for c in val if c.endswith("loss") and c != "val_loss"]),
              ("Validation metrics", [c for c in val if "loss" not in c])]
    return [(title, names) for title, names in panels if names]


def plot_history(cols: Mapping[str, np.ndarray], phases: Sequence[tuple[str, int, int]], path: Path) -> Path | None:
    panels = _history_panels(cols)
    if not panels:
        return None
    n_rows = len(next(iter(cols.values())))
    x = np.arange(1, n_rows + 1)
    fig = Figure(figsize=(10, 3.3 * len(panels)))  # stacked: full width of a report column, readable fonts
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names:
            ax.plot(x, cols[name], marker="." if n_rows < 40 else None, label=name)
        for k, (label, start, end) in enumerate(phases):
            if not label:
                continue
            ax.axvspan(start + 0.5, end + 0.5, color="#4c72b0" if k % 2 else "#dd8452", alpha=0.07)
            if start:
                ax.axvline(start + 0.5, color="#555", ls="--", lw=1)
            ax.text((start + end + 1) / 2, 1.0, label, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=9, color="#444")
        ax.set_title(title, pad=16 if any(p[0] for p in phases) else 6)
        ax.set_xlabel("epoch (cumulative over phases)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- worst mistakes
def default_image_loader(path: str) -> np.ndarray:
    """Grayscale uint8 thumbnail source via Pillow; 16-bit images are scaled by their maximum."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            return (255.0 * arr / max(float(arr.max()), 1.0)).clip(0, 255).astype(np.uint8)
        return np.asarray(im.convert("L"), dtype=np.uint8)


def worst_mistakes(true_leaf: np.ndarray, pred: np.ndarray, conf: np.ndarray, limit: int) -> np.ndarray:
    """Indices of wrong leaf predictions, most confident first."""
    wrong = np.flatnonzero(np.asarray(pred) != np.asarray(true_leaf))
    return wrong[np.argsort(-np.asarray(conf)[wrong], kind="stable")][:limit]


def _thumbnail(loader: ImageLoader, path: str) -> np.ndarray | None:
    from PIL import Image

    try:
        arr = np.asarray(loader(path))
        if arr.ndim == 3:
            arr = arr[..., 0] if arr.shape[-1] in (1, 3, 4) else arr[0]
        im = Image.fromarray(arr.astype(np.uint8))
        im.thumbnail((THUMB_PX, THUMB_PX))
        return np.asarray(im)
    except Exception:  # noqa: BLE001 - an unreadable file becomes a grey tile, not a failed report
        return None


def plot_worst(indices: Sequence[int], paths: Sequence[str], labels: Sequence[str], true_leaf: np.ndarray,
               pred: np.ndarray, conf: np.ndarray, loader: ImageLoader, path: Path, ncols: int = 4) -> Path:
    ncols = max(1, min(ncols, len(indices)))
    nrows = math.ceil(len(indices) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.3 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, i in zip(axes, indices, strict=False):
        img = _thumbnail(loader, paths[i])
        if img is None:
            ax.imshow(np.full((8, 8), 200, dtype=np.uint8), cmap="gray", vmin=0, vmax=255)
            ax.text(3.5, 3.5, "unreadable", ha="center", va="center")
        else:
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        name = Path(paths[i]).name
        name = name if len(name) <= 30 else name[:13] + "..." + name[-14:]
        ax.set_title(f"{labels[true_leaf[i]]}->{labels[pred[i]]} p={conf[i]:.2f}\n{name}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(indices):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path, grey=True)


# ---------------------------------------------------------------- sections
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _operating_sentence(p: Mapping[str, Any]) -> str:
    if p.get("threshold") is None:
        return "no images to choose a threshold from"
    text = (f"threshold {p['threshold']:.3f}: {_pct(p['coverage'])} automatic, {_pct(p['review_share'])} "
            f"to review, purity {p['purity']:.3f}")
    return text if p["reached"] else f"target purity {p['target']:.2f} not reachable; best is {text}"


def _with_interval(value: Any, detail: tuple | None) -> str:
    """'0.821 [0.77, 0.86] (n=240)': a figure with its 95% interval and the images it rests on."""
    if detail is None or value is None:
        return _cell(value)
    ci, n = detail
    return f"{_cell(value)} {format_interval(ci)} (n={n})"


def _summary_section(doc: _Doc, results: Mapping[str, Any], cov: Mapping[str, Any]) -> None:
    rows = [("model", f"{results['model']} ({results['format']})"), ("images", str(results["n"]))]
    details = headline_details(results)
    rows += [(label, _with_interval(v, details.get(label))) for label, v in headline_metrics(results)
             if not label.startswith("precision ")]
    rows.append((f"review threshold (purity >= {cov['target']:.2f})", _operating_sentence(cov["operating_point"])))
    doc.summary(rows)
    doc.para("[low, high] is the 95% Wilson interval of each figure over the images it is counted on (n).")
    few = [f"{label} (n={n})" for label, (_, n) in details.items() if 0 < n < FEW_FRAMES]
    if few:
        doc.note(f"These figures rest on fewer than {FEW_FRAMES} images, so their intervals are wide; read them as "
                 f"indications, not measurements: {', '.join(few)}.")
    missing = results.get("missing_classes") or []
    if missing:
        doc.note(f"Classes with no image in this split (their rows are empty and recall is undefined): "
                 f"{', '.join(missing)}.")


def _per_class_section(doc: _Doc, results: Mapping[str, Any], taxonomy: Taxonomy, files: dict) -> None:
    doc.heading("Leaf classes")
    doc.para("End-to-end scores of the final leaf prediction (argmax of the hierarchical leaf probability). "
             "Confusion rows are the true class; colour is the share of that row, numbers are counts.")
    doc.image(files["leaf"].name, "Leaf confusion matrix: rows true class, columns predicted class, with counts")
    cm = np.asarray(results["leaf"]["confusion"])
    recall_ci, precision_ci = class_intervals(cm, results["leaf"]["labels"])
    rows = []
    for j, (leaf, s) in enumerate(results["per_class"].items()):
        path = " > ".join(f"{h} {c}" for h, c in taxonomy.path(leaf)[:-1]) or "-"
        rows.append([leaf, path, s["support"], int(cm[:, j].sum()), s["precision"],
                     format_interval(precision_ci.get(leaf)) or "-", s["recall"],
                     format_interval(recall_ci.get(leaf)) or "-", s["f1"]])
    doc.table(["class", "reached via", "support", "predicted", "precision", "95% CI", "recall", "95% CI", "F1"],
              rows)
    doc.image(files["per_class"].name, "Bar chart of precision, recall and F1 per leaf class")


def _heads_section(doc: _Doc, results: Mapping[str, Any], taxonomy: Taxonomy, files: dict) -> None:
    doc.heading("Heads")
    doc.para("Each head is scored on the images it applies to (for example the router only on true defects), "
             "by its own argmax, independently of the heads above it. \"Passed\" scores it only on those of them "
             "the heads above sent its way, the images it decides for in use (the router on the defects the "
             "gatekeeper passed on): the gap between the two is the errors of the heads above.")
    rows = []
    for h in taxonomy.heads:
        m = results["heads"][h.name]
        scope = "all images" if h.parent is None else f"true {h.parent[0]} {h.parent[1]}"
        reached = m.get("reached")
        cm = np.asarray(m["confusion"])
        rows.append([h.name, h.role or "-", scope, m["n"],
                     _with_interval(m["accuracy"], (interval(np.trace(cm), cm.sum()), int(cm.sum()))),
                     "-" if reached is None else f"{_cell(reached['accuracy'])} ({reached['n']})",
                     ", ".join(f"{c} {_cell(v)}" for c, v in m["recall"].items()),
                     ", ".join(f"{c} {_cell(v)}" for c, v in m["precision"].items())])
    doc.table(["head", "role", "applies to", "n", "accuracy", "accuracy, passed (n)", "recall", "precision"], rows)
    doc.image(files["heads"].name, "Confusion matrices of every head, each on the images it applies to")


def _coverage_section(doc: _Doc, cov: Mapping[str, Any], files: dict, n: int | None = None) -> None:
    doc.heading("Review threshold")
    doc.para("An image whose top leaf probability is below the threshold goes to a human. Coverage is the share "
             "kept automatic, purity the accuracy on those. The chosen threshold is the lowest that reaches the "
             "target purity, so as few images as possible go to review.")
    rows, thin = [], []
    for p in cov["operating_points"]:
        kept = p.get("automatic_n")
        if kept is None and n is not None and p.get("coverage") is not None:
            kept = int(round(p["coverage"] * n))
        ci = p.get("purity_ci") or (interval(int(round(p["purity"] * kept)), kept) if kept else None)
        rows.append([f"{p['target']:.2f}", p["threshold"], _pct(p["coverage"]), "-" if kept is None else kept,
                     _pct(p["review_share"]), p["purity"], format_interval(ci) or "-",
                     "yes" if p["reached"] else "no (best purity shown)"])
        if p["reached"] and kept is not None and kept < FEW_FRAMES:
            thin.append(f"{p['target']:.2f} on {kept} image{'s' if kept != 1 else ''}")
    doc.table(["target purity", "threshold", "automatic", "images kept", "to review", "purity", "95% CI", "reached"],
              rows)
    if thin:
        doc.note(f"Purity targets reached on fewer than {FEW_FRAMES} automatic images say little (the interval "
                 f"shows how little): {'; '.join(thin)}. More validation frames give a threshold worth trusting.")
    doc.image(files["coverage"].name, "Coverage and purity against the review threshold, chosen threshold marked")


def _readiness_section(doc: _Doc, ready: Mapping[str, Any]) -> None:
    doc.heading("Class readiness")
    threshold = "none" if ready["threshold"] is None else f"{ready['threshold']:.3f}"
    min_auto = ready.get("min_automatic", 1)
    doc.para(f"A class is ready for automatic classification when it has at least {ready['min_frames']} labelled "
             f"frames here, at least {min_auto} automatic verdicts (top leaf probability >= the review threshold "
             f"in use, {threshold}), and at least {ready['target_purity']:g} of those are right. The model's "
             f"contract lists the ready classes (`semhinet convert`), and the board sends every verdict of any "
             f"other class to review. The interval says how well the precision is known: a point figure above the "
             f"target on a few dozen verdicts does not show that the target holds.")
    rows = [[leaf, c["labelled"], c["automatic"], c["precision"],
             format_interval(c["precision_ci"]) if c.get("precision_ci") else "-",
             "yes" if c["ready"] else "no", c["why_not"] or "-"] for leaf, c in ready["classes"].items()]
    doc.table(["class", "labelled", "automatic verdicts", "precision of those", "95% CI", "ready", "why not"], rows)
    doc.note(f"Ready: {', '.join(ready['ready']) or 'none'}.")


def plot_unfamiliar(true_leaf: np.ndarray, block: Mapping[str, Any], leaves: Sequence[str], path: Path) -> Path:
    """The unfamiliar-frame score of every frame by its true class (log scale), the contract's threshold drawn."""
    scores = np.maximum(np.asarray(block["scores"], dtype=float), 1e-3)
    true = np.asarray(true_leaf, dtype=np.int64)
    fig = Figure(figsize=(max(7.0, 1.1 * len(leaves)), 4.2))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for j, leaf in enumerate(leaves):
        s = scores[true == j]
        colour = "#4c72b0" if leaf in block["fitted_leaves"] else "#c44e52"
        ax.scatter(j + rng.uniform(-0.3, 0.3, s.size), s, s=7, alpha=0.5, color=colour, lw=0)
    ax.axhline(block["threshold"], color="#333", ls="--", lw=1, label=f"threshold {block['threshold']:.3g}")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(leaves)), labels=list(leaves), fontsize=10)
    ax.set_ylabel("unfamiliar-frame score")
    ax.legend(loc="upper right", fontsize=9, frameon=False)
    ax.set_title("Unfamiliar-frame score by true class (blue: classes it was fitted on; above the line: review)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _unfamiliar_section(doc: _Doc, block: Mapping[str, Any], true: np.ndarray, leaves: Sequence[str],
                        out: Path) -> None:
    doc.heading("Unfamiliar frames")
    doc.para(f"The model's unfamiliar-frame score measures how far a frame's features lie from every class it was "
             f"fitted on ({', '.join(block['fitted_leaves'])}); above {block['threshold']:.3g} (the contract's "
             f"threshold, 1% of the validation split's normal frames) the board sends the frame to review whatever "
             f"its probability (not a bogus verdict). For a class the score was not fitted on, the last column is "
             f"the share the score alone catches at 1% false alarms on this set's normal frames.")
    rows = [[leaf, c["n"], c["share"], format_interval(c["share_ci"]), c["median"],
             c.get("recall_at_1pct_normal", "-") if c.get("recall_at_1pct_normal") is not None else "-"]
            for leaf, c in block["classes"].items()]
    doc.table(["class", "frames", "above the threshold", "95% CI", "median score", "caught alone at 1% normal"],
              rows)
    png = plot_unfamiliar(true, block, leaves, out / "unfamiliar.png")
    doc.image(png.name, "Unfamiliar-frame score of every frame by true class, threshold dashed")


def _history_section(doc: _Doc, history_csv: str | Path, out: Path) -> None:
    doc.heading("Training")
    cols, phases = read_history(history_csv)
    png = plot_history(cols, phases, out / "training_curves.png")
    n = len(next(iter(cols.values()))) if cols else 0
    named = [f"{p[0]} {p[2] - p[1]}" for p in phases if p[0]]
    text = f"{n} epochs" + (f" ({', '.join(named)})" if named else "") + f", from {Path(history_csv).name}."
    if "val_loss" in cols and not np.all(np.isnan(cols["val_loss"])):
        best = int(np.nanargmin(cols["val_loss"]))
        phase = next((p[0] for p in phases if p[1] <= best < p[2] and p[0]), "")
        text += f" Lowest val_loss {cols['val_loss'][best]:.4f} at epoch {best + 1}"
        text += f" ({phase})." if phase else "."
    doc.para(text)
    if png is None:
        doc.note("The history has no loss or val_ columns to plot.")
    else:
        doc.image(png.name, "Training curves: loss and validation metrics per epoch, phases shaded")


def _worst_section(doc: _Doc, ctx: Mapping[str, Any], out: Path, loader: ImageLoader | None, limit: int) -> None:
    doc.heading("Most confident mistakes")
    idx = worst_mistakes(ctx["true"], ctx["pred"], ctx["conf"], limit)
    if idx.size == 0:
        doc.para("No misclassified image.")
        return
    labels = ctx["labels"]
    doc.para(f"The {idx.size} wrong leaf predictions with the highest probability, captioned true->pred p. "
             "Confident mistakes are the ones a review threshold does not catch; look for label errors here.")
    png = plot_worst(idx, ctx["paths"], labels, ctx["true"], ctx["pred"], ctx["conf"],
                     loader or default_image_loader, out / "worst_mistakes.png")
    doc.image(png.name, "Thumbnails of the most confident misclassified images, captioned true->predicted p")
    leaf_p = ctx["leaf_p"]
    doc.table(["#", "file", "true", "predicted", "p(predicted)", "p(true)"],
              [[k + 1, str(ctx["paths"][i]), labels[ctx["true"][i]], labels[ctx["pred"][i]], float(ctx["conf"][i]),
                float(leaf_p[i, ctx["true"][i]])] for k, i in enumerate(idx)])


# ---------------------------------------------------------------- entry point
# Every file write_report may write into its folder (checked before an evaluation starts, so none is clobbered).
REPORT_FILES = ("README.md", "index.html", "leaf_confusion.png", "head_confusion.png", "per_class.png",
                "coverage.png", "training_curves.png", "worst_mistakes.png", "attributes.png", "unfamiliar.png")


def write_report(out_dir: str | Path, results: Mapping[str, Any], paths: Sequence[str], true_leaf: np.ndarray,
                 head_probs: Mapping[str, np.ndarray], taxonomy: Taxonomy, history_csv: str | Path | None = None,
                 image_loader: ImageLoader | None = None, title: str = DEFAULT_TITLE, max_worst: int = 16) -> Path:
    """Write index.html, README.md (same content) and the PNG figures into `out_dir`; return index.html.

    `results` is the dict from `evaluate` for the same arrays. `image_loader(path)` returns a 2-D
    uint8 array (default: Pillow); it only draws the thumbnails of the worst mistakes.
    """
    out = Path(out_dir)
    true = np.asarray(true_leaf, dtype=np.int64)
    if not (len(paths) == true.shape[0] == results["n"]):
        raise EvaluationError(f"report inputs disagree: {len(paths)} paths, {true.shape[0]} labels, "
                              f"results for {results['n']} images")
    out.mkdir(parents=True, exist_ok=True)
    pred, conf, leaf_p = leaf_predictions({k: np.asarray(v, dtype=np.float64) for k, v in head_probs.items()},
                                          taxonomy)
    cov = results.get("coverage") or coverage_section(true, leaf_p, DEFAULT_PURITY_TARGET)
    files = {"leaf": plot_leaf_confusion(results, out / "leaf_confusion.png"),
             "heads": plot_head_confusions(results, taxonomy, out / "head_confusion.png"),
             "per_class": plot_per_class(results, out / "per_class.png"),
             "coverage": plot_coverage(coverage_curve(true, leaf_p), cov["operating_point"], out / "coverage.png")}
    doc = _Doc()
    _summary_section(doc, results, cov)
    _per_class_section(doc, results, taxonomy, files)
    _heads_section(doc, results, taxonomy, files)
    _coverage_section(doc, cov, files, results["n"])
    if results.get("readiness"):
        _readiness_section(doc, results["readiness"])
    if results.get("unfamiliar") and "scores" in results["unfamiliar"]:
        _unfamiliar_section(doc, results["unfamiliar"], true, list(taxonomy.leaves), out)
    if results.get("attributes"):
        from semhinet_tf.attributes import report_section

        report_section(doc, results, out, _save)
    if history_csv is not None:
        _history_section(doc, history_csv, out)
    ctx = {"true": true, "pred": pred, "conf": conf, "leaf_p": leaf_p, "paths": list(map(str, paths)),
           "labels": list(taxonomy.leaves)}
    _worst_section(doc, ctx, out, image_loader, max_worst)
    meta = (f"Model {results['model']} ({results['format']}), {results['n']} images, taxonomy {taxonomy.name}, "
            f"written {datetime.now().strftime('%Y-%m-%d %H:%M')}")
    atomic_write_text(out / "README.md", render_markdown(doc, title, meta))
    return atomic_write_text(out / "index.html", render_html(doc, title, meta))
