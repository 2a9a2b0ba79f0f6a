"""Run outputs as DVC reads them: metrics JSON, per-round CSV for plots, and the report.

Everything here reads and writes plain files; the flows decide when.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.figure import Figure

from fedilora.atomic import atomic_path, write_json

if TYPE_CHECKING:  # results arrive from the flows; the report stage itself reads only files
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
# so the multiclass default's files keep exactly the columns above.
EXTRA_METRICS = ("micro_f1", "auroc")


def round_columns(summary: dict[str, float]) -> dict[str, str]:
    """Logged name -> CSV column: the fixed ones, then the task's extra global/personalized metrics."""
    extra = {
        key: key.replace("/", "_")
        for key in summary
        if key.split("/")[0] in ("global", "personalized") and key.rsplit("/", 1)[-1] in EXTRA_METRICS
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
    return metrics


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_comparison(out_dir: Path, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All variants' rounds in one CSV (one line per variant in plots) and a final table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_rounds = pd.concat(frames.values(), ignore_index=True)
    _write_csv(all_rounds, out_dir / "rounds.csv")
    table = pd.DataFrame([{"variant": v, **final_metrics(f)} for v, f in frames.items()])
    _write_csv(table, out_dir / "comparison.csv")
    write_json(out_dir / "metrics.json", {row["variant"]: {k: row[k] for k in table.columns if k != "variant"} for _, row in table.iterrows()})
    return table


def plot_rounds(rounds: pd.DataFrame, path: Path, metric: str = "global_accuracy") -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for variant, group in rounds.groupby("variant", sort=False):
        ax.plot(group["round"], group[metric], marker="o", label=variant)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_clients(clients: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.bar(clients["client"].astype(str), clients["accuracy"])
    ax.set_xlabel("client")
    ax.set_ylabel("personalized accuracy")
    ax.set_ylim(0, 1)
    save_figure(fig, path)


def save_figure(fig: Figure, path: Path) -> None:
    """A PNG written atomically (a crash never leaves half an image where DVC expects a plot)."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def markdown_table(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return str(int(value)) if value.is_integer() and value > 1 else f"{value:.3f}"
    return str(value)


def write_report(run_dir: Path, compare_dir: Path, report_dir: Path) -> Path:
    """reports/: the comparison table and plots, from the federate and compare outputs."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rounds = pd.read_csv(Path(compare_dir) / "rounds.csv")
    table = pd.read_csv(Path(compare_dir) / "comparison.csv")
    plot_rounds(rounds, report_dir / "global_accuracy.png", "global_accuracy")
    plot_rounds(rounds, report_dir / "personalized_accuracy.png", "personalized_accuracy")
    plot_clients(pd.read_csv(Path(run_dir) / "clients.csv"), report_dir / "clients.png")
    main = pd.read_json(Path(run_dir) / "metrics.json", typ="series")
    text = [
        "# fedilora report",
        "",
        "## Main run",
        "",
        markdown_table(pd.DataFrame([main.to_dict()])),
        "",
        "## Methods compared (final round)",
        "",
        markdown_table(table),
        "",
        "![global accuracy per round](global_accuracy.png)",
        "![personalized accuracy per round](personalized_accuracy.png)",
        "![personalized accuracy per client](clients.png)",
        "",
    ]
    path = report_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(text))
    return path
