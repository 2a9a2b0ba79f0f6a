"""Paired comparisons over seeds: a difference of two methods with its 95 % confidence interval
and a verdict.

Within a seed every method sees the same splits, the same sampled clients and the same initial
adapter, so the per-seed differences d_s = metric(a, s) - metric(b, s) remove everything the
methods share. The interval is Student's t on those paired differences,
mean(d) +- t_{n-1, 0.975} * sd(d) / sqrt(n), which assumes the differences are roughly normal
across seeds (with 3-10 seeds there is too little data for a bootstrap to do better). A
difference is *better* or *worse* only when its interval excludes 0; otherwise the two methods are
*indistinguishable* at this number of seeds. One seed gives no interval: indistinguishable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
Verdict = Literal["better", "worse", "indistinguishable"]


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    ci_low: float
    ci_high: float
    seeds: int
    verdict: Verdict

    def as_dict(self) -> dict:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """``a - b`` over paired seeds (the same index is the same seed)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) != len(b) or len(d) == 0:
        raise ValueError(f"paired samples need equal, non-zero lengths; got {len(a)} and {len(b)}")
    if np.isnan(d).any():
        raise ValueError("paired samples hold NaN: a seed without a value for one of the methods")
    mean, n = float(d.mean()), len(d)
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, n, "indistinguishable")
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    low, high = mean - half, mean + half
    verdict: Verdict = "better" if low > 0 else "worse" if high < 0 else "indistinguishable"
    return PairedDifference(mean, low, high, n, verdict)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean over seeds and its t interval (a method's own spread, for tables and plots)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) < 2:
        return float(x[0]), math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


def pairwise(table: pd.DataFrame, metric: str, methods: Sequence[str], *, by: str = "seed",
             method_col: str = "method") -> pd.DataFrame:
    """Every ordered pair (a, b), a listed before b, of ``methods`` that share seeds: the paired
    difference of ``metric`` (``table`` has one row per method and seed)."""
    wide = table.pivot_table(index=by, columns=method_col, values=metric, aggfunc="first")
    rows = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            if a not in wide or b not in wide:
                continue
            both = wide[[a, b]].dropna()
            if both.empty:
                continue
            diff = paired_difference(both[a].to_numpy(), both[b].to_numpy())
            rows.append({"a": a, "b": b, "metric": metric, **diff.as_dict()})
    return pd.DataFrame(rows, columns=["a", "b", "metric", "mean", "ci_low", "ci_high", "seeds", "verdict"])


def sentence(a: str, b: str, diff: PairedDifference | dict, unit: float = 100.0, what: str = "points") -> str:
    """``a − b`` in words: the difference, its interval and whether it is distinguishable from noise."""
    d = diff if isinstance(diff, dict) else diff.as_dict()
    if d["seeds"] < 2 or math.isnan(d["ci_low"]):
        return f"{a} − {b}: {unit * d['mean']:+.1f} {what} (one seed: no interval)"
    verdict = {"better": f"{a} is better", "worse": f"{a} is worse",
               "indistinguishable": "indistinguishable from noise"}[d["verdict"]]
    return (f"{a} − {b}: {unit * d['mean']:+.1f} {what}, 95 % CI [{unit * d['ci_low']:+.1f}, "
            f"{unit * d['ci_high']:+.1f}] over {d['seeds']} seeds: {verdict}")
