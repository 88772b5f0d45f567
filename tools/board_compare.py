"""Does the board agree with the host? Compare a board run's JSONL with the same board module run here.

    python tools/board_compare.py compare MODEL.tflite IMAGES_DIR BOARD.jsonl [--frames BOARD_FRAMES.json]
    python tools/board_compare.py frames MODEL.tflite IMAGES_DIR OUT.json      (run in the board's Python)

`compare` runs `python -m semhinet_tf.board` in-process on this machine (ai_edge_litert), matches the rows
file by file (by path relative to the image folder) and passes when
- the same files are unreadable on both sides;
- every verdict the model makes on its own is the same on both sides: a class may change only on a frame both
  sides send to review (or a near-tie: the two leaves within 0.1 of each other on both sides);
- the engines agree in bulk: the median over the images of the largest head/leaf probability difference is
  within the tolerance (default 0.1), and at least --min-agreement (default 0.9) of the images keep their verdict
  or change it between near-tied leaves;
- the unfamiliar-frame score (a model converted with it): on both sides or on neither, and its flag the same
  except where the two scores are within OOD_NEAR (10%) of each other (rounding at the threshold).
It prints "board agreement: ..." with the median, 90th percentile and largest difference and exits 1 otherwise
(2 on bad usage).

Why not every probability within a tolerance: int8 kernels round differently between TFLite versions
(tflite-runtime 2.14's and LiteRT's optimized depthwise convolution differ by one step on a few outputs, MEAN
then passes it on), and a trained int8 model amplifies one step into several 1/256 steps of its softmax.
Measured on the default 160 px model (200 benchmark frames, board venv vs host): the largest probability
difference per image has median 0.065 (90th percentile 0.14, max 0.28) with one view and 0.033 with eight;
10 verdicts change with one view, 4 with eight, every one on a frame both sides send to review. A broken
board world moves most images far more (simulated by shuffling the board's rows between files: median 0.95,
17% of verdicts the same). The exact check is the decode: `frames` (run with the board's Python) hashes every decoded
uint8 frame, and `compare --frames` requires them byte-identical to the host's. Neither command imports
TensorFlow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout: the package sits next to tools/
    sys.path.insert(0, str(HERE.parent))

from semhinet_tf.board.__main__ import main as board_main  # noqa: E402
from semhinet_tf.board.runtime import BoardModel, iter_image_paths  # noqa: E402
from semhinet_tf.data.decode import ImageError, load_frame  # noqa: E402
from semhinet_tf.data.scan import Unreadable  # noqa: E402

DEFAULT_TOL = 0.1  # median over the images of the largest probability difference
DEFAULT_MIN_AGREEMENT = 0.9  # share of identical verdicts
NEAR_TIE = 0.1  # two leaves this close on both sides: a changed verdict between them is rounding, not a bug
OOD_NEAR = 0.1  # relative difference of two unfamiliar-frame scores within which their flags may differ
EXIT_OK, EXIT_DISAGREE, EXIT_USAGE = 0, 1, 2
SHOW = 20  # disagreements listed one per line


# ---------------------------------------------------------------- frames (either side)
def frame_hashes(model: BoardModel, images: str | Path) -> dict[str, str]:
    """sha256 of every frame decoded as `model` decodes, keyed by path relative to `images`; 'error: ...' else."""
    pre = model.preprocess
    out = {}
    for path in iter_image_paths([images]):
        if isinstance(path, Unreadable):
            out[_rel(path.path, images)] = f"error: {path.reason}"
            continue
        key = _rel(path, images)
        try:
            out[key] = hashlib.sha256(load_frame(path, pre).tobytes()).hexdigest()
        except ImageError as exc:
            out[key] = f"error: {exc.reason}"
    return out


def environment(model: BoardModel) -> dict:
    """Versions of what decodes and runs the model here, and whether TensorFlow got imported."""
    import numpy
    import PIL

    versions = {"python": platform.python_version(), "numpy": numpy.__version__, "pillow": PIL.__version__}
    for name in ("tflite_runtime", "ai_edge_litert"):
        if name in sys.modules:
            versions[name] = getattr(sys.modules[name], "__version__", "?")
    return {"engine": model.engine, "versions": versions,
            "tensorflow_imported": any(m.split(".")[0] in ("tensorflow", "tf_keras") for m in sys.modules)}


def _rel(path: str | Path, root: str | Path) -> str:
    rel = os.path.relpath(path, root)
    return Path(path).name if rel == "." else Path(rel).as_posix()


# ---------------------------------------------------------------- compare (host)
def read_rows(path: str | Path) -> dict[str, dict]:
    """JSONL rows keyed by path relative to the folder all of them share (so a board's paths match the host's)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not JSON ({exc.msg})") from exc
    if not rows:
        return {}
    if any("path" not in r for r in rows):
        raise ValueError(f"{path}: a row has no 'path' (not the board's JSONL output?)")
    parents = [os.path.dirname(r["path"]) or "." for r in rows]
    root = os.path.commonpath(parents) if len({os.path.isabs(p) for p in parents}) == 1 else ""
    return {_rel(r["path"], root) if root else r["path"]: r for r in rows}


def _probs(row: dict) -> dict[str, float]:
    flat = {f"leaf.{k}": float(v) for k, v in row.get("leaf_probabilities", {}).items()}
    for head, classes in row.get("heads", {}).items():
        flat.update({f"{head}.{k}": float(v) for k, v in classes.items()})
    return flat


def compare_rows(host: dict, board: dict) -> dict:
    """Per-file verdict: agree or not, the largest probability difference, and whether the class flipped.
    A flip agrees when both sides send the frame to review or it is a near-tie; probabilities are judged in
    bulk by `compare`, not frame by frame."""
    if "error" in host or "error" in board:
        both = "error" in host and "error" in board
        why = "" if both else f"unreadable on the {'host' if 'error' in host else 'board'} only"
        return {"agree": both, "diff": 0.0, "flip": False, "tie": False, "why": why}
    hp, bp = _probs(host), _probs(board)
    if set(hp) != set(bp):
        return {"agree": False, "diff": float("inf"), "flip": False, "tie": False, "why": "different heads or classes"}
    diff = max((abs(hp[k] - bp[k]) for k in hp), default=0.0)
    if ("ood" in host) != ("ood" in board):
        side = "host" if "ood" in host else "board"
        return {"agree": False, "diff": diff, "flip": False, "tie": False,
                "why": f"an unfamiliar-frame score on the {side} only"}
    ood_diff = None
    if "ood" in host:
        ood_diff = abs(host["ood"] - board["ood"]) / max(abs(host["ood"]), abs(board["ood"]), 1e-9)
        if host.get("unfamiliar") != board.get("unfamiliar") and ood_diff > OOD_NEAR:
            return {"agree": False, "diff": diff, "flip": False, "tie": False, "ood_diff": ood_diff,
                    "why": f"unfamiliar on the {'host' if host.get('unfamiliar') else 'board'} only, scores "
                           f"{host['ood']:.3g} vs {board['ood']:.3g}"}
    hc, bc = host["class"], board["class"]
    flip = hc != bc
    near_tie = flip and all(abs(p[f"leaf.{hc}"] - p[f"leaf.{bc}"]) <= NEAR_TIE for p in (hp, bp))
    unsure = flip and bool(host.get("review")) and bool(board.get("review"))
    why = ""
    if flip and not (near_tie or unsure):
        sides = [name for name, row in (("host", host), ("board", board)) if not row.get("review")]
        why = (f"class {hc} on the host, {bc} on the board, decided without review on the {' and '.join(sides)} "
               f"(p {hp[f'leaf.{hc}']:.3f}/{hp[f'leaf.{bc}']:.3f} vs {bp[f'leaf.{hc}']:.3f}/{bp[f'leaf.{bc}']:.3f})")
    return {"agree": not why, "diff": diff, "flip": flip, "tie": near_tie, "why": why, "ood_diff": ood_diff}


def compare(host_rows: dict, board_rows: dict, tol: float = DEFAULT_TOL,
            min_agreement: float = DEFAULT_MIN_AGREEMENT) -> dict:
    """All files of either side (a file on one side only disagrees), and the bulk figures; `ok` is the verdict."""
    files = {}
    for key in sorted(set(host_rows) | set(board_rows)):
        if key not in host_rows or key not in board_rows:
            side = "host" if key in host_rows else "board"
            files[key] = {"agree": False, "diff": 0.0, "flip": False, "tie": False, "why": f"only in the {side} output"}
        else:
            files[key] = compare_rows(host_rows[key], board_rows[key])
    diffs = sorted(f["diff"] for f in files.values())
    n = len(files)
    result = {"n": n, "agree": sum(f["agree"] for f in files.values()), "flips": sum(f["flip"] for f in files.values()),
              "median_diff": _quantile(diffs, 0.5), "p90_diff": _quantile(diffs, 0.9),
              "max_diff": max(diffs, default=0.0), "tol": tol, "min_agreement": min_agreement, "files": files}
    # near-ties are rounding whatever the engine; the share of verdicts kept counts the other changes
    result["ties"] = sum(f["flip"] and f["tie"] for f in files.values())
    ood = sorted(f["ood_diff"] for f in files.values() if f.get("ood_diff") is not None)
    result["ood_n"], result["ood_median_rel_diff"] = len(ood), _quantile(ood, 0.5)
    same = (n - result["flips"] + result["ties"]) / n if n else 0.0
    result["ok"] = bool(n) and result["agree"] == n and result["median_diff"] <= tol and same >= min_agreement
    return result


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def compare_frames(host: dict[str, str], board: dict[str, str]) -> list[str]:
    """Files whose decoded frame differs (or is on one side only)."""
    return sorted(k for k in set(host) | set(board) if host.get(k) != board.get(k))


def format_summary(result: dict) -> str:
    n, flips = result["n"], result["flips"]
    lines = [f"board agreement: {result['agree']}/{n} images; {n - flips}/{n} same verdict ({flips} changed, "
             f"{result['ties']} of them near-ties; changes allowed only on frames both sides send to review or on "
             f"near-ties, and at least {result['min_agreement']:.0%} kept or near-ties); largest probability "
             f"difference per image: median {result['median_diff']:.4f} (tolerance {result['tol']:g}), "
             f"90th percentile {result['p90_diff']:.4f}, max {result['max_diff']:.4f}"
             + (f"; unfamiliar-frame score on {result['ood_n']} images, median relative difference "
                f"{result['ood_median_rel_diff']:.3f}" if result.get("ood_n") else "")]
    bad = [(k, f["why"]) for k, f in result["files"].items() if not f["agree"]]
    lines += [f"  differs: {k}: {why}" for k, why in bad[:SHOW]]
    if len(bad) > SHOW:
        lines.append(f"  ... and {len(bad) - SHOW} more")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="board_compare.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="run the board module here and compare with a board run's JSONL")
    c.add_argument("model")
    c.add_argument("images")
    c.add_argument("board_jsonl")
    c.add_argument("--frames", help="frame hashes written by `frames` in the board's Python: must match exactly")
    c.add_argument("--host-out", help="keep the host's JSONL here (default: next to BOARD_JSONL as host.jsonl)")
    c.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help=f"tolerance for the median largest probability difference per image (default {DEFAULT_TOL})")
    c.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                   help=f"share of images that keep their verdict (or change it between near-tied leaves) "
                        f"required (default {DEFAULT_MIN_AGREEMENT})")
    c.add_argument("--views", default="1", help="test-time views the board run used (its --views)")
    f = sub.add_parser("frames", help="hash every decoded frame (run in the board's Python)")
    f.add_argument("model")
    f.add_argument("images")
    f.add_argument("out")
    return p.parse_args(argv)


def _load(model: str) -> BoardModel:
    return BoardModel(model, warn=lambda msg: print(msg, file=sys.stderr))


def _run_frames(args) -> int:
    model = _load(args.model)
    frames = frame_hashes(model, args.images)
    data = {**environment(model), "frames": frames}  # after decoding: nothing on the way may import TensorFlow
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(data['frames'])} frames hashed with {data['engine']} {json.dumps(data['versions'])}; "
          f"tensorflow imported: {data['tensorflow_imported']}", file=sys.stderr)
    return EXIT_DISAGREE if data["tensorflow_imported"] else EXIT_OK


def _run_compare(args) -> int:
    host_out = Path(args.host_out) if args.host_out else Path(args.board_jsonl).with_name("host.jsonl")
    board_rows = read_rows(args.board_jsonl)
    rc = board_main([args.model, args.images, "--format", "jsonl", "--out", str(host_out), "--overwrite",
                     "--views", args.views])
    if rc not in (0, 1):
        print(f"error: the board module failed on the host (exit {rc})", file=sys.stderr)
        return EXIT_USAGE
    result = compare(read_rows(host_out), board_rows, args.tol, args.min_agreement)
    print(format_summary(result))
    ok = result["ok"]
    if result["n"] == 0:
        print("no images compared")
    if args.frames:
        board = json.loads(Path(args.frames).read_text())
        host = frame_hashes(_load(args.model), args.images)
        differ = compare_frames(host, board["frames"])
        n = len(set(board["frames"]) | set(host))
        print(f"board frames: {n - len(differ)}/{n} byte-identical to the host's decode "
              f"(board: {board.get('engine')}, {json.dumps(board.get('versions', {}))})")
        print("".join(f"  frame differs: {k}\n" for k in differ[:SHOW]), end="")
        ok = ok and not differ and not board.get("tensorflow_imported", False)
    return EXIT_OK if ok else EXIT_DISAGREE


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("model", "images", "board_jsonl", "frames"):
        value = getattr(args, name, None)
        if value and not Path(value).exists():
            print(f"error: {value}: no such file or folder", file=sys.stderr)
            return EXIT_USAGE
    try:
        return _run_frames(args) if args.command == "frames" else _run_compare(args)
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
