"""python -m semhinet_tf.board MODEL.tflite IMAGES_OR_DIRS... : classify on the board, no TensorFlow.

Writes one JSON line (or CSV row) per image to stdout or --out, timing to stderr.
Exit codes: 0 all images classified; 1 some images could not be read (listed); 2 bad model or usage;
3 some images were flagged for review and --fail-on-review was given; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

from semhinet_tf.artifacts.files import atomic_open, check_outputs
from semhinet_tf.artifacts.run import model_inputs
from semhinet_tf.board.output import (  # noqa: F401 - CSV_FIELDS: the board's columns
    CSV_FIELDS,
    Writer,
    review_reason,
    review_summary,
)
from semhinet_tf.board.runtime import KERNELS, VIEWS_BUDGET_SHARE, BoardModel
from semhinet_tf.data.decode import DEFAULT_MAX_PIXELS, set_max_pixels

DEFAULT_BUDGET_MS = 50.0  # the product's ceiling per image
EXIT_OK, EXIT_BAD_IMAGES, EXIT_USAGE, EXIT_REVIEW, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def _views(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m semhinet_tf.board", description=__doc__.splitlines()[0])
    p.add_argument("model", help="the int8 .tflite written by `semhinet convert`")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--delegate", help="external delegate library, e.g. /usr/lib/libvx_delegate.so (NPU)")
    p.add_argument("--require-delegate", action="store_true",
                   help="stop with an error when --delegate cannot be loaded (default: warn and run on the CPU, "
                        "several times slower)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for the interpreter")
    p.add_argument("--review-threshold", "--threshold", dest="threshold", type=_probability, default=None,
                   help="review threshold on the leaf probability (default: the one stored in the model)")
    p.add_argument("--views", type=_views, default=1,
                   help="score each image as 1, 2, 4 or 8 flips/rotations of itself and average them (one "
                        "inference each: more accurate, proportionally slower); 'auto': measure one inference "
                        "here and use the most views that fit --budget-ms")
    # argparse %-formats help texts: a literal percent sign must be written %%
    p.add_argument("--budget-ms", type=_positive_float, default=DEFAULT_BUDGET_MS,
                   help=f"per-image latency budget for --views auto (default {DEFAULT_BUDGET_MS:g}; views may spend "
                        f"{VIEWS_BUDGET_SHARE * 100:.0f}%% of it, the rest is left for reading and decoding the image)")
    p.add_argument("--kernels", choices=list(KERNELS), default="default",
                   help="CPU kernels (diagnosis only: int8 kernels round differently, so near-tie verdicts may change)")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest image (width x height) to decode; larger files are skipped with their reason "
                        f"(default {DEFAULT_MAX_PIXELS}; this board's memory budget, never the model file's)")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--out", help="write results here instead of stdout (the file appears when the run is complete)")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    p.add_argument("--fail-on-review", action="store_true", help="exit 3 when any image is flagged for review")
    p.add_argument("--allow-no-contract", action="store_true",
                   help="run a .tflite that carries no contract, on default settings (printed); such a model was "
                        "not written by `semhinet convert`, or its contract was lost")
    return p.parse_args(argv)


class _NoImagesError(Exception):
    """No image was found: leave --out as it was rather than write an empty result."""


def _choose_views(model: BoardModel, budget_ms: float, err) -> None:
    count, infer_ms = model.auto_views(budget_ms)
    offered = "/".join(map(str, model.offered_views()))
    share = f"{VIEWS_BUDGET_SHARE:.0%} of the {budget_ms:g} ms budget"
    if infer_ms > VIEWS_BUDGET_SHARE * budget_ms:
        print(f"warning: views: auto -> 1 of {offered}; one inference ({infer_ms:.1f} ms, median of 10 here) "
              f"already takes more than {share}", file=err)
    else:
        print(f"views: auto -> {count} of {offered} (one inference {infer_ms:.1f} ms, median of 10 here; "
              f"{count} x {infer_ms:.1f} = {count * infer_ms:.1f} ms within {share})", file=err)


def main(argv=None) -> int:
    args = parse_args(argv)
    err = sys.stderr
    try:
        return _run(args, err)
    except KeyboardInterrupt:
        kept = f"; {args.out} was not written" if args.out else ""
        print(f"interrupted{kept}: run the same command again to classify the images", file=err)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, err) -> int:
    set_max_pixels(args.max_pixels)
    if args.require_delegate and not args.delegate:
        print("error: --require-delegate needs --delegate LIBRARY", file=err)
        return EXIT_USAGE
    if args.out:
        try:  # before the model is loaded: a bad --out must not cost a run
            check_outputs([args.out], args.overwrite, inputs=[*model_inputs(args.model), *args.paths])
        except OSError as exc:
            print(f"error: {exc}", file=err)
            return EXIT_USAGE
    try:
        model = BoardModel(args.model, threads=args.threads, delegate=args.delegate,
                           review_threshold=args.threshold, warn=lambda m: print(m, file=err),
                           kernels=args.kernels, views=1 if args.views == "auto" else args.views,
                           require_delegate=args.require_delegate, allow_no_contract=args.allow_no_contract)
        warm = model.warm_up()
        if args.views == "auto":
            _choose_views(model, args.budget_ms, err)
    except (ValueError, RuntimeError, KeyError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    print(f"model {model.path.name}: {model.input_size}x{model.input_size} {model.input_dtype}, "
          f"{len(model.views)} view(s) per image, "
          f"engine {model.engine}{', delegate ' + args.delegate if model.delegate else ''}; "
          f"warm-up {warm:.1f} ms", file=err)
    # --out is written under a unique temporary name in its folder and renamed when done: a file of that name
    # from before is replaced only by a complete result, and two runs never write into the same temporary file.
    missing: list[Path] = []
    n = bad = 0
    reasons: dict[str, int] = {}
    latencies = []
    t0 = time.perf_counter()
    try:
        with atomic_open(args.out, "w", newline="") if args.out else contextlib.nullcontext(sys.stdout) as out:
            writer = Writer(out, args.format)
            for row in model.classify(args.paths, on_missing=missing.append):
                n += 1
                if "error" in row:
                    bad += 1
                    print(f"skipped {row['path']}: {row['error']}", file=err)
                else:
                    reason = review_reason(row)
                    if reason:
                        reasons[reason] = reasons.get(reason, 0) + 1
                    latencies.append(row["infer_ms"])
                writer.write(row)
            if not n and args.out:
                raise _NoImagesError
    except _NoImagesError:
        pass
    except OSError as exc:
        print(f"error: {args.out or 'stdout'}: cannot write ({exc.strerror or exc})", file=err)
        return EXIT_USAGE
    for p in missing:
        print(f"skipped {p}: no such file or folder", file=err)
    wall = time.perf_counter() - t0
    p50 = f"{np.percentile(latencies, 50):.2f}" if latencies else "-"
    print(f"{n} images in {wall:.1f} s: {n - bad} classified, {review_summary(reasons)}, {bad + len(missing)} "
          f"unreadable; steady inference p50 {p50} ms", file=err)
    if n == 0:
        print("error: no images found in " + ", ".join(args.paths), file=err)
        return EXIT_USAGE
    if bad or missing:
        return EXIT_BAD_IMAGES
    if args.fail_on_review and reasons:
        return EXIT_REVIEW
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
