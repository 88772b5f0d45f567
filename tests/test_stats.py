"""Issue 26.3: the interval and the paired test every figure is read with, checked on published cases."""

import numpy as np
import pytest

from semhinet_tf import stats


@pytest.mark.parametrize("k, n, low, high", [
    (8, 10, 0.4902, 0.9433),    # the usual textbook case
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Stat. Med. 17:857, table I, method 3
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_published_values(k, n, low, high):
    lo, hi = stats.wilson(k, n)
    assert lo == pytest.approx(low, abs=6e-5) and hi == pytest.approx(high, abs=6e-5)


def test_wilson_edges():
    assert stats.wilson(0, 0) is None and stats.interval(3, 0) is None
    assert stats.wilson(12, 12)[1] == 1.0 and stats.wilson(12, 12)[0] < 0.8  # 12/12 is not certainty
    with pytest.raises(ValueError):
        stats.wilson(5, 4)


def test_exact_mcnemar_on_a_hand_made_table():
    # old right / new wrong on 1 image, old wrong / new right on 9: two-sided p = 2 * 11 / 1024
    old = np.array([1] * 1 + [0] * 9 + [1] * 30 + [0] * 5, bool)
    new = np.array([0] * 1 + [1] * 9 + [1] * 30 + [0] * 5, bool)
    b, c = stats.discordant(old, new)
    assert (b, c) == (1, 9)
    assert stats.mcnemar(b, c) == pytest.approx(22 / 1024)
    assert stats.mcnemar_worse(b, c) == pytest.approx(1.0 - 1 / 1024)  # the new model is better: not worse
    assert stats.mcnemar_worse(9, 1) == pytest.approx(11 / 1024)      # the reverse is worse, one-sided
    from scipy.stats import binomtest

    assert stats.mcnemar(7, 2) == pytest.approx(binomtest(7, 9, 0.5).pvalue)
    assert stats.mcnemar(0, 0) == 1.0 and stats.mcnemar_worse(0, 0) == 1.0


def test_gate_rule():
    assert not stats.fails(0.5, 1.0, 0.001, paired=True)       # within tolerance, however significant
    assert stats.fails(4.0, 1.0, 0.01, paired=True)            # beyond tolerance and significant
    assert not stats.fails(4.0, 1.0, 0.2, paired=True)         # beyond tolerance, could be chance
    assert stats.fails(4.0, 1.0, 0.2, paired=False)            # without the test the tolerance decides
    assert stats.fails(4.0, 1.0, None, paired=True)            # no paired test for this figure
    assert not stats.fails(None, 1.0, None, paired=False)
