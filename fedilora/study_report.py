"""The quality study's report: a mean ± std table, the paper's claims checked against it, and
plots (accuracy vs missing rate per method; accuracy per round), global and personalized."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from fedilora import study as st
from fedilora.atomic import atomic_path
from fedilora.plots import save_figure

VIEWS = {"global_accuracy": "global", "personalized_accuracy": "personalized"}
RIVALS = ["hetlora", "flora", "flexlora"]


def write(study: st.StudyConfig, results: pd.DataFrame, out_dir: Path) -> dict:
    """``summary.csv``, ``results.csv`` (every round of every run), ``study.md`` and the PNGs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = st.summary_table(results)
    for frame, name in ((table, "summary.csv"), (results, "results.csv")):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    reference = _reference_setting(table)
    _plot_missing_rate(table, reference, out_dir / "accuracy_vs_missing_rate.png")
    _plot_rounds(results, reference, out_dir / "accuracy_per_round.png")
    claims = claim_checks(table)
    text = _markdown(study, results, table, claims, reference)
    if (out_dir / "FINDINGS.md").is_file():  # the interpretation, written by hand from these numbers
        text = text.replace("## Table", "Interpretation and diagnostics: [FINDINGS.md](FINDINGS.md).\n\n## Table", 1)
    with atomic_path(out_dir / "study.md") as tmp:
        tmp.write_text(text)
    return {"settings": int(table["setting"].nunique()), "runs": int(len(st.final_rows(results))), **claims}


def claim_checks(table: pd.DataFrame) -> dict:
    """The paper's claims as counts over settings where the methods ran, and mean margins."""
    out = {}
    for metric, view in VIEWS.items():
        won, total = st.wins(table, "fedilora", RIVALS, metric)
        out[f"fedilora_beats_baselines_{view}"] = f"{won}/{total}"
        won, total = st.wins(table, "fedilora+edit", ["fedilora"], metric)
        out[f"editing_improves_{view}"] = f"{won}/{total}"
        wide = table.pivot(index="setting", columns="method", values=metric)
        for rival in RIVALS + ["fedilora"]:
            mine = "fedilora+edit" if rival == "fedilora" else "fedilora"
            if {mine, rival} <= set(wide.columns):
                out[f"margin_{view}_{mine}_vs_{rival}"] = round(float((wide[mine] - wide[rival]).mean()), 4)
    return out


def _reference_setting(table: pd.DataFrame) -> pd.DataFrame:
    """The sweep over missing rate: heterogeneous ranks, the most skewed labels, pattern 'both'."""
    het = table[table["ranks"] == table["ranks"].iloc[0]]
    alpha = het["dirichlet_alpha"].min()
    return het[(het["dirichlet_alpha"] == alpha) & (het["pattern"] == "both")]


def _plot_missing_rate(table: pd.DataFrame, reference: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (metric, view) in zip(axes, VIEWS.items()):
        for method, rows in reference.groupby("method", sort=False):
            rows = rows.sort_values("missing_rate")
            ax.errorbar(rows["missing_rate"], rows[metric], yerr=rows[f"{metric}_std"], marker="o", capsize=3, label=method)
        ax.set(title=f"{view} accuracy (final round)", xlabel="missing rate (pattern: both)", ylabel="accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"ranks: {reference['ranks'].iloc[0]}, Dirichlet alpha {reference['dirichlet_alpha'].iloc[0]:g}; mean ± std over seeds")
    save_figure(fig, path)


def _plot_rounds(results: pd.DataFrame, reference: pd.DataFrame, path: Path) -> None:
    rates = sorted(reference["missing_rate"].unique())
    setting = reference[reference["missing_rate"] == rates[len(rates) // 2]]["setting"].iloc[0]
    rows = results[results["setting"] == setting]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (metric, view) in zip(axes, VIEWS.items()):
        curves = rows.groupby(["method", "round"], sort=False)[metric].agg(["mean", "std"]).reset_index()
        for method, curve in curves.groupby("method", sort=False):
            ax.plot(curve["round"], curve["mean"], marker="o", label=method)
            ax.fill_between(curve["round"], curve["mean"] - curve["std"], curve["mean"] + curve["std"], alpha=0.15)
        ax.set(title=f"{view} accuracy per round", xlabel="round", ylabel="accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"setting {setting}; mean ± std over seeds")
    save_figure(fig, path)


def _markdown(study: st.StudyConfig, results: pd.DataFrame, table: pd.DataFrame, claims: dict, reference: pd.DataFrame) -> str:
    total_edits = results.groupby("method")["edits"].sum()
    lines = [
        "# Quality study",
        "",
        f"{table['setting'].nunique()} settings x {len(study.seeds)} seeds, {len(st.final_rows(results))} runs; "
        f"every run: {results['round'].max()} rounds. Rank sets: "
        + ", ".join(f"{k} = {v}" for k, v in study.rank_sets.items())
        + ". Values: final-round accuracy, mean ± std over seeds. Generated by `fedilora study`.",
        "",
        "## The paper's claims here",
        "",
        f"- FediLoRA (no editing) beats HetLoRA, FLoRA and FlexLoRA (all three) in "
        f"{claims['fedilora_beats_baselines_global']} settings globally and {claims['fedilora_beats_baselines_personalized']} personalized.",
        f"- Editing improves FediLoRA in {claims['editing_improves_global']} settings globally and "
        f"{claims['editing_improves_personalized']} personalized; edits applied over all runs: "
        + ", ".join(f"{m} {int(n)}" for m, n in total_edits.items()) + ".",
        "- Mean margins over settings (positive: the first is better): "
        + ", ".join(f"{k.removeprefix('margin_')} {v:+.4f}" for k, v in claims.items() if k.startswith("margin_"))
        + ".",
        "",
        "![accuracy vs missing rate](accuracy_vs_missing_rate.png)",
        "",
        "![accuracy per round](accuracy_per_round.png)",
        "",
        "## Table",
        "",
        "| setting | method | global | personalized | global, image absent | global, text absent |",
        "|---|---|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        cells = [st.mean_std(row[m], row[f"{m}_std"]) for m in st.FINAL_METRICS]
        lines.append(f"| {row['setting']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
