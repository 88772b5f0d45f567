"""What the on-disk frame cache saves (issue 23, point 7): decode time on a second run, and peak memory of
training on a large synthetic set against the in-memory array of an earlier checkout.

    python experiments/frame_cache.py decode DATA --work DIR
        decoding DATA's frames in memory (no cache), into an empty cache (first run) and from it (second run)
    python experiments/frame_cache.py train DATA --work DIR --before /work/main [-- extra train options]
        `semhinet train` with the code at --before (in-memory frames) and with this checkout's cache, cold then
        warm; peak RSS of each process (wait4's ru_maxrss) and the peaks of its anonymous and file-backed pages
        (sampled from /proc every 0.2 s: file-backed pages of a memory map are page cache the kernel can drop)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_OPTIONS = ["--img-size", "160", "--epochs", "1", "--steps-per-epoch", "20", "--qat-epochs", "0",
                 "--weights", "none", "--val-split", "0.005", "--batch-size", "32"]


def decode(args) -> list[str]:
    """Seconds to get the frames of DATA: decoded in memory, first cached run, second cached run."""
    from semhinet_tf.data.cache import FrameCache
    from semhinet_tf.data.decode import Preprocess
    from semhinet_tf.data.discover import discover
    from semhinet_tf.data.pipeline import decode_frames
    from semhinet_tf.taxonomy import Taxonomy

    pre = Preprocess(size=args.img_size)
    t = time.perf_counter()
    manifest = discover(args.data, Taxonomy.default(), check_images=False, pre=pre, progress=False)
    t_discover = time.perf_counter() - t
    files = [str(manifest.file(e.path)) for e in manifest.entries]
    digests = [e.sha256 for e in manifest.entries]
    cache = FrameCache(Path(args.work) / "cache")
    rows = []
    t = time.perf_counter()
    reference, _ = decode_frames(files, pre, progress=False)
    rows.append(("in memory, no cache (today)", time.perf_counter() - t))
    for name in ("cache, first run (decode + write)", "cache, second run (open + CRC check)"):
        t = time.perf_counter()
        frames, _ = cache.frames(files, digests, pre, progress=False)
        rows.append((name, time.perf_counter() - t))
        assert (frames == reference).all(), "cached frames differ from the decoder's"
    size = sum(f.stat().st_size for f in (Path(args.work) / "cache").rglob("frames.npy"))
    lines = [f"## Decode time, {len(files)} frames at {args.img_size} px ({args.data})", "",
             f"Discovery (headers + sha256, the same in every run): {t_discover:.1f} s. "
             f"Cache on disk: {size / 1e6:.0f} MB.", "",
             "| frames from | seconds | frames/s |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.2f} | {len(files) / s:,.0f} |" for name, s in rows]
    lines += ["", f"Second run saves {rows[0][1] - rows[2][1]:.1f} s of {rows[0][1]:.1f} s "
              f"({rows[0][1] / rows[2][1]:.0f}x faster); the cached frames are bit-identical to the decoder's."]
    return lines


def _peak_memory(cmd: list[str], env: dict, log: Path, cwd: Path) -> dict:
    """Run `cmd` in `cwd` (`python -m` puts the working folder first on sys.path, before PYTHONPATH: run it where
    no checkout is); its wall time, ru_maxrss and the sampled peaks of RssAnon and RssFile (MB)."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                try:
                    status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                except OSError:
                    return
                for line in status:
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return {"seconds": time.perf_counter() - t, "maxrss": usage.ru_maxrss / 1024,
            "anon": peaks["RssAnon"] / 1024, "file": peaks["RssFile"] / 1024}


def train(args) -> list[str]:
    """Peak memory of `semhinet train` on DATA: the --before checkout's in-memory frames vs the cache."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    options = [*TRAIN_OPTIONS, *args.extra]
    runs = [("in-memory array (" + str(args.before) + ")", args.before, ["--no-cache"] if args.before == ROOT else []),
            ("memory-mapped cache, first run", ROOT, ["--cache-dir", str(work / "cache")]),
            ("memory-mapped cache, second run", ROOT, ["--cache-dir", str(work / "cache")])]
    rows = []
    for i, (name, code, extra) in enumerate(runs):
        # the old checkout must not write a cache into the user's home either
        env = {**os.environ, "PYTHONPATH": str(code), "SEMHINET_QUIET": "1",
               "SEMHINET_CACHE": str(work / "default-cache")}
        cmd = [sys.executable, "-m", "semhinet_tf", "train", str(args.data), "--out", str(work / f"run{i}"),
               "--overwrite", *options, *extra]
        print(f"{name}: {' '.join(cmd)}", flush=True)
        rows.append((name, _peak_memory(cmd, env, work / f"run{i}.log", cwd=work)))
    n = sum(1 for _ in Path(args.data).rglob("*.png"))
    lines = [f"## Peak memory, `semhinet train` on {n:,} frames at 160 px ({args.data})", "",
             f"Options: `{' '.join(options)}`", "",
             "| frames from | wall s | peak RSS MB | peak anonymous MB | peak file-backed MB |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['seconds']:.0f} | {r['maxrss']:,.0f} | {r['anon']:,.0f} | {r['file']:,.0f} |"
              for name, r in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("data", type=Path)
    d.add_argument("--work", type=Path, required=True)
    d.add_argument("--img-size", type=int, default=160)
    t = sub.add_parser("train")
    t.add_argument("data", type=Path)
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--before", type=Path, default=ROOT, help="checkout whose train keeps frames in memory")
    t.add_argument("extra", nargs="*", help="more train options (after --)")
    for p in (d, t):
        p.add_argument("--out", type=Path, required=True, help="Markdown file for the table")
    args = parser.parse_args()
    write_result(decode(args) if args.what == "decode" else train(args), args.out)


if __name__ == "__main__":
    main()
