"""What runs around each training epoch. Keras' own callbacks do what they can (EarlyStopping,
BackupAndRestore, the optimizer's weight average); each class here does one thing Keras' cannot, said in
its first line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from semhinet_tf.artifacts.run import CHECKPOINT, HISTORY
from semhinet_tf.model import keras
from semhinet_tf.training.state import append_history, read_state, write_phase_state
from semhinet_tf.training.validation import hierarchical_scores

MONITOR = "val_leaf_bacc"  # the kept epoch is the best by balanced leaf accuracy through the hierarchy


class StepTimer(keras.callbacks.Callback):
    """Training-step throughput, first batch of each epoch excluded (graph tracing), validation excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.batches, self.seconds, self._t = 0, 0.0, None

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._t is not None and batch > 0:  # the first batch of an epoch pays for tracing / iterator start
            self.batches += 1
            self.seconds += time.perf_counter() - self._t

    def images_per_second(self, batch_size: int) -> float:
        return round(self.batches * batch_size / self.seconds, 1) if self.seconds else 0.0


class HierarchicalValidation(keras.callbacks.Callback):
    """Adds the leaf scores through the whole hierarchy to the epoch's logs (Keras validates head by head)."""

    def __init__(self, val: tuple[np.ndarray, np.ndarray], taxonomy: Any) -> None:
        super().__init__()
        self.val, self.taxonomy = val, taxonomy

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(hierarchical_scores(self.model, self.val[0], self.val[1], self.taxonomy))


class SwapInAverage(keras.callbacks.Callback):
    """Puts the optimizer's weight average in the model for validation and saving, and (through `restorer`)
    the raw weights back before the next epoch: tf-keras's EMA only swaps at the end of training."""

    def __init__(self) -> None:
        super().__init__()
        self._raw: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        if not getattr(optimizer, "use_ema", False):
            return
        self._raw = [w.numpy() for w in self.model.trainable_weights]
        optimizer.finalize_variable_values(self.model.trainable_weights)

    def restore(self) -> None:
        if self._raw is not None:
            for w, r in zip(self.model.trainable_weights, self._raw, strict=True):
                w.assign(r)
            self._raw = None

    def restorer(self) -> keras.callbacks.Callback:
        """The callback that puts the raw weights back (placed after validation and saving)."""
        return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: self.restore())


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping on the hierarchy's score that continues a resumed run's best (Keras' restarts from none)."""

    def __init__(self, patience: int, best: float | None = None, best_epoch: int | None = None) -> None:
        super().__init__(monitor=MONITOR, mode="max", min_delta=1e-6, patience=patience)
        self.resumed = (best, best_epoch) if best is not None and best_epoch is not None else None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resumed is not None:
            self.best, self.best_epoch = self.resumed

    def improved_at(self, epoch: int) -> bool:
        """Whether `epoch` set the best score (valid after this callback's on_epoch_end)."""
        return self.best_epoch == epoch and np.isfinite(self.best)


class SaveBest(keras.callbacks.Callback):
    """Saves the model when the early stopper records a new best, atomically through model.io (ModelCheckpoint
    writes in place, so a crash mid-save would lose the best model)."""

    def __init__(self, stopper: ResumableEarlyStopping, path: Path, quantized: bool) -> None:
        super().__init__()
        self.stopper, self.path, self.quantized = stopper, path, quantized

    def on_epoch_end(self, epoch, logs=None):
        if self.stopper.improved_at(epoch):
            from semhinet_tf.model.io import save_model

            save_model(self.model, self.path, quantized=self.quantized)


class PhaseHistory(keras.callbacks.Callback):
    """history.csv over both phases (CSVLogger cannot: a leading phase column, the learning rate, epochs counted
    from 1, one header for the two phases, and an atomic rewrite instead of an append)."""

    def __init__(self, run_dir: Path, phase: str) -> None:
        super().__init__()
        self.path, self.phase = run_dir / HISTORY, phase

    def on_epoch_end(self, epoch, logs=None):
        row = {"phase": self.phase, "epoch": epoch + 1, "lr": float(self._lr()),
               **{k: float(v) for k, v in (logs or {}).items()}}
        append_history(self.path, row)

    def _lr(self):
        opt = self.model.optimizer
        lr = opt.learning_rate
        step = opt.iterations.read_value()  # a MirroredVariable under tf.distribute
        return (lr(step) if callable(lr) else lr).numpy()


class PhaseState(keras.callbacks.Callback):
    """train_state.json after every epoch: how far the phase got, its best score, whether it stopped early
    (BackupAndRestore keeps the weights but cannot tell a finished phase from an interrupted one), and its
    training time and step throughput summed over every process that ran it, so a --resume reports the whole
    phase rather than its own few seconds."""

    def __init__(self, run_dir: Path, phase: str, stopper: ResumableEarlyStopping, timer: StepTimer | None = None,
                 batch_size: int = 0) -> None:
        super().__init__()
        self.run_dir, self.phase, self.stopper = run_dir, phase, stopper
        self.timer, self.batch_size = timer, batch_size
        saved = read_state(run_dir).get(phase, {})
        self.before = float(saved.get("seconds", 0.0))
        self.before_ips = saved.get("images_per_second")
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        ips = self.timer.images_per_second(self.batch_size) if self.timer is not None else 0.0
        write_phase_state(self.run_dir, self.phase, {
            "epoch": epoch + 1, "best": float(self.stopper.best), "best_epoch": int(self.stopper.best_epoch),
            "stopped": bool(self.model.stop_training),
            "seconds": round(self.before + time.perf_counter() - self.started, 1),
            "images_per_second": ips or self.before_ips})


class EpochProgress(keras.callbacks.Callback):
    """A step bar on stderr (hidden when not a terminal or not wanted) and one summary line per epoch on stdout:
    Keras' ProgbarLogger writes both to stdout, where they interleave."""

    def __init__(self, phase: str, epochs: int, steps: int, stopper: ResumableEarlyStopping,
                 progress: bool = True) -> None:
        super().__init__()
        self.phase, self.epochs, self.steps, self.stopper = phase, epochs, steps, stopper
        self.progress = progress
        self._bar: Any = None
        self._t = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        from tqdm import tqdm

        self._t = time.perf_counter()
        from semhinet_tf.console import stderr_is_terminal

        # only on a terminal (into a log file, the epoch's summary line is enough); asked of the terminal itself,
        # since descriptor 2 is the native-log filter's pipe
        self._bar = tqdm(total=self.steps, desc=f"{self.phase} {epoch + 1}/{self.epochs}", unit="step",
                         leave=False, file=sys.stderr, dynamic_ncols=True,
                         disable=not (self.progress and stderr_is_terminal()))

    def on_train_batch_end(self, batch, logs=None):
        if self._bar is not None:
            self._bar.update(1)
            if logs and "loss" in logs:
                self._bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            from semhinet_tf.console import settle_stderr

            self._bar.close()
            self._bar = None
            settle_stderr()  # the bar's erasing reaches the terminal before the summary line
        logs = logs or {}
        parts = [f"loss {float(logs['loss']):.4f}"] if "loss" in logs else []
        if MONITOR in logs:
            parts.append(f"val leaf acc {float(logs['val_leaf_acc']):.3f}, balanced {float(logs[MONITOR]):.3f} "
                         f"(best {float(self.stopper.best):.3f} at epoch {int(self.stopper.best_epoch) + 1})")
        print(f"  [{self.phase}] epoch {epoch + 1}/{self.epochs}: {', '.join(parts)}; "
              f"{time.perf_counter() - self._t:.1f} s", flush=True)

    def on_train_end(self, logs=None):
        if self._bar is not None:  # training interrupted mid-epoch
            self._bar.close()
            self._bar = None


def phase_callbacks(run_dir: Path, phase: str, taxonomy: Any, val: tuple, cfg: Any, model_path: Path,
                    epochs: int, steps: int, progress: bool = True, timer: StepTimer | None = None
                    ) -> list[keras.callbacks.Callback]:
    """A phase's callbacks in the order they must run at an epoch's end: average in, validate, stop/keep the
    best, raw weights back, history, backup, state, then the summary line."""
    saved = read_state(run_dir).get(phase, {})
    stopper = ResumableEarlyStopping(cfg.patience, saved.get("best"), saved.get("best_epoch"))
    average = SwapInAverage()
    return [average, HierarchicalValidation(val, taxonomy), stopper,
            SaveBest(stopper, model_path, quantized=phase == "qat"), average.restorer(),
            PhaseHistory(run_dir, phase),
            keras.callbacks.BackupAndRestore(str(run_dir / CHECKPOINT / phase), delete_checkpoint=False),
            PhaseState(run_dir, phase, stopper, timer, cfg.batch_size),
            EpochProgress(phase, epochs, steps, stopper, progress)]
