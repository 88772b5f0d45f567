"""The training callbacks we keep beside Keras' own (semhinet_tf/training/callbacks.py) and the optimizer's
ramped weight average: each test pins the one thing the class does that Keras' would not."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from semhinet_tf.model import keras
from semhinet_tf.taxonomy import Taxonomy
from semhinet_tf.training import callbacks as cb
from semhinet_tf.training.compile import RampedAverageAdamW


def _regression(seed: int = 0, n: int = 64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(n, 1)).astype(np.float32)


def _dense(optimizer=None):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1), loss="mse")
    return model


class _Scores(keras.callbacks.Callback):
    """Puts a scripted validation score in each epoch's logs, where HierarchicalValidation puts the real one."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)

    def on_epoch_end(self, epoch, logs=None):
        logs["val_leaf_acc"] = logs[cb.MONITOR] = self.scores[epoch]


def test_weight_average_ramps_is_validated_and_the_raw_weights_come_back():
    x, y = _regression()
    decay, seen, expected = 0.8, {}, None
    model = _dense(RampedAverageAdamW(learning_rate=0.05, weight_decay=0.0, ema_momentum=decay))

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):  # the optimizer averaged inside the step
            nonlocal expected
            w = [v.numpy() for v in self.model.trainable_weights]
            if expected is None:
                expected, self.t = [v.copy() for v in w], 1  # the first step's weights are copied
            else:
                self.t += 1
                d = min(decay, (1.0 + self.t) / (10.0 + self.t))
                expected = [d * e + (1 - d) * v for e, v in zip(expected, w, strict=True)]
            seen["raw"] = w

        def on_epoch_end(self, epoch, logs=None):  # between the swap and its restorer: validation's place
            seen["validated"] = [v.numpy() for v in self.model.trainable_weights]

    average = cb.SwapInAverage()
    after = keras.callbacks.LambdaCallback(  # after the restorer: what the next epoch trains on
        on_epoch_end=lambda e, logs: seen.update(after=[v.numpy() for v in model.trainable_weights]))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[average, Probe(), average.restorer(), after])
    assert all(np.allclose(v, e, atol=1e-6) for v, e in zip(seen["validated"], expected, strict=True))
    assert not np.allclose(seen["validated"][0], seen["raw"][0])  # the average is not the last step
    assert all(np.array_equal(v, r) for v, r in zip(seen["after"], seen["raw"], strict=True))


def test_swap_does_nothing_without_an_average():
    x, y = _regression()
    model = _dense()
    swapped = {}
    probe = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: swapped.update(w=model.trainable_weights[0].numpy().copy()))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb.SwapInAverage(), probe])
    assert np.array_equal(swapped["w"], model.trainable_weights[0].numpy())


@pytest.mark.parametrize("resumed", [None, (0.9, 1)])
def test_early_stopping_keeps_a_resumed_runs_best(resumed):
    x, y = _regression()
    model = _dense()
    best, best_epoch = resumed or (None, None)
    stopper = cb.ResumableEarlyStopping(patience=2, best=best, best_epoch=best_epoch)
    start = 2 if resumed else 0
    history = model.fit(x, y, epochs=7, initial_epoch=start, verbose=0,
                        callbacks=[_Scores([0.5] * 2 + [0.6, 0.7, 0.5, 0.5, 0.5]), stopper])
    if resumed:  # 0.6 and 0.7 do not beat the resumed 0.9: stopped after patience epochs, the best kept
        assert len(history.epoch) == 2 and (stopper.best, stopper.best_epoch) == (0.9, 1)
    else:  # 0.7 at epoch 3 (from 0), then two epochs without better: stopped after epoch 5 of 7
        assert (stopper.best, stopper.best_epoch) == (0.7, 3) and history.epoch[-1] == 5


def test_save_best_saves_only_the_epochs_that_improved(tmp_path, monkeypatch):
    import semhinet_tf.model.io as model_io

    saved = []
    monkeypatch.setattr(model_io, "save_model", lambda model, path, quantized: saved.append((len(saved), quantized)))
    x, y = _regression()
    stopper = cb.ResumableEarlyStopping(patience=10)
    epochs = []
    probe = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: epochs.append(len(saved)))
    _dense().fit(x, y, epochs=5, verbose=0, callbacks=[_Scores([0.2, 0.4, 0.4, 0.3, 0.5]), stopper,
                                                       cb.SaveBest(stopper, tmp_path / "m.h5", quantized=True), probe])
    assert epochs == [1, 2, 2, 2, 3] and all(q for _, q in saved)


def test_history_puts_both_phases_in_one_file_with_the_union_of_their_columns(tmp_path):
    x, y = _regression()
    model = _dense()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[_Scores([0.1, 0.2]), cb.PhaseHistory(tmp_path, "float")])
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb.PhaseHistory(tmp_path, "qat")])
    with open(tmp_path / "history.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows, header = list(reader), reader.fieldnames
    assert header[:3] == ["phase", "epoch", "lr"] and cb.MONITOR in header
    assert [(r["phase"], r["epoch"]) for r in rows] == [("float", "1"), ("float", "2"), ("qat", "1")]
    assert rows[1][cb.MONITOR] == "0.2" and rows[2][cb.MONITOR] == "" and float(rows[0]["lr"]) == pytest.approx(0.1)


def test_state_records_each_phase_and_an_early_stop(tmp_path):
    (tmp_path / "train_state.json").write_text(json.dumps({"float": {"epoch": 30, "stopped": False}}))
    x, y = _regression()
    stopper = cb.ResumableEarlyStopping(patience=1)
    _dense().fit(x, y, epochs=5, verbose=0, callbacks=[_Scores([0.3, 0.2, 0.1, 0.1, 0.1]), stopper,
                                                       cb.PhaseState(tmp_path, "qat", stopper)])
    state = json.loads((tmp_path / "train_state.json").read_text())
    assert state["float"] == {"epoch": 30, "stopped": False}
    qat = state["qat"]
    assert {k: qat[k] for k in ("epoch", "best", "best_epoch", "stopped")} == {"epoch": 2, "best": 0.3,
                                                                               "best_epoch": 0, "stopped": True}
    assert 0 <= qat["seconds"] < 60 and qat["images_per_second"] is None  # no step timer given


def test_a_resumed_phase_adds_its_seconds_to_those_before_and_keeps_the_step_rate(tmp_path):
    """After Ctrl-C and --resume the run printed 'float phase 0.0 min' and 'training step 0 images/s': the
    figures covered only what the resuming process ran."""
    (tmp_path / "train_state.json").write_text(json.dumps(
        {"float": {"epoch": 3, "best": 0.3, "best_epoch": 0, "stopped": False, "seconds": 100.0,
                   "images_per_second": 250.0}}))
    x, y = _regression()
    stopper = cb.ResumableEarlyStopping(patience=5, best=0.3, best_epoch=0)
    timer = cb.StepTimer()
    _dense().fit(x, y, epochs=5, initial_epoch=3, batch_size=8, verbose=0,
                 callbacks=[timer, _Scores([0, 0, 0, 0.1, 0.1]), stopper,
                            cb.PhaseState(tmp_path, "float", stopper, timer, batch_size=8)])
    state = json.loads((tmp_path / "train_state.json").read_text())["float"]
    assert state["epoch"] == 5 and 100.0 <= state["seconds"] < 160
    assert state["images_per_second"] > 0 and state["images_per_second"] != 250.0  # this process measured it
    from semhinet_tf.training.loop import _seconds_before

    assert _seconds_before({"float": state}, "float") == state["seconds"] and _seconds_before({}, "qat") == 0.0


def test_one_summary_line_per_epoch_on_stdout_and_no_bar_when_not_wanted(capsys):
    x, y = _regression()
    stopper = cb.ResumableEarlyStopping(patience=5)
    _dense().fit(x, y, epochs=3, batch_size=16, verbose=0,
                 callbacks=[_Scores([0.25, 0.5, 0.4]), stopper, cb.EpochProgress("float", 3, 4, stopper, False)])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"  [float] epoch {i}/3" for i in (1, 2, 3)]
    assert "balanced 0.400 (best 0.500 at epoch 2)" in lines[2] and "loss " in lines[0]
    assert err == ""


def test_step_bar_goes_to_stderr_when_wanted(capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    x, y = _regression()
    stopper = cb.ResumableEarlyStopping(patience=5)
    _dense().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb.EpochProgress("qat", 1, 4, stopper)])
    out, err = capsys.readouterr()
    assert "qat 1/1" in err and "step/s" in err and "qat 1/1" not in out  # tqdm redraws at most every 0.1 s


def test_hierarchical_validation_scores_the_leaf_through_the_taxonomy():
    taxonomy = Taxonomy.default()
    inputs = keras.Input((4, 4, 1))
    leaf = keras.layers.Dense(8, activation="softmax", name="leaf", kernel_initializer="zeros",
                              bias_initializer=keras.initializers.Constant([5.0] + [0.0] * 7))(
        keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, {"leaf": leaf})  # a flat model that always answers leaf 0
    leaf_ids = np.array([0, 0, 0, 1, 2, 3])
    logs: dict = {}
    validation = cb.HierarchicalValidation((np.zeros((6, 4, 4), np.uint8), leaf_ids), taxonomy)
    validation.set_model(model)
    validation.on_epoch_end(0, logs)
    assert logs == {"val_leaf_acc": pytest.approx(0.5), "val_leaf_bacc": pytest.approx(0.25)}


def test_step_timer_leaves_out_each_epochs_first_batch():
    x, y = _regression()
    timer = cb.StepTimer()
    _dense().fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[timer])
    assert timer.batches == 2 * 3 and timer.images_per_second(16) > 0
