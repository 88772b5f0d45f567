"""Recall by what the inspection tool knows (issue 26.2): per class, by tercile of a numeric attribute per frame,
and by value of a text attribute (the pattern, the layer, the tool, a bogus frame's kind).

A fab reads an ADC by asking "does it find the small defects, or only the big ones?", and "on which layer, which
pattern, which tool does it fail?". The tool's defect file knows each defect's size (or contrast, or die
position) and the frame's layer or recipe; the synthetic generator knows each frame's severity, visibility score
and pattern (`dataset.json`). This module reads such per-file values, matches them to the images `eval` scored,
and gives per class the recall and its 95% Wilson interval in each group: for a number, three equal-count groups
(low, mid, high tercile); for a text, one group per value, with the verdicts its misses got. Why the text groups:
a class can hold a sub-population the model never learnt (a defect on a pattern it rarely saw) that no per-class
figure and no tercile of a number shows.

Tercile rule (ties kept together): among one class's frames that have a value, a frame's tercile is
floor(3 * r / n), where r is the number of those frames with a strictly smaller value. Equal values share r, so a
run of ties lands whole in the tercile of its first member (the lower one); without ties the groups differ in size
by at most one, larger first (numpy.array_split's sizes). Heavy ties can leave a tercile empty (n 0, recall None).

Column kind in a CSV: a column whose non-empty cells are at least half numbers is numeric (its other cells are not
counted: one bad cell in a tool's export costs that cell only); otherwise it is text, grouped by value when it has
at most MAX_CATEGORIES distinct values and not a different one in every row (else an identifier, not a group:
skipped and said so).

Inputs are a CSV (`read_attribute_csv`: a header, one column naming the file, the others numbers or texts) and a
synth data set's `dataset.json` (`dataset_attributes`). No TensorFlow here; matplotlib only in `plot_attributes`.
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

from semhinet_tf.data.decode import DATASET_RECORD
from semhinet_tf.stats import format_interval, interval

PATH_COLUMNS = ("path", "file", "filename", "image")  # header names (any case) accepted for the file column
DATASET_FIELDS = ("severity", "visibility")  # the numbers synth's dataset.json records per defect frame
DATASET_CATEGORIES = {"pattern": "pattern", "kind": "bogus_kind"}  # its texts per frame: record key -> attribute
MAX_CATEGORIES = 20  # a text column with more distinct values is an identifier (lot, wafer), not a group
TERCILES = ("low", "mid", "high")
MIN_FRAMES = 3  # a class with fewer valued frames gets its n and no terciles
PLOT_FILE = "attributes.png"
MAX_EXAMPLES = 5  # unmatched paths listed by name


class AttributeFileError(ValueError):
    """An attributes file that cannot be used (missing, unreadable, no header, no file column, no usable column)."""


@dataclass
class AttributeTable:
    """Values per file from one source: `rows` are (path as written, {column: value}): a float (NaN: none) for the
    numeric `columns`, a str ("": none) for the text `categories`."""

    source: str  # the file it came from, as shown to the user
    kind: str  # "csv" or "dataset.json"
    base: Path  # folder that relative paths in it are first resolved against
    columns: list[str]
    rows: list[tuple[str, dict[str, Any]]]
    skipped_columns: list[str] = field(default_factory=list)  # columns without a value, or identifiers
    duplicates: int = 0  # rows naming a file named before (the last one wins)
    categories: list[str] = field(default_factory=list)  # text columns, grouped by value


def _number(cell: str | None) -> float:
    """A finite float, else NaN (empty, text, 'nan', 'inf'): such a cell is simply not counted."""
    try:
        value = float(str(cell).strip())
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def column_kind(cells: Sequence[str]) -> str:
    """"number", "text" or "skip" for one column's cells (see the module text: at least half numbers is numeric;
    a column without a value is skipped, and so is an identifier: a text of more than MAX_CATEGORIES values, or a
    different one in every row)."""
    filled = [c.strip() for c in cells if c and c.strip()]
    if not filled:
        return "skip"
    numbers = sum(not math.isnan(_number(c)) for c in filled)
    if numbers and 2 * numbers >= len(filled):
        return "number"
    distinct = len(set(filled))
    identifier = distinct > MAX_CATEGORIES or (len(filled) > 3 and distinct == len(filled))  # one frame a group
    return "skip" if identifier else "text"


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
    try:
        return _parse_rows(path, csv.reader(lines, delimiter=delimiter))
    except csv.Error as exc:  # e.g. "field larger than field limit (131072)": not a ValueError
        raise AttributeFileError(f"{path}: not a readable CSV ({exc})") from exc


def _parse_rows(path: Path, reader) -> AttributeTable:
    """The table from the CSV rows after its header row (read first)."""
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
    raw_rows: list[tuple[str, dict[str, str]]] = []
    for cells in reader:
        if not cells or not cells[file_col:file_col + 1] or not cells[file_col].strip():
            continue
        raw_rows.append((cells[file_col].strip(),
                         {h: cells[i].strip() if i < len(cells) else "" for i, h in value_cols}))
    if not raw_rows:
        raise AttributeFileError(f"{path}: a header but no row naming a file")
    kinds = {h: column_kind([v[h] for _, v in raw_rows]) for _, h in value_cols}
    numeric = [h for _, h in value_cols if kinds[h] == "number"]
    texts = [h for _, h in value_cols if kinds[h] == "text"]
    if not numeric and not texts:
        names = ", ".join(h for _, h in value_cols) or "only the file column"
        raise AttributeFileError(f"{path}: no column with a number, or a text of at most {MAX_CATEGORIES} "
                                 f"values, in it (columns: {names})")
    seen = [p for p, _ in raw_rows]
    return AttributeTable(source=str(path), kind="csv", base=path.resolve().parent, columns=numeric,
                          rows=[(p, {**{h: _number(v[h]) for h in numeric}, **{h: v[h] for h in texts}})
                                for p, v in raw_rows],
                          skipped_columns=[h for _, h in value_cols if kinds[h] == "skip"],
                          duplicates=len(seen) - len(set(seen)), categories=texts)


def dataset_attributes(data_dir: str | Path) -> tuple[AttributeTable | None, str | None]:
    """(table, note) from the `dataset.json` that `semhinet synth` wrote into `data_dir`; (None, None) without one.

    Why never an error: the file is read without being asked for, so a damaged one must not stop an evaluation;
    it gets a note instead. Only synth's own file is read (its `generator` key), and only DATASET_FIELDS and
    DATASET_CATEGORIES."""
    file = Path(data_dir) / DATASET_RECORD
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
            values: dict[str, Any] = {f: _number(rec.get(f)) if rec.get(f) is not None else math.nan
                                      for f in DATASET_FIELDS}
            values.update({name: rec[key] if isinstance(rec.get(key), str) else ""
                           for key, name in DATASET_CATEGORIES.items()})
            rows.append((rec["path"], values))
    columns = [f for f in DATASET_FIELDS if any(not math.isnan(v[f]) for _, v in rows)]
    texts = [name for name in DATASET_CATEGORIES.values() if any(v[name] for _, v in rows)]
    if not columns and not texts:
        return None, None
    return AttributeTable(source=str(file), kind=DATASET_RECORD, base=Path(data_dir).resolve(), columns=columns,
                          rows=[(p, {f: v[f] for f in columns + texts}) for p, v in rows], categories=texts), None


# ---------------------------------------------------------------- matching rows to the evaluated images
def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


def _file_name(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1]  # a Windows tool's path too


def match_table(table: AttributeTable, eval_paths: Sequence[str | Path], data_dir: str | Path | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Values per column aligned with `eval_paths` (NaN where no row; for a text column an object array, None
    where no value), and what matched.

    A row's file is looked for as written when absolute, then relative to the table's folder, then to `data_dir`,
    and as a last resort by its file name alone when exactly one evaluated image has that name. Rows that name no
    evaluated image are counted (on a held-out split the training images' rows are expected among them)."""
    index = {_key(p): i for i, p in enumerate(eval_paths)}
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(eval_paths):
        by_name.setdefault(Path(p).name, []).append(i)
    values = {c: np.full(len(eval_paths), np.nan) for c in table.columns}
    values.update({c: np.full(len(eval_paths), None, dtype=object) for c in table.categories})
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
        for c in table.categories:
            if row[c]:
                values[c][i] = row[c]
    info = {"file": table.source, "kind": table.kind, "columns": list(table.columns),
            "categories": list(table.categories),
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


def recall_by_value(true_leaf: np.ndarray, pred_leaf: np.ndarray, values: np.ndarray, leaves: Sequence[str]
                    ) -> dict[str, dict[str, Any]]:
    """{class: {"n", "without_value", "recall", "recall_ci", "groups": [{"value", "n", "correct", "recall",
    "recall_ci", "called"} per value the class's frames have, in sorted order]}} for each class with a valued
    frame. "called": the verdicts its missed frames got, {leaf: frames}, most frequent first."""
    true = np.asarray(true_leaf, dtype=np.int64)
    pred = np.asarray(pred_leaf, dtype=np.int64)
    values = np.asarray(values, dtype=object)
    has_value = np.array([v is not None for v in values], dtype=bool)
    out: dict[str, dict[str, Any]] = {}
    for j, leaf in enumerate(leaves):
        of_class = true == j
        has = of_class & has_value
        n = int(has.sum())
        if n == 0:
            continue
        k = int((pred[has] == j).sum())
        groups = []
        for value in sorted({str(v) for v in values[has]}):
            sel = has & (values == value)
            ng, kg = int(sel.sum()), int((pred[sel] == j).sum())
            wrong = np.bincount(pred[sel & (pred != j)], minlength=len(leaves))
            called = {leaves[i]: int(wrong[i]) for i in np.argsort(-wrong, kind="stable") if wrong[i]}
            groups.append({"value": value, "n": ng, "correct": kg, "recall": kg / ng, "recall_ci": interval(kg, ng),
                           "called": called})
        out[leaf] = {"n": n, "without_value": int(of_class.sum()) - n, "recall": k / n, "recall_ci": interval(k, n),
                     "groups": groups}
    return out


def attribute_results(true_leaf: np.ndarray, pred_leaf: np.ndarray, leaves: Sequence[str],
                      tables: Sequence[AttributeTable], eval_paths: Sequence[str | Path],
                      data_dir: str | Path | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the JSON "attributes" block, the "attribute_sources" list) for every column of `tables`: a numeric one
    {"kind": "tercile", ..., "classes": recall_by_tercile}, a text one {"kind": "value", ..., "classes":
    recall_by_value}.

    Tables come in order of precedence, lowest first: a later table's value for the same column and image
    replaces an earlier one's (so --attributes overrides dataset.json cell by cell, and keeps its other cells).
    A column numeric in one table and text in another is kept apart: the text one is named "NAME (text)"."""
    merged: dict[str, np.ndarray] = {}
    source_of: dict[str, list[str]] = {}
    sources = []
    for table in tables:
        values, info = match_table(table, eval_paths, data_dir)
        sources.append(info)
        for col, arr in values.items():
            text = col in table.categories
            name = f"{col} (text)" if text and col in table.columns + [c for c in merged if
                                                                       merged[c].dtype != object] else col
            missing = _missing(arr)
            if name in merged and (merged[name].dtype == object) == text:
                merged[name] = np.where(missing, merged[name], arr)
            else:
                merged[name] = arr
            if (~missing).any():
                source_of.setdefault(name, []).append(table.source)
    block = {}
    for col, arr in merged.items():
        text = arr.dtype == object
        classes = (recall_by_value if text else recall_by_tercile)(true_leaf, pred_leaf, arr, leaves)
        block[col] = {"kind": "value" if text else "tercile", "sources": source_of.get(col, []),
                      "n": int((~_missing(arr)).sum()), "classes": classes}
    return block, sources


def _missing(arr: np.ndarray) -> np.ndarray:
    """Where a column aligned with the evaluated images has no value (NaN, or None in a text column)."""
    if arr.dtype == object:
        return np.array([v is None for v in arr], dtype=bool)
    return np.isnan(arr)


# ---------------------------------------------------------------- reading the block back: text, report, plot
def _short(x: float) -> str:
    return f"{x:.3g}"


def _cell(t: Mapping[str, Any], ci: bool = False) -> str:
    if not t["n"]:
        return "-"
    rng = t["range"]
    text = f"{t['recall']:.2f}" + (f" {format_interval(t['recall_ci'])}" if ci else "")
    return f"{text} n={t['n']} [{_short(rng[0])}..{_short(rng[1])}]"


def _group_cell(g: Mapping[str, Any], ci: bool = False) -> str:
    text = f"{g['recall']:.2f}" + (f" {format_interval(g['recall_ci'])}" if ci else "") + f" n={g['n']}"
    if g["called"]:
        text += " (" + ", ".join(f"{leaf} {k}" for leaf, k in list(g["called"].items())[:2]) + ")"
    return text


def _values(a: Mapping[str, Any]) -> list[str]:
    """A text attribute's values over every class, in sorted order (the columns of its table)."""
    return sorted({g["value"] for c in a["classes"].values() for g in c["groups"]})


def _value_rows(a: Mapping[str, Any], ci: bool = False) -> tuple[list[str], list[list[str]]]:
    values = _values(a)
    rows = []
    for leaf, c in a["classes"].items():
        by_value = {g["value"]: g for g in c["groups"]}
        rows.append([leaf, str(c["n"]), *(_group_cell(by_value[v], ci) if v in by_value else "-" for v in values)])
    return values, rows


def format_attribute_tables(block: Mapping[str, Any]) -> str:
    """Plain-text tables for the terminal: one per attribute, class x tercile (each cell 'recall n=.. [lo..hi]')
    or class x value (each cell 'recall n=.. (the verdicts of its misses)')."""
    out = []
    for attr, a in block.items():
        if a.get("kind") == "value":
            values, body = _value_rows(a)
            rows = [["class", "n", *values], *body]
            title = f"recall by {attr} (from {', '.join(Path(s).name for s in a['sources']) or '-'}; cell: recall " \
                    f"n=frames (what the most frequent misses were called)):"
        else:
            rows = [["class", "n", *TERCILES]]
            for leaf, c in a["classes"].items():
                cells = [_cell(t) for t in c["terciles"]] or ["(fewer than 3 frames)", "", ""]
                rows.append([leaf, str(c["n"]), *cells])
            title = f"recall by {attr} tercile (from {', '.join(Path(s).name for s in a['sources']) or '-'}; " \
                    f"cell: recall n=frames [value range]):"
        if len(rows) == 1:
            out.append(f"recall by {attr}: no evaluated frame has a value")
            continue
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        out.append(title + "\n" + "\n".join(lines))
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
            text += (f"; columns skipped (no value, or an identifier: a different text in every row or more than "
                     f"{MAX_CATEGORIES} texts): "
                     f"{', '.join(s['skipped_columns'])}")
        if s["duplicate_rows"]:
            text += f"; {s['duplicate_rows']} rows repeat a file (the last one counts)"
        notes.append(text)
    return notes


def plot_attributes(block: Mapping[str, Any], path: Path, save: Callable[[Any, Path], Path]) -> Path | None:
    """Recall by tercile (one line per class) and by value (bars per class, one per value, with their 95%
    intervals), one panel per attribute; None when no class has terciles or groups.

    `save(figure, path)` is the report's writer, passed in so this module need not import report (which imports
    it)."""
    from matplotlib.figure import Figure

    attrs = [a for a in block if any(c.get("terciles") or c.get("groups") for c in block[a]["classes"].values())]
    if not attrs:
        return None
    classes = list(dict.fromkeys(leaf for a in attrs for leaf, c in block[a]["classes"].items()
                                 if c.get("terciles")))  # the lines' legend
    colours = {leaf: f"C{i % 10}" for i, leaf in enumerate(classes)}  # one colour per class in every panel
    widths = [max(4.6, 0.55 * len(block[a]["classes"]) * max(1, len(_values(block[a])))) if
              block[a].get("kind") == "value" else 4.6 for a in attrs]
    fig = Figure(figsize=(sum(widths) + 1.6, 4.2))
    axes = fig.subplots(1, len(attrs), squeeze=False, width_ratios=widths).ravel()
    for ax, attr in zip(axes, attrs, strict=True):
        if block[attr].get("kind") == "value":
            _plot_values(ax, attr, block[attr])
            continue
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
    line_panels = [ax for ax, a in zip(axes, attrs, strict=True) if block[a].get("kind") != "value"]
    if line_panels:
        handles = [line_panels[0].plot([], [], marker="o", color=colours[leaf])[0] for leaf in classes]
        fig.legend(handles, classes, loc="center right", fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (sum(widths) + 1.6), 1))
    return save(fig, path)


def _plot_values(ax: Any, attr: str, a: Mapping[str, Any]) -> None:
    """One group of bars per class, one bar per value (hatched per value), with the Wilson interval: where a
    class's recall hangs on one value (a pattern, a layer), the bar says so at a glance."""
    values = _values(a)
    leaves = [leaf for leaf, c in a["classes"].items() if c["groups"]]
    width = 0.8 / max(len(values), 1)
    hatches = ("", "//", "..", "xx", "\\\\", "oo")
    for i, value in enumerate(values):
        xs, ys, lo, hi = [], [], [], []
        for x, leaf in enumerate(leaves):
            g = next((g for g in a["classes"][leaf]["groups"] if g["value"] == value), None)
            if g is None:
                continue
            xs.append(x + (i - (len(values) - 1) / 2) * width)
            ys.append(g["recall"])
            lo.append(g["recall"] - g["recall_ci"][0])
            hi.append(g["recall_ci"][1] - g["recall"])
        ax.bar(xs, ys, width * 0.95, yerr=[lo, hi], capsize=2, color=f"C{i % 10}", alpha=0.75,
               hatch=hatches[i % len(hatches)], edgecolor="black", linewidth=0.4, label=value)
    ax.set_xticks(range(len(leaves)), labels=leaves, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.set_title(f"Recall by {attr} (95% intervals)")
    ax.legend(title=attr, fontsize=8, title_fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, axis="y")


def report_section(doc: Any, results: Mapping[str, Any], out: Path, save: Callable[[Any, Path], Path]) -> None:
    """The report's "Recall by attribute" section (a report._Doc): the tables with intervals, the plot (written with
    `save`), the sources."""
    block = results.get("attributes") or {}
    doc.heading("Recall by attribute")
    doc.para("Recall of each class in the lowest, middle and highest third of its frames by each numeric attribute "
             "the inspection tool or the generator records (severity and visibility from a synthetic set's "
             "dataset.json; the number columns of an --attributes CSV), and for each value of a text attribute "
             "(the pattern and a bogus frame's kind from dataset.json; a layer, a tool, a recipe from a CSV). Each "
             "cell: recall [95% interval] n=frames, and [value range] for a third or the verdicts the misses got "
             "for a value. Equal values stay in one tercile (the lower), so thirds can differ in size. A third "
             "holds a third of a class's frames: its interval stays wide unless the class has about 90 frames or "
             "more. A value whose recall is far below its class's is a sub-population the model has not learnt.")
    rows = []
    for attr, a in block.items():
        if a.get("kind") == "value":
            continue
        for leaf, c in a["classes"].items():
            cells = [_cell(t, ci=True) for t in c["terciles"]] or ["fewer than 3 frames", "-", "-"]
            rows.append([attr, leaf, c["n"], *cells])
    if rows:
        doc.table(["attribute", "class", "frames", *(f"{t} third" for t in TERCILES)], rows)
    for attr, a in block.items():
        if a.get("kind") == "value" and a["classes"]:
            values, body = _value_rows(a, ci=True)
            doc.para(f"By {attr}:")
            doc.table(["class", "frames", *values], body)
    png = plot_attributes(block, out / PLOT_FILE, save)
    if png is not None:
        doc.image(png.name, "Recall by tercile of each numeric attribute (lines, one per class) and by value of each "
                            "text attribute (bars)")
    notes = source_notes(results.get("attribute_sources") or [])
    if notes:
        doc.note(" ".join(n + "." for n in notes))
