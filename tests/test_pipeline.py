"""tf.data pipeline: balanced sampling, determinism, augmentation ranges, head labels with masks."""

from __future__ import annotations

import numpy as np
import pytest

from semhinet_tf.data.pipeline import Augment, augment_batch, make_dataset, sample_order
from semhinet_tf.taxonomy import IGNORE, Taxonomy


def test_balanced_sampler_equalises_classes_and_natural_follows_the_data():
    leaf_ids = np.array([0] * 900 + [1] * 100)
    balanced = sample_order(leaf_ids, steps=200, batch_size=50, sampler="balanced", seed=0, num_leaves=2)
    share = np.mean(leaf_ids[balanced] == 1)
    assert 0.45 < share < 0.55
    natural = sample_order(leaf_ids, steps=200, batch_size=50, sampler="natural", seed=0, num_leaves=2)
    assert 0.08 < np.mean(leaf_ids[natural] == 1) < 0.12
    with pytest.raises(ValueError):
        sample_order(leaf_ids, 1, 1, "weird", 0, 2)


def test_sampling_is_a_function_of_the_seed():
    leaf_ids = np.arange(40) % 4
    a = sample_order(leaf_ids, 10, 8, "balanced", 5, 4)
    assert np.array_equal(a, sample_order(leaf_ids, 10, 8, "balanced", 5, 4))
    assert not np.array_equal(a, sample_order(leaf_ids, 10, 8, "balanced", 6, 4))


def test_dataset_yields_masked_head_labels_and_is_reproducible():
    tax = Taxonomy.default()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (16, 24, 24), dtype=np.uint8)
    leaf_ids = np.arange(16) % 8

    def first_batch(seed):
        images, labels = next(iter(make_dataset(frames, leaf_ids, tax, 8, 2, seed)))
        return images.numpy(), {k: v.numpy() for k, v in labels.items()}

    x1, y1 = first_batch(3)
    x2, y2 = first_batch(3)
    assert x1.shape == (8, 24, 24, 1) and np.array_equal(x1, x2)
    assert x1.min() >= 0 and x1.max() <= 255
    for leaf_row, h1, h3 in zip(range(8), y1["h1"], y1["h3"], strict=True):
        assert h1 in (0, 1, 2)
        if h1 != 2:
            assert h3 == IGNORE, leaf_row


def test_resumed_stream_continues_where_it_stopped():
    tax = Taxonomy.default()
    frames = np.random.default_rng(1).integers(0, 256, (16, 16, 16), dtype=np.uint8)
    leaf_ids = np.arange(16) % 8
    full = [x.numpy() for x, _ in make_dataset(frames, leaf_ids, tax, 4, 6, 0)]
    resumed = [x.numpy() for x, _ in make_dataset(frames, leaf_ids, tax, 4, 6, 0, start_step=4)]
    assert len(resumed) == 2
    assert np.array_equal(full[4], resumed[0]) and np.array_equal(full[5], resumed[1])


def test_augmentations_can_be_switched_off_and_keep_pixel_range():
    images = np.random.default_rng(2).integers(0, 256, (4, 20, 20, 1)).astype(np.float32)
    off = augment_batch(images, 0, 0, Augment.off()).numpy()
    assert np.array_equal(off, images)
    strong = Augment(shift=0.1, zoom=0.1, blur=1.0, noise=0.05)
    out = augment_batch(images, 0, 0, strong).numpy()
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    assert not np.array_equal(out, images)
