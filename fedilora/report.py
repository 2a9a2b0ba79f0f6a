"""The report (``reports/report.md`` and its plots) from the federate and compare outputs: which
methods differ, in words first, then each variant's means and every pair on every summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from fedilora import comparison
from fedilora.atomic import atomic_path
from fedilora.plots import plot_clients, plot_diagnostics, plot_rounds


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


def _points(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:+.1f}"


VERDICT_WORDS = {"better": "the first is better", "worse": "the first is worse",
                 "indistinguishable": "indistinguishable from noise"}


def _pair_rows(pairs: pd.DataFrame, with_metric: bool) -> list[str]:
    return [("| " + r["metric"] + " " if with_metric else "") + f"| {r['a']} − {r['b']} | {_points(r['mean'])} | "
            f"[{_points(r['ci_low'])}, {_points(r['ci_high'])}] | {VERDICT_WORDS[r['verdict']]} |"
            for _, r in pairs.iterrows()]


def _variant_rows(table: pd.DataFrame, columns: list[str]) -> list[str]:
    def cell(row, c: str) -> str:
        if math.isnan(row[f"{c}_ci_low"]):
            return _fmt(row[c])
        return f"{row[c]:.3f} [{row[c + '_ci_low']:.3f}, {row[c + '_ci_high']:.3f}]"

    return ["| " + row["variant"] + " | " + " | ".join(cell(row, c) for c in columns) + " |" for _, row in table.iterrows()]


def _editing_lines(rounds: pd.DataFrame) -> list[str]:
    """Editing's fire rate and similarity per round, when the main run edits."""
    if "editing_fired_fraction" not in rounds:
        return ["Client editing is off in the main run.", ""]
    rows = rounds.dropna(subset=["editing_fired_fraction"])
    return [
        "Client editing: the fraction of sampled clients whose least similar tensor was edited (similarity "
        "below `editing.min_similarity`), and the mean cosine similarity of the selected tensors, per round:",
        "",
        "| round | fired | mean similarity |",
        "|---|---|---|",
        *[f"| {int(r['round'])} | {r['editing_fired_fraction']:.2f} | {r['editing_mean_similarity']:.3f} |" for _, r in rows.iterrows()],
        "",
    ]


def write_report(run_dir: Path, compare_dir: Path, report_dir: Path) -> Path:
    """reports/: which methods differ (paired over seeds, in words, first), each variant's means,
    every pair on every summary, the main run, and plots, from the federate and compare outputs."""
    report_dir, compare_dir = Path(report_dir), Path(compare_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rounds = pd.read_csv(compare_dir / "rounds.csv")
    table = pd.read_csv(compare_dir / "comparison.csv")
    pairs = pd.read_csv(compare_dir / "pairs.csv")
    summary = json.loads((compare_dir / "metrics.json").read_text())
    primary, seeds = summary["primary_metric"], summary["seeds"]
    headline = primary.removeprefix("global_").rsplit("_", 1)[0]
    columns = list(comparison.summary_metrics(headline))
    plot_rounds(rounds, report_dir / "global_accuracy.png", f"global_{headline}")
    plot_rounds(rounds, report_dir / "personalized_accuracy.png", f"personalized_{headline}")
    plot_clients(pd.read_csv(Path(run_dir) / "clients.csv"), report_dir / "clients.png")
    main = pd.read_json(Path(run_dir) / "metrics.json", typ="series")
    diagnostics = json.loads((Path(run_dir) / "diagnostics.json").read_text())["rounds"]
    plot_diagnostics(diagnostics, report_dir / "diagnostics.png")
    run_rounds = pd.read_csv(Path(run_dir) / "rounds.csv")
    text = [
        "# fedilora report",
        "",
        f"## Which methods differ ({primary.replace('_', ' ')}, paired over {seeds} seeds)",
        "",
        f"Each line: the first variant minus the second, in points, with its 95 % confidence interval over {seeds} "
        "seeds (Student t on the per-seed differences; within a seed every variant sees the same splits, clients "
        "and initial adapter). Only an interval that excludes 0 is a difference.",
        "",
        "| pair | difference | 95 % CI | verdict |",
        "|---|---|---|---|",
        *_pair_rows(pairs[pairs["metric"] == primary], with_metric=False),
        "",
        f"## Each variant (mean over {seeds} seeds, 95 % CI)",
        "",
        "| variant | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
        "|---|" + "---|" * len(columns),
        *_variant_rows(table, columns),
        "",
        "## Every pair on the other summaries (points)",
        "",
        "| metric | pair | difference | 95 % CI | verdict |",
        "|---|---|---|---|---|",
        *_pair_rows(pairs[pairs["metric"] != primary], with_metric=True),
        "",
        "## Main run (`federate`, one seed)",
        "",
        markdown_table(pd.DataFrame([main.to_dict()])),
        "",
        *_editing_lines(run_rounds),
        "Rank dimensions: how far the global adapter moved along each one per round, and how much of "
        "the move the highest-rank sampled client(s) and the largest single client supplied "
        "(`diagnostics.json`; MLflow `diagnostics/round_NNN.json` and `diag/*`).",
        "",
        "![rank-dimension diagnostics](diagnostics.png)",
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
