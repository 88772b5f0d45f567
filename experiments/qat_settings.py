"""What the QAT phase's settings do to the int8 model: rerun only the QAT phase of a finished run.

    python experiments/qat_settings.py RUN --data TRAIN --test TEST [--work qat_settings] [--only 1,2] \
        [--qat-epochs 6] [--out experiments/results/qat_settings.md]

Every variant starts from RUN's float model (copied with its split, configuration and float-phase state into
WORK/NAME), sets its TrainConfig fields, resumes the run (the float phase is skipped, the QAT phase runs), is
converted to int8 and compared with the float model on every image of TEST. The float model is shared and the
QAT phase is deterministic on this CPU, so the differences between rows are the QAT settings' alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from results_file import write_result

VARIANTS: dict[str, dict] = {
    "activation ranges from tfmot's start [-6, 6] (as before 2026-11-30)": {"qat_calibrate": False},
    "ranges started from the float model (default)": {"qat_calibrate": True},
    "QAT peak rate 3e-5 (a tenth of the float phase's 3e-4, as --qat-lr-factor 0.1 gave before 2026-11-30)":
        {"qat_calibrate": True, "qat_lr": 3e-5},
    "QAT peak rate 3e-4": {"qat_calibrate": True, "qat_lr": 3e-4},
    "12 QAT epochs instead of 6": {"qat_calibrate": True, "qat_epochs": 12},
    "QAT rate 0: weights frozen, only ranges and BatchNorm statistics move": {"qat_calibrate": True, "qat_lr": 0.0},
    "BatchNorm statistics frozen at the float model's": {"qat_calibrate": True, "qat_freeze_bn": True},
    "BatchNorm statistics frozen and QAT rate 0: only the activation ranges move":
        {"qat_calibrate": True, "qat_freeze_bn": True, "qat_lr": 0.0},
}
FLOAT_FILES = ("float.keras", "config.json", "taxonomy.json", "split.json", "manifest.csv", "manifest.json",
               "skipped.csv")


def float_phase_copy(run: Path, dest: Path, settings: dict) -> None:
    """RUN's float phase in `dest`, with `settings` written into its configuration and no QAT state."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in FLOAT_FILES:
        if (run / name).exists():
            shutil.copy2(run / name, dest / name)
    shutil.copytree(run / "checkpoint" / "float", dest / "checkpoint" / "float")
    config = json.loads((run / "config.json").read_text())
    config["train"].update(settings)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    state = json.loads((run / "train_state.json").read_text())
    (dest / "train_state.json").write_text(json.dumps({"float": state["float"]}))
    with open(run / "history.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("phase") == "float"]
    with open(dest / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, required=True, help="the run's training data")
    p.add_argument("--test", type=Path, required=True, help="evaluate on every image of this folder")
    p.add_argument("--work", type=Path, default=Path("qat_settings"))
    p.add_argument("--out", type=Path, default=Path("experiments/results/qat_settings.md"))
    p.add_argument("--only", default=None, help="comma-separated positions in VARIANTS, from 0 (default: all)")
    p.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default: the run's own; needed for a "
                   "run trained with --qat-epochs 0)")
    args = p.parse_args()

    from semhinet_tf.export.convert import convert_run
    from semhinet_tf.train import TrainConfig, train
    from semhinet_tf.workflow import compare_run

    saved = TrainConfig.from_dict(json.loads((args.run / "config.json").read_text())["train"])
    if args.qat_epochs is not None:
        saved = replace(saved, qat_epochs=args.qat_epochs)
    lines = [f"QAT phase only, from the float model of `{args.run}`; test data `{args.test}` (every image). "
             f"{saved.qat_epochs} QAT epochs at {saved.qat_lr:g} peak rate, "
             f"{saved.img_size} px; Δ in points of leaf accuracy against the float model.", "",
             "| QAT setting | float leaf acc | QAT Keras (Δ) | int8 .tflite (Δ) | int8 verdicts equal to float's | "
             "QAT min |", "|---|---|---|---|---|---|"]
    chosen = None if args.only is None else {int(i) for i in args.only.split(",")}
    for i, (name, settings) in enumerate(VARIANTS.items()):
        if chosen is not None and i not in chosen:
            continue
        dest = args.work / f"variant{i}"
        float_phase_copy(args.run, dest, settings)
        t = time.time()
        qat_epochs = settings.get("qat_epochs", saved.qat_epochs)  # resume takes the epochs from its arguments
        train(args.data, dest, TrainConfig(epochs=saved.epochs, qat_epochs=qat_epochs), resume=True, progress=False)
        minutes = (time.time() - t) / 60
        convert_run(dest, dest / "model_int8.tflite", overwrite=True, progress=False)
        result = compare_run(dest, args.test, split="all", progress=False)["compare"]
        models = {m["model"]: m for m in result["models"]}
        ref, qat, int8 = models["float.keras"], models["qat.h5"], models["model_int8.tflite"]
        lines.append(f"| {name} | {ref['leaf_accuracy']:.4f} | {qat['leaf_accuracy']:.4f} "
                     f"({qat['leaf_delta_points']:+.2f}) | {int8['leaf_accuracy']:.4f} "
                     f"({int8['leaf_delta_points']:+.2f}) | {int8['leaf_agreement']:.2%} | {minutes:.1f} |")
    write_result(lines, args.out)


if __name__ == "__main__":
    main()
