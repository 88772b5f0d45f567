"""Recall by what the inspection tool knows (issue 26.2): per class, by tercile of a numeric attribute per frame.

A fab reads an ADC by asking "does it find the small defects, or only the big ones?". The tool's defect file knows
each defect's size (or contrast, or die position); the synthetic generator knows each frame's severity and
visibility score (`dataset.json`). This module reads such per-file numbers, matches them to the images `eval`
scored, and splits each class's frames into three equal-count groups by the attribute (low, mid, high tercile),
with the recall and its 95% Wilson interval in each.

Tercile rule (ties kept together): among one class's frames that have a value, a frame's tercile is
floor(3 * r / n), where r is the number of those frames with a strictly smaller value. Equal values share r, so a
run of ties lands whole in the tercile of its first member (the lower one); without ties the groups differ in size
by at most one, larger first (numpy.array_split's sizes). Heavy ties can leave a tercile empty (n 0, recall None).

Inputs are a CSV (`read_attribute_csv`: a header, one column naming the file, the others numeric) and a synth
data set's `dataset.json` (`dataset_attributes`). No TensorFlow here; matplotlib only in `plot_attributes`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semhinet_tf.stats import format_interval, interval

PATH_COLUMNS = ("path", "file", "filename", "image")  # header names (any case) accepted for the file column
DATASET_FIELDS = ("severity", "visibility")  # the numbers synth's dataset.json records per defect frame
TERCILES = ("low", "mid", "high")
MIN_FRAMES = 3  # a class with fewer valued frames gets its n and no terciles
PLOT_FILE = "attributes.png"
MAX_EXAMPLES = 5  # unmatched paths listed by name


class AttributeFileError(ValueError):
    """An attributes file that cannot be used (missing, unreadable, no header, no file column, no numbers)."""


@dataclass
class AttributeTable:
    """Numbers per file from one source: `rows` are (path as written, {column: value or NaN})."""

    source: str  # the file it came from, as shown to the user
    kind: str  # "csv" or "dataset.json"
    base: Path  # folder that relative paths in it are first resolved against
    columns: list[str]
    rows: list[tuple[str, dict[str, float]]]
    skipped_columns: list[str] = field(default_factory=list)  # columns without a single number
    duplicates: int = 0  # rows naming a file named before (the last one wins)


def _number(cell: str | None) -> float:
    """A finite float, else NaN (empty, text, 'nan', 'inf'): such a cell is simply not counted."""
    try:
        value = float(str(cell).strip())
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def read_attribute_csv(path: str | Path) -> AttributeTable:
    """Read an attributes CSV; AttributeFileError (naming the file) for anything that makes it unusable.

    Why strict here and lenient per cell: a wrong file should stop `eval` before minutes of inference, while one
    bad cell in a tool's export should cost only that cell. Delimiter , ; or tab (sniffed from the header); a
    UTF-8 byte-order mark is ignored."""
    path = Path(path)
    if not path.exists():
        raise AttributeFileError(f"{path}: no such attributes file")
    if not path.is_file():
        raise AttributeFileError(f"{path}: not a file (an attributes CSV was expected)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AttributeFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                 f"an attributes CSV was expected") from exc
    except OSError as exc:
        raise AttributeFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise AttributeFileError(f"{path}: empty, or no header row on the first line (expected e.g. path,size)")
    delimiter = max(",;\t", key=lines[0].count)
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    lowered = [h.lower() for h in header]
    file_col = next((lowered.index(name) for name in PATH_COLUMNS if name in lowered), None)
    if file_col is None:
        raise AttributeFileError(f"{path}: no column naming the file in the header ({', '.join(header)}); "
                                 f"name one {' or '.join(PATH_COLUMNS)}")
    dupes = sorted({h for h in header if h and header.count(h) > 1})
    if dupes:
        raise AttributeFileError(f"{path}: column(s) named twice in the header: {', '.join(dupes)}")
    value_cols = [(i, h) for i, h in enumerate(header) if i != file_col and h]
    rows: list[tuple[str, dict[str, float]]] = []
    for cells in reader:
        if not cells or not cells[file_col:file_col + 1] or not cells[file_col].strip():
            continue
        rows.append((cells[file_col].strip(),
                     {h: _number(cells[i]) if i < len(cells) else math.nan for i, h in value_cols}))
    if not rows:
        raise AttributeFileError(f"{path}: a header but no row naming a file")
    numeric = [h for _, h in value_cols if any(not math.isnan(v[h]) for _, v in rows)]
    if not numeric:
        raise AttributeFileError(f"{path}: no column with a number in it (columns: "
                                 f"{', '.join(h for _, h in value_cols) or 'only the file column'})")
    seen = [p for p, _ in rows]
    return AttributeTable(source=str(path), kind="csv", base=path.resolve().parent, columns=numeric,
                          rows=[(p, {h: v[h] for h in numeric}) for p, v in rows],
                          skipped_columns=[h for _, h in value_cols if h not in numeric],
                          duplicates=len(seen) - len(set(seen)))


def dataset_attributes(data_dir: str | Path) -> tuple[AttributeTable | None, str | None]:
    """(table, note) from the `dataset.json` that `semhinet synth` wrote into `data_dir`; (None, None) without one.

    Why never an error: the file is read without being asked for, so a damaged one must not stop an evaluation;
    it gets a note instead. Only synth's own file is read (its `generator` key), and only DATASET_FIELDS."""
    file = Path(data_dir) / "dataset.json"
    if not file.is_file():
        return None, None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{file}: not read for attributes ({' '.join(str(exc).split())[:200]})"
    if not isinstance(meta, dict) or meta.get("generator") != "semhinet_tf.data.synth" \
            or not isinstance(meta.get("frames"), list):
        return None, None  # someone else's dataset.json: not ours to interpret
    rows = []
    for rec in meta["frames"]:
        if isinstance(rec, dict) and isinstance(rec.get("path"), str):
            rows.append((rec["path"], {f: _number(rec.get(f)) if rec.get(f) is not None else math.nan
                                       for f in DATASET_FIELDS}))
    columns = [f for f in DATASET_FIELDS if any(not math.isnan(v[f]) for _, v in rows)]
    if not columns:
        return None, None
    return AttributeTable(source=str(file), kind="dataset.json", base=Path(data_dir).resolve(), columns=columns,
                          rows=[(p, {f: v[f] for f in columns}) for p, v in rows]), None


# ---------------------------------------------------------------- matching rows to the evaluated images
def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


def _file_name(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1]  # a Windows tool's path too


def match_table(table: AttributeTable, eval_paths: Sequence[str | Path], data_dir: str | Path | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Values per column aligned with `eval_paths` (NaN where no row), and what matched.

    A row's file is looked for as written when absolute, then relative to the table's folder, then to `data_dir`,
    and as a last resort by its file name alone when exactly one evaluated image has that name. Rows that name no
    evaluated image are counted (on a held-out split the training images' rows are expected among them)."""
    index = {_key(p): i for i, p in enumerate(eval_paths)}
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(eval_paths):
        by_name.setdefault(Path(p).name, []).append(i)
    values = {c: np.full(len(eval_paths), np.nan) for c in table.columns}
    matched, by_name_only, unmatched = 0, 0, []
    for raw, row in table.rows:
        name = raw.replace("\\", "/") if not re.match(r"^[A-Za-z]:[\\/]", raw) else raw
        p = Path(name)
        candidates = [p] if p.is_absolute() else [table.base / p] + ([Path(data_dir) / p] if data_dir else [])
        i = next((index[k] for k in map(_key, candidates) if k in index), None)
        if i is None and len(by_name.get(_file_name(raw), [])) == 1:
            i, by_name_only = by_name[_file_name(raw)][0], by_name_only + 1
        if i is None:
            unmatched.append(raw)
            continue
        matched += 1
        for c in table.columns:
            if not math.isnan(row[c]):
                values[c][i] = row[c]
    info = {"file": table.source, "kind": table.kind, "columns": list(table.columns),
            "skipped_columns": list(table.skipped_columns), "rows": len(table.rows), "matched": matched,
            "matched_by_file_name": by_name_only, "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:MAX_EXAMPLES], "duplicate_rows": table.duplicates}
    return values, info


# ---------------------------------------------------------------- terciles
def tercile_index(values: np.ndarray) -> np.ndarray:
    """Tercile 0/1/2 of each value: floor(3 r / n), r = how many values are strictly smaller (ties stay together)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    r = np.searchsorted(np.sort(values), values, side="left")
    return np.minimum(2, (3 * r) // max(n, 1)).astype(np.int64)


def recall_by_tercile(true_leaf: np.ndarray, pred_leaf: np.ndarray, values: np.ndarray, leaves: Sequence[str]
                      ) -> dict[str, dict[str, Any]]:
    """{class: {"n", "without_value", "recall", "recall_ci", "terciles": [{"tercile", "range", "n", "correct",
    "recall", "recall_ci"} x3]}} for each class with at least one valued frame (others are left out: normal and
    bogus have no severity). Fewer than MIN_FRAMES valued frames: "terciles" is empty."""
    true = np.asarray(true_leaf, dtype=np.int64)
    right = true == np.asarray(pred_leaf, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    out: dict[str, dict[str, Any]] = {}
    for j, leaf in enumerate(leaves):
        of_class = true == j
        has = of_class & ~np.isnan(values)
        n = int(has.sum())
        if n == 0:
            continue
        v, ok = values[has], right[has]
        k = int(ok.sum())
        entry: dict[str, Any] = {"n": n, "without_value": int(of_class.sum()) - n, "recall": k / n,
                                 "recall_ci": interval(k, n), "terciles": []}
        if n >= MIN_FRAMES:
            t = tercile_index(v)
            for g, name in enumerate(TERCILES):
                sel = t == g
                ng, kg = int(sel.sum()), int(ok[sel].sum())
                entry["terciles"].append({
                    "tercile": name, "range": [float(v[sel].min()), float(v[sel].max())] if ng else None,
                    "n": ng, "correct": kg, "recall": kg / ng if ng else None, "recall_ci": interval(kg, ng)})
        out[leaf] = entry
    return out


def attribute_results(true_leaf: np.ndarray, pred_leaf: np.ndarray, leaves: Sequence[str],
                      tables: Sequence[AttributeTable], eval_paths: Sequence[str | Path],
                      data_dir: str | Path | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the JSON "attributes" block, the "attribute_sources" list) for every numeric column of `tables`.

    Tables come in order of precedence, lowest first: a later table's number for the same column and image
    replaces an earlier one's (so --attributes overrides dataset.json cell by cell, and keeps its other cells)."""
    merged: dict[str, np.ndarray] = {}
    source_of: dict[str, list[str]] = {}
    sources = []
    for table in tables:
        values, info = match_table(table, eval_paths, data_dir)
        sources.append(info)
        for col, arr in values.items():
            if col in merged:
                merged[col] = np.where(np.isnan(arr), merged[col], arr)
            else:
                merged[col] = arr
            if (~np.isnan(arr)).any():
                source_of.setdefault(col, []).append(table.source)
    block = {}
    for col, arr in merged.items():
        classes = recall_by_tercile(true_leaf, pred_leaf, arr, leaves)
        block[col] = {"sources": source_of.get(col, []), "n": int((~np.isnan(arr)).sum()), "classes": classes}
    return block, sources


# ---------------------------------------------------------------- reading the block back: text, report, plot
def _short(x: float) -> str:
    return f"{x:.3g}"


def _cell(t: Mapping[str, Any], ci: bool = False) -> str:
    if not t["n"]:
        return "-"
    rng = t["range"]
    text = f"{t['recall']:.2f}" + (f" {format_interval(t['recall_ci'])}" if ci else "")
    return f"{text} n={t['n']} [{_short(rng[0])}..{_short(rng[1])}]"


def format_attribute_tables(block: Mapping[str, Any]) -> str:
    """Plain-text tables for the terminal: one per attribute, class x tercile, each cell 'recall n=.. [lo..hi]'."""
    out = []
    for attr, a in block.items():
        rows = [["class", "n", *TERCILES]]
        for leaf, c in a["classes"].items():
            cells = [_cell(t) for t in c["terciles"]] or ["(fewer than 3 frames)", "", ""]
            rows.append([leaf, str(c["n"]), *cells])
        if len(rows) == 1:
            out.append(f"recall by {attr} tercile: no evaluated frame has a value")
            continue
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        out.append(f"recall by {attr} tercile (from {', '.join(Path(s).name for s in a['sources']) or '-'}; "
                   f"cell: recall n=frames [value range]):\n" + "\n".join(lines))
    return "\n\n".join(out)


def source_notes(sources: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per attributes source: how many rows matched the evaluated images, what was skipped."""
    notes = []
    for s in sources:
        text = (f"attributes {s['file']}: {s['matched']} of {s['rows']} rows matched evaluated images"
                + (f" ({s['matched_by_file_name']} by file name alone)" if s["matched_by_file_name"] else ""))
        if s["unmatched"]:
            text += (f"; {s['unmatched']} did not (e.g. {', '.join(s['unmatched_examples'][:3])}; rows of images "
                     f"outside the evaluated split are expected among them)")
        if s["skipped_columns"]:
            text += f"; columns without numbers skipped: {', '.join(s['skipped_columns'])}"
        if s["duplicate_rows"]:
            text += f"; {s['duplicate_rows']} rows repeat a file (the last one counts)"
        notes.append(text)
    return notes


def plot_attributes(block: Mapping[str, Any], path: Path, save: Callable[[Any, Path], Path]) -> Path | None:
    """Recall by tercile, one panel per attribute, one line per class (None when no class has terciles).

    `save(figure, path)` is the report's writer, passed in so this module need not import report (which imports
    it)."""
    from matplotlib.figure import Figure

    attrs = [a for a in block if any(c["terciles"] for c in block[a]["classes"].values())]
    if not attrs:
        return None
    classes = list(dict.fromkeys(leaf for a in attrs for leaf, c in block[a]["classes"].items() if c["terciles"]))
    colours = {leaf: f"C{i % 10}" for i, leaf in enumerate(classes)}  # one colour per class in every panel
    fig = Figure(figsize=(4.6 * len(attrs) + 1.6, 4.2))
    axes = fig.subplots(1, len(attrs), squeeze=False).ravel()
    for ax, attr in zip(axes, attrs, strict=True):
        for leaf, c in block[attr]["classes"].items():
            if not c["terciles"]:
                continue
            y = [np.nan if t["recall"] is None else t["recall"] for t in c["terciles"]]
            shift = 0.05 * (classes.index(leaf) - (len(classes) - 1) / 2)  # equal lines stay visible side by side
            ax.plot(np.arange(3) + shift, y, marker="o", color=colours[leaf], label=leaf)
        ax.set_xticks(range(3), labels=[f"{t}\nthird" for t in TERCILES])
        ax.set_xlim(-0.4, 2.4)
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel(f"{attr} (each class's frames, lowest to highest)")
        ax.set_ylabel("recall")
        ax.set_title(f"Recall by {attr} tercile")
        ax.grid(alpha=0.3)
    handles = [axes[0].plot([], [], marker="o", color=colours[leaf])[0] for leaf in classes]
    fig.legend(handles, classes, loc="center right", fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (4.6 * len(attrs) + 1.6), 1))
    return save(fig, path)


def report_section(doc: Any, results: Mapping[str, Any], out: Path, save: Callable[[Any, Path], Path]) -> None:
    """The report's "Recall by attribute" section (a report._Doc): the table with intervals, the plot (written with
    `save`), the sources."""
    block = results.get("attributes") or {}
    doc.heading("Recall by attribute")
    doc.para("Recall of each class in the lowest, middle and highest third of its frames by each attribute the "
             "inspection tool or the generator records (severity and visibility from a synthetic set's "
             "dataset.json; the columns of an --attributes CSV). Each cell: recall [95% interval] n=frames "
             "[value range]. Equal values stay in one tercile (the lower), so thirds can differ in size. A third "
             "holds a third of a class's frames: its interval stays wide unless the class has about 90 frames or more.")
    rows = []
    for attr, a in block.items():
        for leaf, c in a["classes"].items():
            cells = [_cell(t, ci=True) for t in c["terciles"]] or ["fewer than 3 frames", "-", "-"]
            rows.append([attr, leaf, c["n"], *cells])
    if rows:
        doc.table(["attribute", "class", "frames", *(f"{t} third" for t in TERCILES)], rows)
    png = plot_attributes(block, out / PLOT_FILE, save)
    if png is not None:
        doc.image(png.name, "Recall by tercile of each attribute, one line per class")
    notes = source_notes(results.get("attribute_sources") or [])
    if notes:
        doc.note(" ".join(n + "." for n in notes))
