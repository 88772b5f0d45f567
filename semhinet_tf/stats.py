"""The statistics every figure is read with: a 95% interval for a proportion and the paired test of two models.

One small module so eval, compare, the report and promote say the same thing about the same counts.

* Interval: Wilson's score interval for k successes in n trials. Unlike the normal ("Wald") interval it stays
  inside [0, 1] and does not collapse to a point at 0/n or n/n, which is where our figures live (a recall of
  1.0 on 12 frames is not certainty). It needs only the two counts, so it is computed from a results JSON too.
* Paired test: two models scored on the *same* images differ only on the images where one is right and the
  other wrong (the discordant pairs b and c). McNemar's exact test asks whether b and c could be a fair coin's
  split of b + c; we use the exact binomial form (no continuity correction, valid for any small count).
  "Significantly worse" is the one-sided version: is the new model wrong on more of them than chance allows.

numpy + scipy only (scipy is a host dependency); no TensorFlow.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05  # one-sided level of "significantly worse"
FEW_FRAMES = 30  # a figure resting on fewer images than this is flagged in the report


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Wilson score interval (low, high) for k successes out of n; None when n is 0 (nothing to estimate)."""
    k, n = int(k), int(n)
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"successes {k} not in 0..{n}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # at k=0 / k=n the exact bound is 0 / 1; rounding must not leave it a hair inside
    return (0.0 if k == 0 else max(0.0, float(centre - half)), 1.0 if k == n else min(1.0, float(centre + half)))


def interval(k: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """`wilson` as a JSON-friendly [low, high] list (None when n is 0)."""
    ci = wilson(k, n, confidence)
    return None if ci is None else [ci[0], ci[1]]


def discordant(old_correct: np.ndarray, new_correct: np.ndarray) -> tuple[int, int]:
    """(b, c) on the same images: b = old right and new wrong, c = old wrong and new right."""
    old_correct = np.asarray(old_correct, dtype=bool)
    new_correct = np.asarray(new_correct, dtype=bool)
    if old_correct.shape != new_correct.shape:
        raise ValueError(f"paired scores need the same images: {old_correct.shape} vs {new_correct.shape}")
    return int(np.sum(old_correct & ~new_correct)), int(np.sum(~old_correct & new_correct))


def paired_difference_interval(old_correct: np.ndarray, new_correct: np.ndarray,
                               confidence: float = CONFIDENCE) -> list[float] | None:
    """95% interval of new accuracy minus old accuracy on the same images (Newcombe 1998, method 10: each
    accuracy's Wilson interval, combined with the correlation of the paired outcomes). Why not two independent
    intervals: the same images make the two accuracies move together, so their difference is known far better
    than the two intervals suggest. None without images."""
    old_correct = np.asarray(old_correct, dtype=bool)
    new_correct = np.asarray(new_correct, dtype=bool)
    b, c = discordant(old_correct, new_correct)
    n = old_correct.size
    if n == 0:
        return None
    both = int(np.sum(old_correct & new_correct))
    neither = n - both - b - c
    p_new, p_old = (both + c) / n, (both + b) / n
    l1, u1 = wilson(both + c, n, confidence)
    l2, u2 = wilson(both + b, n, confidence)
    margins = float(both + c) * float(neither + b) * float(both + b) * float(neither + c)
    phi = (both * neither - b * c) / math.sqrt(margins) if margins > 0 else 0.0
    delta = p_new - p_old
    low = math.sqrt(max(0.0, (p_new - l1) ** 2 - 2 * phi * (p_new - l1) * (u2 - p_old) + (u2 - p_old) ** 2))
    high = math.sqrt(max(0.0, (u1 - p_new) ** 2 - 2 * phi * (u1 - p_new) * (p_old - l2) + (p_old - l2) ** 2))
    return [max(-1.0, delta - low), min(1.0, delta + high)]


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for discordant counts b and c (1.0 when there is no discordant pair)."""
    from scipy.stats import binomtest

    n = int(b) + int(c)
    return 1.0 if n == 0 else float(binomtest(int(b), n, 0.5, alternative="two-sided").pvalue)


def mcnemar_worse(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the new model is worse: P(X >= b) for X ~ Binomial(b + c, 1/2),
    where b counts the images only the old model got right."""
    from scipy.stats import binomtest

    n = int(b) + int(c)
    return 1.0 if n == 0 else float(binomtest(int(b), n, 0.5, alternative="greater").pvalue)


def fails(drop_points: float | None, tolerance: float, p_worse: float | None, paired: bool,
          alpha: float = ALPHA) -> bool:
    """The gate's rule, shared by `compare --max-drop/--not-worse` and `promote`.

    A figure fails when it fell by more than `tolerance` points and, with `paired`, the paired test also finds
    the fall significant (one-sided p < alpha). A figure without a paired test (p_worse None) is judged by the
    tolerance alone. A figure that cannot be computed never fails."""
    if drop_points is None or drop_points <= tolerance:
        return False
    if paired and p_worse is not None:
        return p_worse < alpha
    return True


def format_interval(ci: list[float] | tuple[float, float] | None, digits: int = 2) -> str:
    """'[0.49, 0.94]', or '' without an interval."""
    return "" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def threshold_at(scores: np.ndarray, false_alarm: float) -> float:
    """The lowest threshold that at most a share `false_alarm` of `scores` (familiar frames) exceed."""
    scores = np.sort(np.asarray(scores, np.float64))
    if not scores.size:
        raise ValueError("no frames to set the threshold on")
    above = min(int(np.floor(scores.size * false_alarm + 1e-9)), scores.size - 1)
    return float(scores[scores.size - 1 - above])


def recall_at(familiar: np.ndarray, unfamiliar: np.ndarray, false_alarm: float) -> float | None:
    """Share of `unfamiliar` scores above the threshold that `false_alarm` of `familiar` exceed (None: no frames)."""
    unfamiliar = np.asarray(unfamiliar, np.float64)
    if not unfamiliar.size or not np.asarray(familiar).size:
        return None
    return float(np.mean(unfamiliar > threshold_at(familiar, false_alarm)))
