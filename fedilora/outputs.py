"""A run's outputs as DVC and the report read them: the per-round frame, each client's latest
personalized accuracy, and the final metrics, written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from fedilora.atomic import atomic_path, write_json

if TYPE_CHECKING:  # results arrive from the round loop; nothing here runs it
    from fedilora.federation import RoundResult

ROUND_COLUMNS = {
    "global/accuracy": "global_accuracy",
    "global/macro_f1": "global_macro_f1",
    "global/missing_image/accuracy": "global_missing_image_accuracy",
    "global/missing_text/accuracy": "global_missing_text_accuracy",
    "personalized/accuracy": "personalized_accuracy",
    "personalized/macro_f1": "personalized_macro_f1",
}
# Metrics of binary and multi-label tasks (fedilora.metrics): extra columns when a run has them,
# so the multiclass default's files keep exactly the columns above; likewise editing's fire rate
# and similarity (rounds where editing ran) and the rank-dimension diagnostics' summaries.
EXTRA_METRICS = ("micro_f1", "auroc")
EXTRA_GROUPS = ("editing", "diag")


def round_columns(summary: dict[str, float]) -> dict[str, str]:
    """Logged name -> CSV column: the fixed ones, then the task's extra global/personalized
    metrics, editing's and the diagnostics' summaries."""
    extra = {
        key: key.replace("/", "_")
        for key in summary
        if (key.split("/")[0] in ("global", "personalized") and key.rsplit("/", 1)[-1] in EXTRA_METRICS)
        or key.split("/")[0] in EXTRA_GROUPS
    }
    return {**ROUND_COLUMNS, **extra}


def rounds_frame(results: list[RoundResult], variant: str) -> pd.DataFrame:
    rows = []
    for res in results:
        summary = res.summary()
        rows.append({"variant": variant, "round": res.round, **{col: summary.get(k, float("nan")) for k, col in round_columns(summary).items()}})
    return pd.DataFrame(rows)


def clients_frame(results: list[RoundResult]) -> pd.DataFrame:
    """Each client's latest personalized accuracy (from the last round it took part in)."""
    latest: dict[int, tuple[int, float]] = {}
    for res in results:
        for u in res.updates:
            latest[u.client] = (res.round, u.metrics["accuracy"])
    return pd.DataFrame(
        [{"client": c, "round": r, "accuracy": a} for c, (r, a) in sorted(latest.items())]
    )


def final_metrics(frame: pd.DataFrame) -> dict[str, float]:
    last = frame.iloc[-1]
    out = {col: _clean(last[col]) for col in frame.columns if col not in ("variant", "round")}
    out["best_global_accuracy"] = _clean(frame["global_accuracy"].max())
    out["rounds"] = int(last["round"])
    return out


def _clean(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def write_run_outputs(out_dir: Path, results: list[RoundResult], variant: str) -> dict[str, float]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = rounds_frame(results, variant)
    _write_csv(frame, out_dir / "rounds.csv")
    _write_csv(clients_frame(results), out_dir / "clients.csv")
    metrics = final_metrics(frame)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "diagnostics.json", {"rounds": [{"round": r.round, **r.diagnostics} for r in results]})
    return metrics


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
