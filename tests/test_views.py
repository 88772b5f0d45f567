"""Test-time views: the flips/quarter turns a model may be scored on, and their log-average."""

from __future__ import annotations

import numpy as np
import pytest

from semhinet_tf.data.views import (
    VIEW_TABLE,
    apply_view,
    average_views,
    invariant_views,
    log_average,
    select_views,
    view_counts,
)

FULL = {"flip": True, "rot90": True}


def _frame(seed: int = 0, size: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, size, size), dtype=np.uint8)


def _as_key(frames: np.ndarray) -> bytes:
    return np.ascontiguousarray(frames).tobytes()


def test_the_eight_views_are_the_eight_orientations_of_the_square():
    x = _frame()
    seen = {_as_key(apply_view(x, name)) for name in VIEW_TABLE}
    square = {_as_key(np.rot90(m, k, axes=(1, 2))) for m in (x, np.swapaxes(x, 1, 2)) for k in range(4)}
    assert seen == square and len(seen) == 8
    for k, name in enumerate(["identity", "rot90", "rot180", "rot270"]):
        assert np.array_equal(apply_view(x, name), np.rot90(x, k, axes=(1, 2)))


@pytest.mark.parametrize("augment", [FULL, {"flip": True}, {"rot90": True}, {}])
def test_every_offered_count_is_a_group_so_the_average_is_exactly_invariant(augment):
    available = invariant_views(augment)
    x = _frame(1)
    for n in view_counts(available):
        views = available[:n]
        outcomes = {_as_key(apply_view(apply_view(x, a), b)) for a in views for b in views}
        assert outcomes == {_as_key(apply_view(x, v)) for v in views}, (augment, n)


def test_views_follow_the_training_augmentation():
    assert invariant_views(FULL) == list(VIEW_TABLE)
    assert invariant_views({"flip": True, "rot90": False}) == ["identity", "rot180", "flip_rows", "flip_cols"]
    assert invariant_views({"flip": False, "rot90": True}) == ["identity", "transpose"]
    assert invariant_views({}) == invariant_views(None) == ["identity"]
    assert view_counts(invariant_views(FULL)) == [1, 2, 4, 8]
    assert view_counts(["identity"]) == [1]


def test_asking_for_views_the_model_was_not_trained_on_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"m\.tflite: 8 test-time views asked; this model offers 1, 2") as err:
        select_views(["identity", "transpose"], 8, "m.tflite")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="3 test-time views"):
        select_views(invariant_views(FULL), 3)
    assert select_views(None, 1) == ["identity"]


def _orientation_sensitive(frames: np.ndarray) -> dict[str, np.ndarray]:
    """A 'model' whose verdict depends on where the bright pixels are: top rows vs left columns."""
    x = frames.astype(np.float64) / 255.0
    logits = np.stack([x[:, 0].mean(1), x[:, :, 0].mean(1), x[:, -1].mean(1)], axis=1) * 4
    p = np.exp(logits)
    return {"h1": p / p.sum(1, keepdims=True)}


def test_averaging_all_views_makes_an_orientation_sensitive_model_invariant():
    x = _frame(2, 6)
    single = [_orientation_sensitive(apply_view(x, v))["h1"] for v in VIEW_TABLE]
    assert max(np.abs(s - single[0]).max() for s in single) > 0.01  # the 'model' does care about orientation
    averaged = [average_views(_orientation_sensitive, apply_view(x, v), list(VIEW_TABLE))["h1"] for v in VIEW_TABLE]
    for a in averaged:
        np.testing.assert_allclose(a, averaged[0], atol=1e-6)
        np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(average_views(_orientation_sensitive, x, ["identity"])["h1"], single[0])


def test_log_average_is_the_softmax_of_the_mean_logit_and_survives_zero_probabilities():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    views = [{"h": np.exp(z) / np.exp(z).sum()} for z in ([logits[0]], [logits[1]])]
    mean = logits.mean(0)
    np.testing.assert_allclose(log_average(views)["h"], [np.exp(mean) / np.exp(mean).sum()], rtol=1e-5)
    hard = log_average([{"h": np.array([[1.0, 0.0]])}, {"h": np.array([[0.0, 1.0]])}])["h"]
    assert np.all(np.isfinite(hard)) and np.allclose(hard, 0.5)


def test_the_review_threshold_follows_the_number_of_views(tmp_path):
    import json

    from semhinet_tf.workflow import review_threshold

    contract = {"review_threshold": 0.9, "review_threshold_by_views": {"2": 0.8, "8": 0.7}}
    assert [review_threshold(contract, None, n) for n in (1, 2, 4, 8)] == [0.9, 0.8, 0.9, 0.7]
    (tmp_path / "review_threshold.json").write_text(json.dumps(
        {"threshold": 0.95, "by_views": {"4": {"threshold": 0.85}, "8": {"threshold": None}}}))
    assert review_threshold(None, tmp_path, 1) == 0.95
    assert review_threshold(None, tmp_path, 4) == 0.85
    assert review_threshold(None, tmp_path, 8, default=0.5) == 0.5  # no threshold reached the purity target
    assert review_threshold(None, None, 2, default=0.6) == 0.6
