"""tf.data input pipeline: decoded frames, class-balanced sampling, SEM augmentations, head labels.

Frames are decoded once (in parallel, by the shared decoder) into a uint8 array, in memory or memory-mapped
from the on-disk cache (data/cache.py); every epoch then only gathers, augments and batches, so 2 CPU cores
never wait for JPEG/TIFF decoding, and the gather reads just the rows of each batch.
Sampling order and augmentation noise are derived from the seed and the step number (stateless RNG),
so a run is reproducible and a resumed run continues the same stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from semhinet_tf.data.decode import ImageError, Preprocess, load_frame
from semhinet_tf.taxonomy import Taxonomy

SAMPLERS = ("balanced", "natural")


@dataclass(frozen=True)
class Augment:
    """Augmentations that suit SEM frames (geometry and imaging conditions; no colour)."""

    flip: bool = True
    rot90: bool = True
    shift: float = 0.0  # max shift, fraction of the frame (resamples: off by default, see below)
    zoom: float = 0.0  # max zoom in/out, fraction (resamples: off by default)
    brightness: float = 0.10  # max additive change, fraction of full scale
    contrast: float = 0.20  # max multiplicative change around the mean
    gamma: float = 0.20  # log-uniform gamma in [1/(1+g), 1+g]
    noise: float = 0.02  # max Gaussian noise sigma, fraction of full scale
    blur: float = 0.0  # probability of a 3x3 blur

    # Defaults keep what a one-pixel micro-bridge needs: the 8 flips/rotations and photometric changes are
    # exact, while shift/zoom resampling and blur wash out defects of a pixel or two at 128 px and, measured
    # here, stalled from-scratch training (train accuracy at chance after 5 epochs). Switch them on for
    # large-defect data or long runs.

    @classmethod
    def off(cls) -> Augment:
        return cls(False, False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def _decode_one(args: tuple[str, dict]) -> tuple[np.ndarray | None, str | None]:
    path, pre = args
    try:
        return load_frame(path, Preprocess.from_dict(pre)), None
    except ImageError as exc:
        return None, exc.reason


def iter_decoded(paths: Sequence[str], pre: Preprocess, workers: int | None = None, progress: bool = True,
                 desc: str = "decode") -> Iterator[tuple[np.ndarray | None, str | None]]:
    """(frame, None) or (None, reason) per file, in order, decoded in parallel: a stream, so a caller that
    writes frames out (the on-disk cache) never holds them all."""
    from tqdm import tqdm

    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [(str(p), pre.to_dict()) for p in paths]
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers > 1 and len(jobs) > 64:
            # threads, not processes: TensorFlow is usually loaded (fork is unsafe then, and spawn would re-run
            # an unguarded user script); Pillow releases the GIL while decoding and resizing.
            with ThreadPoolExecutor(workers) as pool:
                for result in pool.map(_decode_one, jobs, chunksize=32):
                    bar.update()
                    yield result
        else:
            for job in jobs:
                result = _decode_one(job)
                bar.update()
                yield result
    finally:
        bar.close()


def decode_frames(paths: Sequence[str], pre: Preprocess, workers: int | None = None,
                  progress: bool = True, desc: str = "decode") -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode every file to a (N, S, S) uint8 array in memory; bad files are returned as (path, reason)."""
    frames = np.zeros((len(paths), pre.size, pre.size), np.uint8)
    bad: list[tuple[str, str]] = []
    for i, (frame, err) in enumerate(iter_decoded(paths, pre, workers, progress, desc)):
        if frame is None:
            bad.append((str(paths[i]), err or "unreadable"))
        else:
            frames[i] = frame
    return frames, bad


def sample_order(leaf_ids: np.ndarray, steps: int, batch_size: int, sampler: str, seed: int,
                 num_leaves: int) -> np.ndarray:
    """Indices for `steps` batches: class-balanced (each class equally likely, with replacement, like a
    weighted random sampler) or natural (shuffled epochs). Deterministic in the seed."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
    rng = np.random.default_rng([seed, 7001])
    n = steps * batch_size
    if sampler == "balanced":
        counts = np.bincount(leaf_ids, minlength=num_leaves).astype(np.float64)
        weights = 1.0 / counts[leaf_ids]
        return rng.choice(len(leaf_ids), size=n, replace=True, p=weights / weights.sum()).astype(np.int32)
    reps = -(-n // len(leaf_ids))
    return np.concatenate([rng.permutation(len(leaf_ids)) for _ in range(reps)])[:n].astype(np.int32)


def augment_batch(images, step, seed: int, aug: Augment):
    """Augment a float32 batch (B, S, S, 1) of 0..255 pixels; randomness is a pure function of (seed, step)."""
    import tensorflow as tf

    b = tf.shape(images)[0]
    size = images.shape[1]
    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])

    def u(i, shape, lo=0.0, hi=1.0):
        return tf.random.stateless_uniform(shape, seed=base + [0, 1_000_003 * (i + 1)], minval=lo, maxval=hi)

    x = images
    if aug.flip:
        x = tf.where(u(0, [b, 1, 1, 1]) < 0.5, tf.reverse(x, [2]), x)
        x = tf.where(u(1, [b, 1, 1, 1]) < 0.5, tf.reverse(x, [1]), x)
    if aug.rot90:
        x = tf.where(u(2, [b, 1, 1, 1]) < 0.5, tf.transpose(x, [0, 2, 1, 3]), x)
    if aug.shift or aug.zoom:
        scale = 1.0 + u(3, [b], -aug.zoom, aug.zoom)
        dy = u(4, [b], -aug.shift, aug.shift)
        dx = u(5, [b], -aug.shift, aug.shift)
        half = 0.5 / scale
        boxes = tf.stack([0.5 - half + dy, 0.5 - half + dx, 0.5 + half + dy, 0.5 + half + dx], axis=1)
        x = tf.image.crop_and_resize(x, boxes, tf.range(b), [size, size], method="bilinear",
                                     extrapolation_value=0.0)
        # reflect-free border: fill outside pixels with the frame mean rather than black
        inside = tf.image.crop_and_resize(tf.ones_like(images), boxes, tf.range(b), [size, size])
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        x = x + (1.0 - inside) * mean
    if aug.gamma:
        g = tf.exp(u(6, [b, 1, 1, 1], -np.log1p(aug.gamma), np.log1p(aug.gamma)))
        x = 255.0 * tf.pow(tf.clip_by_value(x / 255.0, 0.0, 1.0), g)
    if aug.contrast:
        c = 1.0 + u(7, [b, 1, 1, 1], -aug.contrast, aug.contrast)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * c + mean
    if aug.brightness:
        x = x + 255.0 * u(8, [b, 1, 1, 1], -aug.brightness, aug.brightness)
    if aug.blur:
        kernel = tf.constant([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], shape=[3, 3, 1, 1]) / 16.0
        blurred = tf.nn.conv2d(x, kernel, 1, "SAME")
        x = tf.where(u(9, [b, 1, 1, 1]) < aug.blur, blurred, x)
    if aug.noise:
        sigma = 255.0 * u(10, [b, 1, 1, 1], 0.0, aug.noise)
        x = x + sigma * tf.random.stateless_normal(tf.shape(x), seed=base + [0, 99991])
    return tf.clip_by_value(tf.round(x), 0.0, 255.0)


def make_dataset(frames: np.ndarray, leaf_ids: np.ndarray, taxonomy: Taxonomy, batch_size: int, steps: int,
                 seed: int, sampler: str = "balanced", aug: Augment | None = None, start_step: int = 0,
                 flat: bool = False):
    """Training dataset of (image batch, {head: int labels with -1 where masked}) for `steps` steps."""
    import tensorflow as tf

    aug = aug or Augment()
    order = sample_order(leaf_ids, steps, batch_size, sampler, seed, len(taxonomy.leaves))
    order = order.reshape(steps, batch_size)[start_step:]
    label_table = tf.constant(taxonomy.label_matrix())
    size = frames.shape[1]
    leaf_t = tf.constant(leaf_ids.astype(np.int32))
    heads = taxonomy.head_names

    def gather(idx):  # numpy, not a tf.constant of all frames: a memory-mapped dataset stays on disk
        return np.asarray(frames.take(idx, axis=0), np.uint8)

    def batch_fn(step, idx):
        rows = tf.numpy_function(gather, [idx], tf.uint8, stateful=False)
        rows.set_shape([None, size, size])
        images = tf.cast(rows, tf.float32)[..., None]
        images = augment_batch(images, step, seed, aug)
        leaves = tf.gather(leaf_t, idx)
        if flat:
            return images, {"leaf": leaves}
        labels = tf.gather(label_table, leaves)
        return images, {h: labels[:, i] for i, h in enumerate(heads)}

    steps_t = tf.range(start_step, steps, dtype=tf.int64)
    ds = tf.data.Dataset.from_tensor_slices((steps_t, order))
    ds = ds.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_batches(frames: np.ndarray, batch_size: int = 64):
    """Un-augmented float batches for prediction."""
    for i in range(0, len(frames), batch_size):
        yield frames[i:i + batch_size, :, :, None].astype(np.float32)
