"""The `semhinet` command line: thin wrappers that parse options, call the modules, and print.

Every failure a user can cause (missing folder, bad model file, empty class ...) ends as one line
`error: ...` and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import click

from semhinet_tf import __version__
from semhinet_tf.artifacts.contract import ModelRefusedError
from semhinet_tf.artifacts.files import check_outputs
from semhinet_tf.artifacts.run import TRAIN_RESULT, model_inputs
from semhinet_tf.data.decode import DEFAULT_IMG_SIZE
from semhinet_tf.safe_load import ModelFileError, UnsafeFileError, set_trust_model_code

# Exit codes, as the board's: 1 the work failed (or some images could not be read); 2 refused before any work
# (usage, an output that would be clobbered, a model that may not be loaded: damaged, modified, malformed or
# missing contract, code in it); 3 verdicts flagged for review with --fail-on-review; 130 interrupted (Ctrl-C).
EXIT_FAIL, EXIT_REFUSED, EXIT_REVIEW, EXIT_INTERRUPTED = 1, 2, 3, 130


class UserError(click.ClickException):
    exit_code = EXIT_FAIL

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


class RefusedError(UserError):
    exit_code = EXIT_REFUSED


class Interrupted(click.ClickException):
    exit_code = EXIT_INTERRUPTED

    def show(self, file=None):
        click.echo(f"interrupted: {self.message}", err=True)


# What to do after Ctrl-C, by command; the default fits a command that left nothing half-written.
INTERRUPT_HINTS = {
    "train": "continue the run with the same command and --resume (a train --from: again with --overwrite)",
    "quickstart": "start it again with --overwrite",
    "predict": "the lines printed so far are complete verdicts; run again to classify the rest",
    "synth": "nothing half-written was left; run it again with --overwrite",
}


def friendly(fn):
    """Turn the exceptions a user can cause into one-line errors; Ctrl-C into one line and exit 130."""
    from semhinet_tf.artifacts.files import OutputError
    from semhinet_tf.artifacts.run import RunDirError
    from semhinet_tf.review import ReviewInputError
    from semhinet_tf.taxonomy import TaxonomyError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (OutputError, RunDirError, ModelRefusedError, ModelFileError, UnsafeFileError, ReviewInputError,
                TaxonomyError) as exc:
            raise RefusedError(_one_line(exc)) from exc
        except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, KeyError, OSError) as exc:
            raise UserError(_one_line(exc)) from exc
        except KeyboardInterrupt:
            hint = INTERRUPT_HINTS.get(fn.__name__, "outputs are written whole or not at all; run the command again")
            raise Interrupted(hint) from None

    return wrapper


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return _one_line_text(text)


def _one_line_text(text: str) -> str:
    return " ".join(text.split())[:500]


def _loss_weights(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise click.BadParameter(f"expected head=weight pairs like h1=1,h3=2, got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise click.BadParameter(f"weight for {name} is not a number: {value!r}") from exc
    return out


def _augment(base, spec: str | None):
    """Apply 'name=value,...' overrides to an Augment (booleans as 0/1)."""
    import dataclasses

    if not spec:
        return base
    fields = {f.name: f.type for f in dataclasses.fields(base)}
    changes = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise click.BadParameter(f"unknown augmentation {name!r} (known: {', '.join(fields)})")
        try:
            changes[name] = bool(int(value)) if isinstance(getattr(base, name), bool) else float(value)
        except ValueError as exc:
            raise click.BadParameter(f"{name}: not a number: {value!r}") from exc
    return dataclasses.replace(base, **changes)


def _check_weights(weights: str) -> None:
    """--weights PATH must exist before anything is written (the manifest and split come first otherwise)."""
    if weights not in ("none", "sem", "imagenet") and not Path(weights).is_file():
        raise click.BadParameter(f"{weights}: no such file (expected none, sem, imagenet or a weights file)",
                                 param_hint="--weights")


def _train_summary(result: dict) -> str:
    """The few figures a person reads after training; the rest is in train_result.json."""
    rows = [("float phase", f"{result.get('float_seconds', 0) / 60:.1f} min"),
            ("float validation leaf accuracy", f"{result['float_val']['val_leaf_acc']:.3f}")]
    if "qat_val" in result:
        rows += [("QAT phase", f"{result.get('qat_seconds', 0) / 60:.1f} min"),
                 ("QAT validation leaf accuracy", f"{result['qat_val']['val_leaf_acc']:.3f}")]
    threshold = result.get("review_threshold", {}).get("threshold")
    if threshold is not None:
        rows.append(("review threshold (99% purity on validation)", f"{threshold:.3f}"))
    rows.append(("total", f"{result.get('seconds', 0) / 60:.1f} min"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fine_tune_time(result: dict, from_run: Path) -> str:
    """The fine-tuning's wall time next to the full training it started from (issue 24: print both)."""
    full = result.get("from_run_seconds")
    mine = result.get("seconds", 0)
    if not full:
        return f"fine-tuning took {mine / 60:.1f} min ({from_run} recorded no training time to compare with)"
    return (f"fine-tuning took {mine / 60:.1f} min; the full training of {from_run} took {full / 60:.1f} min "
            f"({100 * mine / full:.0f}% of it)")


def _given_options(ctx: click.Context, names) -> set[str]:
    """The options the user typed (not defaults): what a --resume checks against the run being continued."""
    return {n for n in names if ctx.get_parameter_source(n) not in (click.core.ParameterSource.DEFAULT,
                                                                   click.core.ParameterSource.DEFAULT_MAP)}


# Test-time views (semhinet_tf.data.views), shared by eval, compare and predict.
views_option = click.option(
    "--views", type=click.Choice(["1", "2", "4", "8"]), default="1", show_default=True,
    help="test-time views: score each image as this many flips/rotations of itself and average "
         "(one inference each; only those the training augmentation covered)")
# A .tflite without a contract is refused unless asked for (shared by eval, compare, predict and bench).
no_contract_option = click.option(
    "--allow-no-contract", is_flag=True,
    help="run a .tflite that carries no contract, on default settings (printed on stderr)")


overwrite_option = click.option(
    "--overwrite", is_flag=True, help="replace output files that exist (without it, a command refuses before any work)")


# `semhinet --help` lists the commands in the order of the work, not alphabetically.
WORKFLOW_ORDER = ("synth", "train", "eval", "convert", "compare", "predict", "review", "promote", "export-onnx",
                  "npu-check", "bench", "quickstart")


class WorkflowGroup(click.Group):
    """Commands in workflow order, and every error click itself finds (a bad option value, a missing argument)
    in the same one-line style as ours: `error: ...`, exit 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return [n for n in WORKFLOW_ORDER if n in names] + [n for n in names if n not in WORKFLOW_ORDER]

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            if isinstance(exc, (UserError, Interrupted)):
                exc.show()
            else:  # click's own: a usage error names the option; the command's --help says the rest
                where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
                click.echo(f"error: {_one_line_text(exc.format_message())}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=WorkflowGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="semhinet")
@click.option("--verbose", is_flag=True,
              help="show TensorFlow's own C++ log lines (kept off the terminal by default)")
@click.option("--trust-model-code", is_flag=True,
              help="load .keras/.h5 models holding Lambda or custom layers, whose Python code runs on load "
                   "(refused otherwise); only for models you wrote")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="largest image (width x height) any command decodes; larger files are skipped with their "
                   "reason [default: 100000000]. This machine's memory budget: model files never set it")
def main(verbose: bool, trust_model_code: bool, max_pixels: int | None) -> None:
    """SEM-HiNet-TF: train a hierarchical SEM defect classifier and deploy it as int8 TFLite.

    The usual order: synth (or your own folders) -> train -> eval -> convert -> compare -> predict."""
    if verbose:
        import os

        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        from semhinet_tf.console import quiet_native_logs

        quiet_native_logs()
    set_trust_model_code(trust_model_code)  # every command loads models through semhinet_tf.model.io
    if trust_model_code:
        click.echo("warning: --trust-model-code: model files may run their own Python code as they load", err=True)
    if max_pixels is not None:
        from semhinet_tf.data.decode import set_max_pixels

        set_max_pixels(max_pixels)


# ---------------------------------------------------------------- synth
@main.command()
@click.argument("out_arg", metavar="[OUT]", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder to write (the class folders and dataset.json); OUT as an argument is the same")
@click.option("--per-class", default=150, show_default=True, type=click.IntRange(min=1), help="images per class")
@click.option("--img-size", "--size", "size", default=256, show_default=True, type=click.IntRange(min=32),
              help="side of the square frames written, in pixels (the model's input size is train's --img-size)")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="fixes every frame: the same seed and options write the same files")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="processes (default: all cores)")
@click.option("--mixed-formats", is_flag=True, help="write PNG/JPEG/BMP/TIFF 8+16-bit, RGB, info bars, nested folders")
@click.option("--overwrite", is_flag=True, help="write into a non-empty folder")
@click.option("--labels", type=click.Choice(["visible", "cause"]), default="visible", show_default=True,
              help="label rule: `visible` redraws a defect an expert could not see at the model's input size "
                   "(against its defect-free twin and normal frames of the same imaging); `cause` labels every "
                   "draw, the generator before 1.1 frame for frame (a stress set: report it separately)")
@click.option("--visibility-size", default=DEFAULT_IMG_SIZE, show_default=True, type=click.IntRange(min=16),
              help="the model's input side at which --labels visible judges visibility (train's --img-size)")
@friendly
def synth(out_arg, out, per_class, size, seed, workers, mixed_formats, overwrite, labels, visibility_size):
    """Write a synthetic SEM dataset (8 class folders) to --out."""
    from semhinet_tf.data.synth import generate

    if (out_arg is None) == (out is None):
        raise click.UsageError("give the folder to write once: --out OUT (or OUT)")
    out = out or out_arg
    stats = generate(out, per_class=per_class, size=size, seed=seed, workers=workers,
                     mixed_formats=mixed_formats, overwrite=overwrite, labels=labels,
                     visibility_size=visibility_size)
    click.echo(f"wrote {stats.get('total', per_class * 8)} images to {out} "
               f"({stats.get('images_per_second', 0):.0f} images/s)")
    summary = stats.get("labels_summary") or {}
    if summary:
        key, what = ("redrawn", "redrawn") if labels == "visible" else ("below_rule", "below the visibility rule")
        click.echo(f"labels {labels}: defect frames {what}: "
                   + ", ".join(f"{leaf} {100 * row[key]:.0f}%" for leaf, row in summary.items()))
        below = {leaf: row["below_rule"] for leaf, row in summary.items() if row["below_rule"] > 0}
        if labels == "visible" and below:
            click.echo("warning: no visible draw was found for some defect frames, written below the rule all the "
                       "same (dataset.json marks them, visibility < 1): "
                       + ", ".join(f"{leaf} {100 * share:.0f}%" for leaf, share in below.items())
                       + f"; at {size} px the defects are too small for the model's input to show them: use a "
                         "larger --size for a set whose every defect can be seen", err=True)


# ---------------------------------------------------------------- train
@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="run directory to create")
@click.option("--img-size", default=DEFAULT_IMG_SIZE, show_default=True, type=click.IntRange(min=32),
              help="the model's input size: frames are decoded and resized to this square")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1), help="float epochs")
@click.option("--qat-epochs", default=6, show_default=True, type=click.IntRange(min=0),
              help="quantization-aware epochs (0: none)")
@click.option("--qat-lr", default=1e-4, show_default=True, type=click.FloatRange(0.0, min_open=True),
              help="QAT peak learning rate")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="images per training step")
@click.option("--steps-per-epoch", default=None, type=click.IntRange(min=1),
              help="default: one pass over the training split")
@click.option("--lr", default=None, type=click.FloatRange(0.0, min_open=True),
              help="peak learning rate (AdamW); default 3e-4 from pretrained weights, 1e-3 from scratch")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="fixes split, sampling and initialisation")
@click.option("--val-split", default=0.2, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="share of each class held out for validation (stratified, duplicates kept together; saved)")
@click.option("--patience", default=10, show_default=True, type=click.IntRange(min=1),
              help="stop a phase after this many epochs without a better validation score (a run from scratch "
                   "can sit at chance for longer than 10 epochs: raise it there)")
@click.option("--weight-average", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="float phase: validate and keep an exponential moving average of the weights, decay per step "
                   "at most this (it ramps up as (1+t)/(10+t) over the first steps); e.g. 0.99; 0: off")
@click.option("--weights", default="sem", show_default=True, help="none | sem | imagenet | PATH")
@click.option("--loss-weights", default=None, help="e.g. h1=1,h2=1,h3=2,h4=2,h5=2")
@click.option("--label-smoothing", default=0.05, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="share of each head's target spread over its other classes")
@click.option("--sampler", type=click.Choice(["balanced", "natural"]), default="balanced", show_default=True,
              help="balanced: every class drawn equally often; natural: as often as it occurs in the data")
@click.option("--no-augment", is_flag=True, help="switch all augmentations off")
@click.option("--augment", "augment_spec", default=None,
              help="override augmentations, e.g. flip=1,rot90=1,shift=0.05,zoom=0.1,brightness=0.1,"
                   "contrast=0.2,gamma=0.2,noise=0.02,blur=0.2")
@click.option("--alpha", default=1.0, show_default=True, type=click.FloatRange(0.0, min_open=True),
              help="width multiplier")
@click.option("--minimalistic", is_flag=True, help="MobileNetV3 minimalistic (no SE, ReLU, 3x3)")
@click.option("--bn-momentum", default=None, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="default: from the training length")
@click.option("--flat", is_flag=True, help="baseline: one 8-way softmax over the leaves instead of the five heads")
@click.option("--balance-heads/--no-balance-heads", default=True, show_default=True,
              help="weight each head's classes equally (the gatekeeper's normal counts as much as all defects)")
@click.option("--head-loss", type=click.Choice(["masked-mean", "joint"]), default="masked-mean", show_default=True,
              help="masked-mean: each head's loss averaged over the images it applies to, with --loss-weights and "
                   "class weights for --balance-heads; joint: -log P(leaf) of the heads' product (the flat "
                   "softmax's objective), --balance-heads by logit adjustment instead of class weights")
@click.option("--granularity", type=click.Choice(["per-channel", "per-tensor"]), default="per-channel",
              show_default=True, help="QAT weight quantization")
@click.option("--databar", default="auto", show_default=True, help="info-bar removal: auto | off | N rows")
@click.option("--fit", type=click.Choice(["crop", "pad"]), default="crop", show_default=True,
              help="non-square frames: centre crop or pad")
@click.option("--taxonomy", "taxonomy_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML/JSON taxonomy (default: the 8-class SEM hierarchy)")
@click.option("--strict", is_flag=True, help="unknown folders are an error")
@click.option("--strategy", type=click.Choice(["auto", "default", "mirrored", "multiworker"]), default="auto",
              show_default=True, help="tf.distribute strategy")
@click.option("--resume", is_flag=True, help="continue an interrupted run in --out")
@click.option("--overwrite", is_flag=True,
              help="replace an existing run directory (only one this project made; never an input's folder)")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where decoded frames are cached (default $SEMHINET_CACHE, else $XDG_CACHE_HOME/semhinet, "
                   "else ~/.cache/semhinet)")
@click.option("--no-cache", is_flag=True, help="decode into memory and leave the frame cache alone")
@click.option("--from", "from_run", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="fine-tune this run's float weights on its own split of DATA (its validation frames stay held "
                   "out), for a third of its epochs unless --epochs/--qat-epochs say; architecture options are its")
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="with --from: the reviewer's answers (REVIEW/labels.jsonl); reviewed frames join training, a "
                   "reviewed label overrides a training frame's folder, held-out frames stay held out")
@friendly
def train(data, run_dir, taxonomy_file, strict, resume, overwrite, no_augment, augment_spec, loss_weights,
          cache_dir, no_cache, from_run, labels_file, **opts):
    """Train the five-head model on DATA (class folders), then fine-tune it with QAT.

    With --from RUN [--labels REVIEW/labels.jsonl]: fine-tune RUN with the reviewed frames added (the loop
    after `semhinet review`); then `convert` and `promote` the new run over RUN."""
    from semhinet_tf.data.pipeline import Augment
    from semhinet_tf.taxonomy import load_taxonomy
    from semhinet_tf.train import TrainConfig
    from semhinet_tf.train import train as run_train

    taxonomy = load_taxonomy(taxonomy_file)
    if labels_file is not None and from_run is None:
        raise click.UsageError("--labels adds reviewed frames to a run being fine-tuned: give --from RUN as well")
    if from_run is not None and resume:
        raise click.UsageError("--resume continues a run as it is and --from starts one from another: give one")
    if opts["head_loss"] == "joint" and loss_weights:
        raise click.UsageError("--head-loss joint weighs every head 1 (it is -log P(leaf)); drop --loss-weights")
    if resume and overwrite:
        raise click.UsageError("--resume continues a run and --overwrite replaces it: give one of them")
    cfg = TrainConfig(**opts, loss_weights=_loss_weights(loss_weights),
                      augment=_augment(Augment.off() if no_augment else Augment(), augment_spec).to_dict())
    taxonomy.loss_weights(cfg.loss_weights)  # validates head names early
    _check_weights(opts["weights"])
    given = _given_options(click.get_current_context(), opts)
    given |= {"augment"} if no_augment or augment_spec else set()
    given |= {"loss_weights"} if loss_weights else set()
    if cache_dir is not None and no_cache:
        raise click.UsageError("--cache-dir names the frame cache and --no-cache switches it off: give one of them")
    source = None
    if from_run is not None:
        from semhinet_tf.training.from_run import SourceRun, fine_tune_config

        if "weights" in given:
            raise click.UsageError("--from starts from that run's float weights: drop --weights")
        source = SourceRun.load(from_run)
        if Path(source.split["root"]).resolve() != Path(data).resolve():
            raise RefusedError(f"{from_run} was trained on {source.split['root']}, not {data}: --from keeps the run's "
                               f"validation frames, which live in its own data folder")
        cfg = fine_tune_config(source, cfg, given, taxonomy if taxonomy_file else None)
        taxonomy = source.taxonomy
        if labels_file is not None:  # a bad answer stops here, before the new run directory is made
            from semhinet_tf.training.from_run import LabelsError, read_answers

            try:
                read_answers(labels_file, taxonomy)
            except LabelsError as exc:
                raise RefusedError(_one_line(exc)) from exc
    result = run_train(data, run_dir, cfg, taxonomy if taxonomy_file or not resume or source else None,
                       overwrite=overwrite, resume=resume, strict=strict, given=given,
                       inputs=[taxonomy_file] if taxonomy_file else [], cache_dir=cache_dir, use_cache=not no_cache,
                       source=source, labels=labels_file)
    click.echo(_train_summary(result))
    if source is not None:
        click.echo(_fine_tune_time(result, source.dir))
    click.echo(f"run directory: {run_dir} (all figures: {Path(run_dir) / TRAIN_RESULT})")


# ---------------------------------------------------------------- convert
@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="default: RUN/model_int8.tflite")
@click.option("--io", "io_type", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="the model's input type: uint8 takes the image's pixels as they are")
@click.option("--calib-samples", default=200, show_default=True, type=click.IntRange(min=1),
              help="class-balanced calibration frames")
@click.option("--source", type=click.Choice(["qat", "float"]), default="qat", show_default=True,
              help="qat: the QAT model; float: post-training quantization of the float model")
@click.option("--granularity", type=click.Choice(["per-channel", "per-tensor"]), default=None,
              help="weight quantization (default: as trained for qat, per-channel for float)")
@click.option("--review-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="leaf probability under which predictions are flagged (default: from validation)")
@click.option("--float-heads", is_flag=True,
              help="int8 backbone for the NPU, heads in float on the CPU (default out: "
                   "RUN/model_int8_float_heads.tflite)")
@click.option("--ready-min-frames", default=30, show_default=True, type=click.IntRange(min=0),
              help="validation frames a class needs to be listed as ready for automatic classification (the board "
                   "sends every verdict of a class not listed to review)")
@click.option("--ood/--no-ood", default=True, show_default=True,
              help="add the unfamiliar-frame score (output `ood`): frames unlike every class the model was trained "
                   "on go to review; its threshold lets 1% of the validation split's normal frames through to review")
@overwrite_option
@friendly
def convert(run_dir, out, io_type, calib_samples, source, granularity, review_threshold, float_heads,
            ready_min_frames, ood, overwrite):
    """Convert a run's model to a full-int8 .tflite for the i.MX 8M Plus NPU (runs npu-check).

    The contract lists the classes ready for automatic classification, judged on the run's validation split."""
    from semhinet_tf.export.convert import convert_run

    info = convert_run(run_dir, out, io_type=io_type, calib_samples=calib_samples,
                       source=source, review_threshold=review_threshold, overwrite=overwrite,
                       granularity=granularity, float_heads=float_heads, ready_min_frames=ready_min_frames, ood=ood)
    click.echo(info["npu_report"])
    ready = info.get("readiness")
    unfamiliar = (ready or {}).get("ood")
    if unfamiliar:
        n, share = unfamiliar["reference_frames"], unfamiliar["false_alarm"]
        click.echo(f"unfamiliar-frame score: frames above {unfamiliar['threshold']:.3g} go to review "
                   f"({share:.0%} of {n} validation normal frames"
                   + (f"; with fewer than {math.ceil(1 / share)} the threshold is their highest score, which about 1 "
                      f"in {n + 1} new normal frames exceeds" if n * share < 1 else "") + ")")
    if ready is not None:
        not_ready = [leaf for leaf, c in ready["classes"].items() if not c["ready"]]
        click.echo(f"ready for automatic classification: {', '.join(ready['ready']) or 'no class'}"
                   + (f"; every verdict of {', '.join(not_ready)} goes to review (see `semhinet eval --report`)"
                      if not_ready else ""))
    click.echo(f"wrote {info['path']} ({info['bytes'] / 1024:.0f} KiB) and {info['contract_path']}")
    if not info["npu_ok"]:  # written for inspection, but a pipeline must not carry it to the board as if it ran there
        raise UserError(f"{info['path']}: fails the NPU check above (would not run fully on the i.MX 8M Plus NPU)")


# ---------------------------------------------------------------- npu-check
@main.command("npu-check")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--allow-float-tail", is_flag=True, help="accept float heads downstream of a DEQUANTIZE (CPU)")
@click.option("--target", type=click.Choice(["imx8mp", "cora-z7"]), default="imx8mp", show_default=True,
              help="imx8mp: the i.MX 8M Plus NPU (VX delegate); cora-z7: the Cora Z7's Cortex-A9 CPU, whose "
                   "tflite_runtime (armv7, VFPv4 build) crashes on any float operator")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the report as JSON to this file")
@overwrite_option
@friendly
def npu_check(model, allow_float_tail, target, json_out, overwrite):
    """Check that every operator of MODEL would run on the VX delegate (i.MX 8M Plus NPU), or on the Cora Z7."""
    from semhinet_tf.evaluate import write_json
    from semhinet_tf.export.npu import check_target

    check_outputs([json_out], overwrite, inputs=model_inputs(model))
    try:
        report = check_target(model, target=target, allow_float_tail=allow_float_tail)
    except ValueError as exc:  # not a .tflite, or a damaged one: exit 2, apart from a model that fails the check
        raise RefusedError(_one_line(exc)) from exc
    click.echo(report.format())
    if json_out:
        write_json(report.to_dict(), json_out)
    sys.exit(0 if report.ok else EXIT_FAIL)


# ---------------------------------------------------------------- export-onnx
@main.command("export-onnx")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="F.onnx")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 18),
              help="ONNX opset: 13 (per-channel QuantizeLinear) to 18 (the newest tf2onnx writes)")
@overwrite_option
@click.option("--tables/--plain-qdq", "tables", default=True, show_default=True,
              help="from a .tflite: --tables (the default) holds int8 activations and weights as uint8 and "
                   "hard-swish / add as tables taken from TFLite, so onnxruntime gives the .tflite's outputs bit "
                   "for bit; --plain-qdq keeps tf2onnx's QDQ graph as written (97-99% of head verdicts the same)")
@friendly
def export_onnx_cmd(model, out, opset, overwrite, tables):
    """Export MODEL (int8 .tflite as QDQ, or a run / .keras float or QAT model) to ONNX, outputs h1..h5."""
    from semhinet_tf.export.onnx import export_onnx

    info = export_onnx(model, out, opset=opset, overwrite=overwrite, tflite_tables=tables)
    click.echo(f"wrote {info['path']} ({info['bytes'] / 1024:.0f} KiB) from {info['source']} ({info['model']}): "
               f"input {info['input']['name']} {info['input']['dtype']}, outputs {', '.join(info['outputs'])}")
    tables = info.get("tables")
    if tables:
        def counts(what: dict) -> str:
            return ", ".join(f"{n} {op}" for op, n in sorted(what.items())) or "none"

        click.echo(f"{tables['uint8_tensors']} int8 activations and {tables['uint8_weights']} weights held as uint8; "
                   f"elementwise operators as TFLite's tables: {counts(tables['tabulated'])} "
                   f"({tables['table_bytes'] / 1024:.0f} KiB); already exact in onnxruntime, kept as QDQ: "
                   f"{counts(tables['exact'])}; left as QDQ: {len(tables['left'])}")
        for where, why in tables["left"].items():
            click.echo(f"  left {where[:100]}: {why}")


# ---------------------------------------------------------------- bench
@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--threads", default="1,2", show_default=True, help="thread counts to time, e.g. 1,2,4")
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1),
              help="timed inferences per thread count (after the warm-up)")
@click.option("--no-backbone", is_flag=True, help="skip the bare-backbone reference")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the figures as JSON to this file")
@no_contract_option
@overwrite_option
@friendly
def bench(model, threads, runs, no_backbone, json_out, allow_no_contract, overwrite):
    """Latency (warm-up, p50/p90/p99), throughput, size and MACs of MODEL.tflite vs its bare backbone."""
    from semhinet_tf.evaluate import write_json
    from semhinet_tf.export.bench import bench as run_bench
    from semhinet_tf.export.bench import format_bench

    try:
        counts = tuple(int(t) for t in threads.split(","))
    except ValueError:
        raise click.BadParameter(f"expected thread counts like 1,2,4, not {threads!r}",
                                 param_hint="--threads") from None
    if min(counts) < 1:
        raise click.BadParameter("thread counts must be 1 or more", param_hint="--threads")
    check_outputs([json_out], overwrite, inputs=model_inputs(model))
    result = run_bench(model, threads=counts, runs=runs, backbone=not no_backbone,
                       allow_no_contract=allow_no_contract)
    click.echo(format_bench(result))
    if json_out:
        write_json(result, json_out)


# ---------------------------------------------------------------- eval
@main.command("eval")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="class folders to score on (the run's saved validation split of them by default)")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default=None,
              help="default: val when the run's split is found, else all less the frames the model's contract "
                   "records as its training frames")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="the run directory MODEL was trained in, when the file lives elsewhere (a deployed copy): its "
                   "saved split decides which frames are held out")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the metrics as JSON to this file (the same keys for every model format)")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write a human report (HTML + Markdown + PNGs) here")
@click.option("--target-purity", default=0.99, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="share of automatic verdicts that must be right: the report's operating point, and what a class's "
                   "own automatic verdicts must reach to be ready")
@click.option("--ready-min-frames", default=30, show_default=True, type=click.IntRange(min=0),
              help="labelled frames a class needs here before it can be ready for automatic classification")
@click.option("--attributes", "attributes", multiple=True, metavar="FILE.csv", type=click.Path(path_type=Path),
              help="CSV of numbers per image (a header; a path column; e.g. the tool's defect size): recall per "
                   "class by tercile of each column. DATA's synth dataset.json (severity, visibility) is read "
                   "without it; this overrides it. Repeatable")
@views_option
@no_contract_option
@overwrite_option
@friendly
def eval_cmd(model, data, split, run_dir, json_out, report_dir, target_purity, ready_min_frames, attributes, views,
             allow_no_contract, overwrite):
    """Evaluate MODEL (run directory, .keras, .tflite or .onnx) on DATA.

    Also says for each class whether it is ready for automatic classification: enough labelled frames, and the
    precision of its verdicts at the model's review threshold at or above --target-purity. With DATA's
    dataset.json or --attributes, also recall per class by tercile of each attribute."""
    from semhinet_tf.attributes import AttributeFileError
    from semhinet_tf.workflow import eval_model

    try:
        res = eval_model(model, data, split=split, run_dir=run_dir, json_out=json_out, report_dir=report_dir,
                         target_purity=target_purity, views=int(views), allow_no_contract=allow_no_contract,
                         overwrite=overwrite, ready_min_frames=ready_min_frames, attributes=attributes)
    except AttributeFileError as exc:  # a wrong file is refused before any inference, like a wrong model
        raise RefusedError(_one_line(exc)) from exc
    click.echo(res["table"])
    if res.get("attributes_table"):
        click.echo("")
        click.echo(res["attributes_table"])
    for line in res["notes"]:
        click.echo(line)


# ---------------------------------------------------------------- compare
@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="class folders to score on (the run's saved validation split of them by default)")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default=None,
              help="default: val when the run's split is found, else all")
@click.option("--max-drop", type=float, default=None,
              help="exit non-zero when int8 leaf accuracy is more than this many points below float")
@click.option("--not-worse", is_flag=True,
              help="exit non-zero when int8 leaf accuracy is significantly worse than float (McNemar's exact "
                   "one-sided test on the same images); with --max-drop, only a drop beyond it that is significant")
@click.option("--alpha", default=0.05, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="significance level of --not-worse")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the comparison as JSON to this file")
@views_option
@no_contract_option
@overwrite_option
@friendly
def compare(run_dir, data, split, max_drop, not_worse, alpha, json_out, views, allow_no_contract, overwrite):
    """Float Keras vs QAT Keras vs int8 TFLite (vs ONNX): per-head deltas, agreement, flipped images."""
    from semhinet_tf.workflow import compare_run

    res = compare_run(run_dir, data, split=split, max_drop=max_drop, json_out=json_out, views=int(views),
                      allow_no_contract=allow_no_contract, overwrite=overwrite, not_worse=not_worse, alpha=alpha)
    click.echo(res["table"])
    for row in res["compare"]["models"]:
        for flip in row["flips"][:10]:
            click.echo(f"  {row['model']}: {flip['path']} {flip['reference']} ({flip['reference_p']:.2f}) -> "
                       f"{flip['this']} ({flip['this_p']:.2f}), truth {flip['truth']}")
    for line in res["notes"]:
        click.echo(line)
    gate = res["compare"]["gate"]
    if gate is not None:
        allowed = [f"allowed -{gate['max_drop']}"] if gate["max_drop"] is not None else []
        if gate["not_worse"]:
            p = gate["worst_int8_p_worse"]
            allowed.append(f"McNemar p(worse)={'-' if p is None else f'{p:.3g}'}, significant below {gate['alpha']}")
        click.echo(f"gate: int8 leaf accuracy {gate['worst_int8_delta_points']:+.2f} points vs float "
                   f"({'; '.join(allowed)}): {'PASS' if gate['passed'] else 'FAIL'}")
        if not gate["passed"]:
            sys.exit(EXIT_FAIL)


# ---------------------------------------------------------------- promote
@main.command()
@click.argument("run_dir", metavar="RUN2", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--over", "over", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the run RUN2 would replace (the current model); its held-out frames are the ones scored")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the data folder --over was trained on (its saved split's validation frames are scored)")
@click.option("--tolerance", default=1.0, show_default=True, type=click.FloatRange(0.0),
              help="points any headline figure (leaf accuracy, gatekeeper recalls, router accuracy, specialist "
                   "precisions; float and int8) may fall before RUN2 is refused")
@click.option("--paired/--no-paired", default=True, show_default=True,
              help="refuse a fall beyond --tolerance only when McNemar's exact one-sided test on the same frames "
                   "also finds it significant (a precision: on its false alarms and its hits, Bonferroni)")
@click.option("--alpha", default=0.05, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="significance level of --paired")
@click.option("--dry-run", is_flag=True, help="score and decide, but write no record and no changelog entry")
@click.option("--overwrite", is_flag=True,
              help="replace a promoted.json that names another run than --over as current")
@friendly
def promote(run_dir, over, data, tolerance, paired, alpha, dry_run, overwrite):
    """Make RUN2 the current model when it is not worse than --over, float and int8, on the same frames.

    Writes promoted.json and appends to CHANGELOG.jsonl / CHANGELOG.md in the folder holding RUN2. Exit codes:
    0 promoted (or would be, with --dry-run); 1 refused, one line per figure that got worse; 2 bad input."""
    from semhinet_tf.promote import promote as run_promote

    res = run_promote(run_dir, over, data, tolerance=tolerance, paired=paired, alpha=alpha, dry_run=dry_run,
                      overwrite=overwrite)
    click.echo(res["table"])
    for line in res["notes"]:
        click.echo(line)
    where = "" if dry_run else f"; changelog: {res['changelog']}"
    if res["passed"]:
        record = "" if dry_run else f" (record: {res['record']})"
        click.echo(f"{'would promote' if dry_run else 'promoted'} {run_dir} over {over}{record}{where}")
        return
    click.echo(f"refused: {run_dir} is worse than {over}{where}", err=True)
    for line in res["failures"]:
        click.echo(f"  {line}", err=True)
    sys.exit(EXIT_FAIL)


# ---------------------------------------------------------------- predict
@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--review-threshold", "--threshold", "threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="leaf probability under which a verdict is flagged for review (default: the model's)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for inference")
@views_option
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="one JSON line or one CSV row per image (the board's columns)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the verdicts to this file (it appears when all are written) instead of stdout")
@overwrite_option
@no_contract_option
@click.option("--fail-on-review", is_flag=True, help="exit 3 when any image is flagged for review")
@friendly
def predict(model, paths, threshold, threads, views, fmt, out, overwrite, allow_no_contract, fail_on_review):
    """Classify images or folders: one verdict per image, as the board gives it.

    Exit codes: 0 all classified; 1 some files could not be read (listed); 2 refused (bad model, options or
    --out); 3 some verdicts flagged for review and --fail-on-review given; 130 interrupted."""
    import contextlib
    from collections import Counter

    from semhinet_tf.artifacts.files import atomic_open
    from semhinet_tf.board.output import Writer, review_reason, review_summary
    from semhinet_tf.workflow import predict_paths

    check_outputs([out], overwrite, inputs=[*model_inputs(model), *paths])
    n_bad = n_rows = 0
    reasons: Counter = Counter()
    with atomic_open(out, "w", newline="") if out else contextlib.nullcontext(sys.stdout) as stream:
        writer = Writer(stream, fmt)
        for row in predict_paths(model, paths, threshold=threshold, threads=threads, views=int(views),
                                 allow_no_contract=allow_no_contract):
            n_bad += "error" in row
            reasons[review_reason(row)] += 1
            n_rows += 1
            writer.write(row)
        if not n_rows:  # as the board: a usage error (exit 2), not files that could not be read (exit 1)
            raise RefusedError("no images found in " + ", ".join(map(str, paths)))
    reasons.pop(None, None)
    n_review = sum(reasons.values())
    if out:
        click.echo(f"{n_rows} verdicts written to {out}: {n_rows - n_bad} classified, {review_summary(reasons)}, "
                   f"{n_bad} unreadable", err=True)
    if n_bad:
        click.echo(f"{n_bad} file(s) could not be read (see the 'error' {'lines' if fmt == 'jsonl' else 'column'})",
                   err=True)
        sys.exit(EXIT_FAIL)
    if fail_on_review and n_review:
        sys.exit(EXIT_REVIEW)


# ---------------------------------------------------------------- review
@main.group(cls=click.Group)
def review() -> None:
    """The review loop: queue the frames a person should look at, then label them in a local web page.

    review queue MODEL IMAGES --out REVIEW, then review serve REVIEW; the answers land in REVIEW/labels.jsonl."""


@review.command("queue")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("images", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="review folder to write (queue.jsonl, review.json); the frames themselves are only referenced")
@click.option("--audit", default=0.02, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="share of the confident verdicts sampled at random, to estimate the error rate of what is "
                   "classified automatically")
@click.option("--boundary", default=10, show_default=True, type=click.IntRange(min=0),
              help="frames per head nearest its decision boundary (smallest margin between its top two classes)")
@click.option("--max", "max_items", type=click.IntRange(min=1), default=None,
              help="budget: at most this many frames (the audit sample first, at most a quarter of them; then "
                   "unfamiliar frames, at most another quarter; then those under review, least probable first; "
                   "then boundary ones)")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="fixes the audit sample: the same seed and verdicts give the same queue")
@click.option("--suspects", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="also queue labelled frames of this data set (class folders) whose folder label the model "
                   "disputes (confident learning, cleanlab); on the run's own folder its training frames are "
                   "judged out of fold (a linear probe on the model's features)")
@views_option
@no_contract_option
@overwrite_option
@friendly
def review_queue(model, images, out, audit, boundary, max_items, seed, suspects, views, allow_no_contract,
                 overwrite):
    """Queue the frames of IMAGES (a folder, or predict's JSON lines) a person should label, with the reason why.

    MODEL is any model `predict` takes. Selected: every frame under the review threshold, the frames nearest a
    decision boundary of each head, and a random audit sample of confident verdicts."""
    from semhinet_tf.review.queue import AUDIT_BUDGET_SHARE, build_queue

    info = build_queue(model, images, out, audit=audit, boundary=boundary, max_items=max_items, seed=seed,
                       views=int(views), allow_no_contract=allow_no_contract, overwrite=overwrite, suspects=suspects)
    new_queued = info["n_queued"] - info["n_suspects"]  # suspects are frames of --suspects DATA, not of IMAGES
    click.echo(f"{info['n_queued']} frames queued in {out}: {new_queued} of {info['n_frames']} new frames, "
               f"{info['n_review']} under the review threshold {info['review_threshold']:.3f}, "
               + (f"{info['n_not_ready']} of classes not ready, " if info["n_not_ready"] else "")
               + (f"{info['n_unfamiliar']} unfamiliar, " if info.get("n_unfamiliar") else "")
               + f"{info['n_audit']} audit of {info['n_confident']} "
               f"confident verdicts"
               + (f" ({info['audit_asked']} asked; a budget gives the audit at most {AUDIT_BUDGET_SHARE:.0%} of it)"
                  if info["audit_asked"] > info["n_audit"] else "")
               + ", the rest nearest a head's boundary"
               + (f"; {info['dropped_by_budget']} left out by --max" if info["dropped_by_budget"] else "")
               + (f"; {info['unreadable']} unreadable" if info["unreadable"] else "")
               + (f"; and {info['n_suspects']} suspect labels of {suspects} ({info['suspects_split']} frames)"
                  if suspects else ""))
    for line in info["notes"]:
        click.echo(line, err=True)
    for line in info["missing"][:5]:
        click.echo(f"warning: not queued, cannot be read now: {line}", err=True)
    click.echo(f"next: semhinet review serve {out}")


@review.command("serve")
@click.argument("review_dir", metavar="REVIEW", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="port to listen on (0: any free port; the URL printed says which)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; anything but 127.0.0.1/localhost needs --allow-remote")
@click.option("--allow-remote", is_flag=True,
              help="let --host be an address other machines reach (anyone with the printed URL can label)")
@click.option("--reviewer", default=None, help="your name, recorded with each answer in labels.jsonl")
@friendly
def review_serve(review_dir, port, host, allow_remote, reviewer):
    """Label the queued frames of REVIEW in a local web page, by keyboard; answers go to REVIEW/labels.jsonl.

    Open the printed URL (it carries the session's token). A leaf's key labels the frame, Enter accepts the
    model's verdict, s skips, u undoes, the arrows move; every answer is on disk at once. Ctrl-C stops."""
    from semhinet_tf.review.server import serve

    def announce(url: str, status: str) -> None:
        click.echo(f"review page: {url}")
        click.echo(f"{status}; Ctrl-C stops (nothing is lost)", err=True)
        sys.stdout.flush()

    serve(review_dir, host=host, port=port, reviewer=reviewer, allow_remote=allow_remote, announce=announce)
    click.echo("stopped", err=True)


# ---------------------------------------------------------------- quickstart
@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("semhinet_quickstart"),
              show_default=True, help="folder for the data, the run and the reports")
@click.option("--per-class", default=150, show_default=True, type=click.IntRange(min=10),
              help="synthetic images per class")
@click.option("--img-size", default=128, show_default=True, type=click.IntRange(min=32),
              help="the model's input size (smaller than train's default, to be quick)")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1), help="float epochs")
@click.option("--qat-epochs", default=4, show_default=True, type=click.IntRange(min=0),
              help="quantization-aware epochs")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="fixes the data, split, sampling and initialisation")
@click.option("--weights", default="sem", show_default=True, help="none | sem | imagenet | PATH")
@click.option("--overwrite", is_flag=True,
              help="replace a previous quickstart folder (only one the quickstart made)")
@friendly
def quickstart(out, per_class, img_size, epochs, qat_epochs, seed, weights, overwrite):
    """Synthetic data -> train -> QAT -> int8 TFLite -> eval of float and int8 on the held-out split."""
    _check_weights(weights)
    from semhinet_tf.workflow import quickstart as run_quickstart

    res = run_quickstart(out, per_class=per_class, img_size=img_size, epochs=epochs, qat_epochs=qat_epochs,
                         seed=seed, weights=weights, overwrite=overwrite)
    click.echo(res["table"])
    click.echo(f"total time {res['seconds'] / 60:.1f} min; everything is in {out}/ (report: {res['report']})")


if __name__ == "__main__":  # pragma: no cover
    main()
