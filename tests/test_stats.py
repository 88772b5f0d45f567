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


def test_paired_difference_interval_agrees_with_the_bootstrap_and_is_narrower_than_unpaired():
    """Two models on the same 800 images that disagree on 4% of them: Newcombe's paired interval matches a
    bootstrap over images within a few tenths of a point, and is far narrower than the two accuracies' own."""
    rng = np.random.default_rng(0)
    old = rng.random(800) < 0.82
    new = old.copy()
    flip = rng.random(800) < 0.04
    new[flip] = ~new[flip]
    low, high = stats.paired_difference_interval(old, new)
    delta = new.mean() - old.mean()
    assert low < delta < high
    idx = rng.integers(0, 800, (4000, 800))
    boot = np.percentile(new[idx].mean(1) - old[idx].mean(1), [2.5, 97.5])
    assert abs(low - boot[0]) < 0.004 and abs(high - boot[1]) < 0.004
    w_old, w_new = stats.wilson(int(old.sum()), 800), stats.wilson(int(new.sum()), 800)
    unpaired = np.hypot(w_old[1] - w_old[0], w_new[1] - w_new[0])  # the width two independent samples would give
    assert high - low < 0.5 * unpaired
    same_low, same_high = stats.paired_difference_interval(old, old)  # a model against itself
    assert same_low <= 0 <= same_high and same_high - same_low < 0.01
    assert stats.paired_difference_interval(np.zeros(0, bool), np.zeros(0, bool)) is None


def test_gate_rule():
    assert not stats.fails(0.5, 1.0, 0.001, paired=True)       # within tolerance, however significant
    assert stats.fails(4.0, 1.0, 0.01, paired=True)            # beyond tolerance and significant
    assert not stats.fails(4.0, 1.0, 0.2, paired=True)         # beyond tolerance, could be chance
    assert stats.fails(4.0, 1.0, 0.2, paired=False)            # without the test the tolerance decides
    assert stats.fails(4.0, 1.0, None, paired=True)            # no paired test for this figure
    assert not stats.fails(None, 1.0, None, paired=False)


# ---------------------------------------------------------------------------------------------- where they show
def _case(n: int = 60, seed: int = 1):
    from semhinet_tf.taxonomy import Taxonomy

    tax = Taxonomy.default()
    rng = np.random.default_rng(seed)
    true = rng.integers(0, len(tax.leaves), n)
    return tax, true, {h.name: rng.dirichlet(np.ones(h.num_classes), n) for h in tax.heads}


def test_eval_json_holds_an_interval_next_to_every_ratio():
    from semhinet_tf.evaluate import evaluate

    tax, true, probs = _case()
    r = evaluate(true, probs, tax, "m", "keras")
    cm = np.array(r["leaf"]["confusion"])
    assert r["leaf"]["accuracy_ci"] == pytest.approx(list(stats.wilson(np.trace(cm), cm.sum())))
    j = tax.leaf_index("bridge")
    assert r["per_class"]["bridge"]["recall_ci"] == pytest.approx(list(stats.wilson(cm[j, j], cm[j].sum())))
    assert r["per_class"]["bridge"]["precision_ci"] == pytest.approx(list(stats.wilson(cm[j, j], cm[:, j].sum())))
    h1 = r["heads"]["h1"]
    for i, cls in enumerate(h1["labels"]):
        row = np.array(h1["confusion"])[i]
        lo, hi = h1["recall_ci"][cls]
        assert lo <= h1["recall"][cls] <= hi and (lo, hi) == pytest.approx(stats.wilson(row[i], row.sum()))
    point = r["coverage"]["operating_point"]
    assert point["automatic_n"] == round(point["coverage"] * 60)


def test_tables_and_report_show_intervals_and_warn_on_few_frames(tmp_path):
    from PIL import Image

    from semhinet_tf.evaluate import evaluate, format_summary_table
    from semhinet_tf.report import write_report

    tax, true, probs = _case(n=40)
    true[0] = tax.leaf_index("normal")  # one frame far more confident than the rest, and right
    probs["h1"][0] = [0.0005, 0.999, 0.0005]
    r = evaluate(true, probs, tax, "m", "keras", purity_target=0.99)
    table = format_summary_table({"m": r}, intervals=True)
    leaf_row = next(line for line in table.splitlines() if line.startswith("| leaf accuracy"))
    lo, hi = r["leaf"]["accuracy_ci"]
    assert f"[{lo:.2f}, {hi:.2f}]" in leaf_row and "*" not in leaf_row  # 40 frames behind it
    assert "*" in next(line for line in table.splitlines() if line.startswith("| h1 recall"))  # about 5 each
    paths = []
    for i in range(len(true)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((16, 16), i, np.uint8)).save(paths[-1])
    write_report(tmp_path / "rep", r, paths, true, probs, tax)
    text = (tmp_path / "rep" / "README.md").read_text()
    assert "rest on fewer than 30 images" in text and "h1 recall bogus (n=" in text
    assert f"leaf accuracy | {r['leaf']['accuracy']:.3f} [{lo:.2f}, {hi:.2f}] (n=40)" in text
    assert r["coverage"]["operating_point"]["automatic_n"] == 1  # the 0.99 target "reached" on one frame ...
    assert "Purity targets reached on fewer than 30 automatic images" in text and "0.99 on 1 image" in text
