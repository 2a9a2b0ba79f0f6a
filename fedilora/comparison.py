"""A comparison of variants over seeds, as files: per (variant, seed) summaries, each variant's mean
with its interval, and every pair's paired difference with its 95 % CI and verdict
(``fedilora.stats``).

The primary metric is the task's headline metric on the global test split averaged over the last
3 rounds (less noisy than the final round, whose curves can still move); the final round and the
personalized metric are reported the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fedilora import stats
from fedilora.atomic import atomic_path, write_json

LAST_ROUNDS = 3


def summary_metrics(headline: str) -> dict[str, str]:
    """Summary name -> how it is computed from a run's rounds (column, 'last3' or 'final')."""
    return {
        f"global_{headline}_last{LAST_ROUNDS}": f"global_{headline}",
        f"global_{headline}_final": f"global_{headline}",
        f"personalized_{headline}_last{LAST_ROUNDS}": f"personalized_{headline}",
        f"personalized_{headline}_final": f"personalized_{headline}",
        "global_missing_image_accuracy_final": "global_missing_image_accuracy",
        "global_missing_text_accuracy_final": "global_missing_text_accuracy",
    }


def primary_metric(headline: str) -> str:
    return f"global_{headline}_last{LAST_ROUNDS}"


def seed_summary(rounds: pd.DataFrame, headline: str) -> dict[str, float]:
    """One run's summaries from its per-round frame (rows in round order)."""
    rounds = rounds.sort_values("round")
    out = {}
    for name, column in summary_metrics(headline).items():
        values = rounds[column] if column in rounds else pd.Series([math.nan])
        out[name] = float(values.tail(LAST_ROUNDS).mean() if name.endswith(f"last{LAST_ROUNDS}") else values.iloc[-1])
    return out


def summaries(rounds: pd.DataFrame, headline: str) -> pd.DataFrame:
    """One row per (variant, seed) from every run's rounds (columns variant, seed, round, ...)."""
    rows = [{"variant": v, "seed": s, **seed_summary(g, headline)} for (v, s), g in rounds.groupby(["variant", "seed"], sort=False)]
    return pd.DataFrame(rows)


def variant_table(per_seed: pd.DataFrame, variants: list[str], headline: str) -> pd.DataFrame:
    """Per variant: mean over seeds of each summary with its t interval."""
    rows = []
    for variant in variants:
        group = per_seed[per_seed["variant"] == variant]
        row = {"variant": variant, "seeds": len(group)}
        for name in summary_metrics(headline):
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = stats.mean_ci(group[name].to_numpy())
        rows.append(row)
    return pd.DataFrame(rows)


def pair_table(per_seed: pd.DataFrame, variants: list[str], headline: str) -> pd.DataFrame:
    """Every pair of variants, every summary: paired difference, CI, verdict."""
    frames = [stats.pairwise(per_seed, name, variants, method_col="variant") for name in summary_metrics(headline)]
    return pd.concat(frames, ignore_index=True)


def _round(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


def write(out_dir: Path, rounds: pd.DataFrame, variants: list[str], headline: str) -> dict:
    """``rounds.csv`` (every round of every run), ``seeds.csv`` (per run summaries),
    ``comparison.csv`` (per variant, mean and CI), ``pairs.csv`` (paired differences) and
    ``metrics.json`` (the primary metric's means and pairs, for ``dvc metrics``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_seed = summaries(rounds, headline)
    table = variant_table(per_seed, variants, headline)
    pairs = pair_table(per_seed, variants, headline)
    for frame, name in ((rounds, "rounds.csv"), (per_seed, "seeds.csv"), (table, "comparison.csv"), (pairs, "pairs.csv")):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    primary = primary_metric(headline)
    main = pairs[pairs["metric"] == primary]
    metrics = {
        "primary_metric": primary,
        "seeds": int(per_seed["seed"].nunique()),
        "variants": {row["variant"]: {k: _round(row[k]) for k in (primary, f"{primary}_ci_low", f"{primary}_ci_high")}
                     for _, row in table.iterrows()},
        "pairs": {f"{r['a']}_minus_{r['b']}": {"mean": _round(r["mean"]), "ci_low": _round(r["ci_low"]),
                                               "ci_high": _round(r["ci_high"]), "verdict": r["verdict"]}
                  for _, r in main.iterrows()},
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def verdict_lines(pairs: pd.DataFrame, metric: str) -> list[str]:
    """Each pair in words for ``metric`` (the report's first table)."""
    return [stats.sentence(r["a"], r["b"], r.to_dict()) for _, r in pairs[pairs["metric"] == metric].iterrows()]
