"""Paired differences over seeds against hand computations (Student t)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fedilora.stats import mean_ci, paired_difference, pairwise, sentence


def test_paired_t_interval_by_hand() -> None:
    # d = (1, 2, 3): mean 2, sd 1, t(0.975, 2) = 4.302652729911275 -> half-width 4.3027 / sqrt(3)
    diff = paired_difference([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert diff.mean == pytest.approx(2.0)
    assert (diff.ci_low, diff.ci_high) == pytest.approx((2.0 - half, 2.0 + half))
    assert diff.seeds == 3 and diff.verdict == "indistinguishable"  # the interval holds 0


def test_verdicts_follow_the_interval() -> None:
    # d = (1, 1.1, .9, 1.05, .95): mean 1, sd sqrt(.025 / 4), t(0.975, 4) = 2.7764451051977987
    a = [1.0, 1.1, 0.9, 1.05, 0.95]
    better = paired_difference(a, [0.0] * 5)
    half = 2.7764451051977987 * math.sqrt(0.025 / 4) / math.sqrt(5)
    assert (better.ci_low, better.ci_high) == pytest.approx((1 - half, 1 + half))
    assert better.verdict == "better"
    assert paired_difference([0.0] * 5, a).verdict == "worse"
    single = paired_difference([0.8], [0.7])
    assert single.verdict == "indistinguishable" and math.isnan(single.ci_low) and single.mean == pytest.approx(0.1)


def test_pairing_uses_the_seed_not_the_order() -> None:
    table = pd.DataFrame({
        "seed": [0, 1, 2, 2, 1, 0],
        "method": ["a", "a", "a", "b", "b", "b"],
        "acc": [0.5, 0.6, 0.7, 0.6, 0.5, 0.4],  # a - b = +0.1 in every seed
    })
    out = pairwise(table, "acc", ["a", "b"])
    assert len(out) == 1 and out.loc[0, "mean"] == pytest.approx(0.1) and out.loc[0, "ci_low"] == pytest.approx(0.1)
    assert out.loc[0, "verdict"] == "better" and out.loc[0, "seeds"] == 3


def test_bad_samples_are_named() -> None:
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([1.0, float("nan")], [1.0, 2.0])


def test_mean_ci_and_sentence() -> None:
    mean, low, high = mean_ci([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and high - mean == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    text = sentence("fedilora", "hetlora", paired_difference([0.9, 0.91, 0.92], [0.8, 0.8, 0.8]))
    assert text.startswith("fedilora − hetlora: +11.0 points, 95 % CI [") and text.endswith("fedilora is better")
