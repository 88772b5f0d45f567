"""Where a model's test errors are: the leaf confusion matrix and the router's accuracy split by what the
gatekeeper decided, from the JSON lines `semhinet predict` writes.

    semhinet predict RUN/model_int8.tflite TEST > preds.jsonl
    python experiments/error_anatomy.py preds.jsonl [more.jsonl ...] [--out experiments/results/error_anatomy.md]

The true class of a frame is its folder name (TEST/<class>/frame.png), as for `semhinet eval`. The issue's
router accuracy (`summary.h2_router_accuracy`) scores H2 on every defect frame; in use, H2 only decides for the
frames H1 passes on as defects. Splitting it by H1's verdict tells whether the router's errors are its own
(frames the gatekeeper saw as defects) or the gatekeeper's (frames it called normal or bogus, where H2 reads a
frame in which the model saw no defect).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from results_file import write_result


def _argmax(probs: dict[str, float]) -> str:
    return max(probs, key=probs.get)


def read_predictions(path: Path) -> list[dict]:
    """Rows with the frame's true class (its folder), the predicted leaf and each head's top class."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        rows.append({"path": r["path"], "true": Path(r["path"]).parent.name, "leaf": r["class"],
                     **{head: _argmax(p) for head, p in r["heads"].items()}})
    return rows


def anatomy(rows: list[dict], families: dict[str, str], leaves: list[str], gate: tuple[str, str] = ("h1", "defect"),
            router: str = "h2") -> dict:
    """Confusion counts and router accuracy on defect frames, split by the gatekeeper's verdict.

    `gate` is the gatekeeper head and its defect class, `router` the head that names the family."""
    confusion = Counter((r["true"], r["leaf"]) for r in rows)
    split = {True: Counter(), False: Counter()}
    for r in rows:
        if r["true"] in families:
            split[r[gate[0]] == gate[1]][(r["true"], r[router] == families[r["true"]])] += 1

    def accuracy(counts: Counter, leaf: str | None = None) -> tuple[float | None, int]:
        keys = [k for k in counts if leaf is None or k[0] == leaf]
        n = sum(counts[k] for k in keys)
        return (sum(counts[k] for k in keys if k[1]) / n if n else None), n

    return {"confusion": confusion, "leaves": leaves,
            "router": {verdict: {leaf: accuracy(split[verdict], leaf) for leaf in [None, *families]}
                       for verdict in (True, False)}}


def _fmt(value: tuple[float | None, int]) -> str:
    acc, n = value
    return "-" if acc is None else f"{acc:.3f} ({n})"


def to_markdown(name: str, result: dict, families: dict[str, str]) -> list[str]:
    leaves = result["leaves"]
    lines = [f"### {name}", "", "Leaf confusion (rows: true class, columns: predicted):", "",
             "| true \\ predicted | " + " | ".join(leaves) + " |", "|---" * (len(leaves) + 1) + "|"]
    for t in leaves:
        lines.append(f"| {t} | " + " | ".join(str(result["confusion"][(t, p)]) for p in leaves) + " |")
    router = result["router"]
    lines += ["", "Router (H2) accuracy on defect frames, by the gatekeeper's verdict (accuracy (frames)):", "",
              "| frames | all defects | " + " | ".join(families) + " |", "|---" * (len(families) + 2) + "|"]
    for verdict, label in ((True, "gatekeeper says defect"), (False, "gatekeeper says normal or bogus")):
        lines.append(f"| {label} | " + " | ".join(_fmt(router[verdict][leaf]) for leaf in [None, *families]) + " |")
    return [*lines, ""]


def misrouted_sheet(rows: list[dict], families: dict[str, str], gate: tuple[str, str], router: str, root: Path,
                    out: Path, limit: int = 24) -> int:
    """Thumbnails of the defect frames the gatekeeper passed and the router sent to another family, each
    captioned "true > predicted leaf"; returns how many such frames there were."""
    from PIL import Image, ImageDraw

    wrong = [r for r in rows if r["true"] in families and r[gate[0]] == gate[1]
             and r[router] != families[r["true"]]]
    if not wrong:
        return 0
    side, cols = 160, 6
    sheet = Image.new("L", (side * cols, (side + 14) * -(-min(len(wrong), limit) // cols)), 255)
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(wrong[:limit]):
        x, y = (i % cols) * side, (i // cols) * (side + 14)
        with Image.open(root / r["path"]) as im:
            sheet.paste(im.convert("L").resize((side, side)), (x, y))
        draw.text((x + 2, y + side), f"{r['true']} > {r['leaf']}", fill=0)
    sheet.save(out)
    return len(wrong)


def main() -> None:
    from semhinet_tf.taxonomy import Taxonomy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", nargs="+", type=Path, help="JSON lines from `semhinet predict`")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/error_anatomy.md"))
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="folder the predictions' paths are relative to (where `semhinet predict` ran)")
    args = parser.parse_args()
    taxonomy = Taxonomy.default()
    # leaves below the router (three levels: gatekeeper, router, specialist) -> their family
    deep = [taxonomy.path(leaf) for leaf in taxonomy.leaves if len(taxonomy.path(leaf)) > 2]
    families = {path[-1][1]: path[1][1] for path in deep}
    gate, router = deep[0][0], deep[0][1][0]
    lines = []
    for path in args.predictions:
        rows = read_predictions(path)
        result = anatomy(rows, families, list(taxonomy.leaves), gate, router)
        lines += to_markdown(path.name, result, families)
        if path == args.predictions[0]:
            sheet = args.out.with_name(args.out.stem + "_misrouted.png")
            sheet.parent.mkdir(parents=True, exist_ok=True)
            count = misrouted_sheet(rows, families, gate, router, args.root, sheet)
            if count:
                lines += [f"Defect frames of {path.name} the gatekeeper passed and the router sent to another family "
                          f"({count}; true > predicted leaf):", "", f"![misrouted frames]({sheet.name})", ""]
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
