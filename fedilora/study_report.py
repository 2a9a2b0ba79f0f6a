"""The quality study's report: the paper's claims with paired 95 % CIs, in the reference regime
first, then per setting; the ablations; editing's fire rate; and plots with intervals."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from fedilora import comparison, stats
from fedilora import study as st
from fedilora.atomic import atomic_path
from fedilora.plots import save_figure

VIEWS = {"global": "global", "personalized": "personalized"}


def headline_of(results: pd.DataFrame) -> str:
    for metric in ("auroc", "micro_f1"):
        if f"global_{metric}" in results:
            return metric
    return "accuracy"


def primary_metrics(headline: str) -> dict[str, str]:
    """view -> the summary a claim is decided on (mean of the last 3 rounds)."""
    last = comparison.LAST_ROUNDS
    return {view: f"{view}_{headline}_last{last}" for view in VIEWS}


def summary_table(seeds_table: pd.DataFrame, headline: str) -> pd.DataFrame:
    """Per (setting, variant): each summary's mean over seeds with its t interval."""
    rows = []
    for (setting, variant), group in seeds_table.groupby(["setting", "variant"], sort=False):
        row = {"setting": setting, "variant": variant, "seeds": len(group)}
        for name in comparison.summary_metrics(headline):
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = stats.mean_ci(group[name].to_numpy())
        rows.append(row)
    return pd.DataFrame(rows)


def claim_counts(verdicts: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per claim and metric: in how many settings it holds (better), fails (worse), or cannot be told."""
    out = {}
    for (claim, metric), group in verdicts.groupby(["claim", "metric"], sort=False):
        counts = group["verdict"].value_counts()
        out[f"{claim} ({metric})"] = {v: int(counts.get(v, 0)) for v in ("better", "worse", "indistinguishable")}
    return out


def write(study: st.StudyConfig, results: pd.DataFrame, out_dir: Path) -> dict:
    """``results.csv`` (every round of every run), ``seeds.csv``, ``summary.csv``, ``verdicts.csv``,
    ``ablations.csv``, ``study.md`` and the plots; returns the claim counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headline = headline_of(results)
    seeds_table = st.per_seed(results, headline)
    table = summary_table(seeds_table, headline)
    metrics = list(primary_metrics(headline).values())
    verdicts = st.verdicts(study, seeds_table, metrics)
    ablations = st.ablation_table(study, seeds_table, metrics[0])
    for frame, name in ((results, "results.csv"), (seeds_table, "seeds.csv"), (table, "summary.csv"),
                        (verdicts, "verdicts.csv"), (ablations, "ablations.csv")):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    _plot_missing_rate(study, table, headline, out_dir / "accuracy_vs_missing_rate.png")
    _plot_rounds(results, study.variants, headline, out_dir / "accuracy_per_round.png")
    _plot_shares(results, out_dir / "diagnostics_share.png")
    counts = claim_counts(verdicts)
    text = _markdown(study, results, table, verdicts, ablations, counts, headline)
    if (out_dir / "FINDINGS.md").is_file():  # the interpretation, written by hand from these numbers
        text = text.replace("## The paper's claims", "Interpretation: [FINDINGS.md](FINDINGS.md).\n\n## The paper's claims", 1)
    with atomic_path(out_dir / "study.md") as tmp:
        tmp.write_text(text)
    return {"settings": len(st.setting_names(study)), "runs": int(len(seeds_table)), "claims": counts}


# --------------------------------------------------------------------------- plots


def _missing_rate(study: st.StudyConfig, setting: str) -> float | None:
    """The setting's missing rate when it differs from the reference only in that (else None)."""
    changed = set(study.settings[setting].overrides) if setting in study.settings else set()
    if setting != st.REFERENCE and changed != {"missing.rate"}:
        return None
    rate = st.setting_params(study, setting, study.seeds[0]).missing.rate
    return rate if isinstance(rate, float) else None


def _plot_missing_rate(study: st.StudyConfig, table: pd.DataFrame, headline: str, path: Path) -> None:
    rates = {s: r for s in st.setting_names(study) if (r := _missing_rate(study, s)) is not None}
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    rows = table[table["setting"].isin(rates) & table["variant"].isin(study.variants)].copy()
    rows["rate"] = rows["setting"].map(rates)
    for ax, (view, metric) in zip(axes, primary_metrics(headline).items()):
        for variant, group in rows.groupby("variant", sort=False):
            group = group.sort_values("rate")
            err = [(group[metric] - group[f"{metric}_ci_low"]).fillna(0), (group[f"{metric}_ci_high"] - group[metric]).fillna(0)]
            ax.errorbar(group["rate"], group[metric], yerr=err, marker="o", capsize=3, label=variant)
        ax.set(title=f"{view} {headline}, mean of the last {comparison.LAST_ROUNDS} rounds", xlabel="missing rate", ylabel=headline)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("mean over seeds with 95 % CI; the other factors at the reference")
    save_figure(fig, path)


def _plot_rounds(results: pd.DataFrame, variants: list[str], headline: str, path: Path) -> None:
    """The methods' curves at the reference (the ablations are in their own table)."""
    rows = results[(results["setting"] == st.REFERENCE) & results["variant"].isin(variants)]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, view in zip(axes, VIEWS):
        metric = f"{view}_{headline}"
        for variant, group in rows.groupby("variant", sort=False):
            curve = [(r, *stats.mean_ci(g[metric].to_numpy())) for r, g in group.groupby("round")]
            x, mean, low, high = (list(v) for v in zip(*curve))
            ax.plot(x, mean, marker="o", markersize=3, label=variant)
            ax.fill_between(x, low, high, alpha=0.12)
        ax.set(title=f"{view} {headline} per round (reference)", xlabel="round", ylabel=headline)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("mean over seeds with 95 % CI band")
    save_figure(fig, path)


def _plot_shares(results: pd.DataFrame, path: Path) -> None:
    rows = results[results["setting"] == st.REFERENCE]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if "diag_highest_rank_share" in rows:
        for variant, group in rows.dropna(subset=["diag_highest_rank_share"]).groupby("variant", sort=False):
            curve = group.groupby("round")["diag_highest_rank_share"].mean()
            ax.plot(curve.index, curve.values, marker="o", markersize=3, label=variant)
    ax.set(title="highest-rank clients' share of the global change (reference)", xlabel="round", ylabel="share (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


# --------------------------------------------------------------------------- markdown


def _pts(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:+.1f}"


def _diff_cell(row: pd.Series) -> str:
    mark = {"better": " ✓", "worse": " ✗", "indistinguishable": ""}[row["verdict"]]
    return f"{_pts(row['mean'])} [{_pts(row['ci_low'])}, {_pts(row['ci_high'])}]{mark}"


def _claims_table(verdicts: pd.DataFrame, metric: str, settings: list[str]) -> list[str]:
    claims = list(dict.fromkeys(verdicts["claim"]))
    lines = ["| setting | " + " | ".join(claims) + " |", "|---|" + "---|" * len(claims)]
    for setting in settings:
        cells = []
        for claim in claims:
            hit = verdicts[(verdicts["setting"] == setting) & (verdicts["claim"] == claim) & (verdicts["metric"] == metric)]
            cells.append(_diff_cell(hit.iloc[0]) if len(hit) else "–")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def _setting_line(study: st.StudyConfig, setting: str) -> str:
    changes = study.reference if setting == st.REFERENCE else study.settings[setting].overrides
    what = ", ".join(f"`{k}: {v}`" for k, v in changes.items()) or "the base params"
    return f"- **{setting}** ({len(st.seeds_for(study, setting))} seeds): {what}"


def _markdown(study: st.StudyConfig, results: pd.DataFrame, table: pd.DataFrame, verdicts: pd.DataFrame,
              ablations: pd.DataFrame, counts: dict, headline: str) -> str:
    settings = st.setting_names(study)
    primary = primary_metrics(headline)
    rounds = int(results["round"].max())
    lines = [
        "# Quality study",
        "",
        f"Generated by `fedilora study` from `{len(results.groupby(['setting', 'variant', 'seed']))}` runs of up to "
        f"{rounds} rounds. Every difference below is paired over seeds (within a seed every variant sees the same splits, "
        "clients and initial adapter): the mean of the per-seed differences in points with its 95 % CI (Student t). "
        "✓ marks an interval above 0, ✗ one below 0; anything else is indistinguishable from noise at this number of seeds. "
        f"Metric: {headline} on the global test split (or each client's own test split, personalized), the mean of the last "
        f"{comparison.LAST_ROUNDS} rounds.",
        "",
        "Settings (the reference is the paper's regime; each other setting changes it as said):",
        "",
        *[_setting_line(study, s) for s in settings],
        "",
        "## The paper's claims",
        "",
        "A claim holds in a setting only where its interval excludes 0 in its favour.",
        "",
        "| claim | holds | fails | cannot be told |",
        "|---|---|---|---|",
        *[f"| {claim} | {c['better']} | {c['worse']} | {c['indistinguishable']} |" for claim, c in counts.items()],
        "",
    ]
    for view, metric in primary.items():
        lines += [f"### {view.capitalize()} ({metric})", "", *_claims_table(verdicts, metric, settings), ""]
    if len(ablations):
        lines += [
            "## Ablations at the reference",
            "",
            f"Each row: the ablation's change against what it is measured against, and its margin over the best baseline "
            f"({ablations['best_baseline'].iloc[0] if 'best_baseline' in ablations else '–'}), in points, {primary['global']}.",
            "",
            "| ablation | variant + overrides | against | change [95 % CI] | margin over best baseline [95 % CI] |",
            "|---|---|---|---|---|",
        ]
        for _, row in ablations.iterrows():
            over = ", ".join(f"`{k}: {v}`" for k, v in study.ablations[row["ablation"]].overrides.items())
            change = {"mean": row["change_mean"], "ci_low": row["change_ci_low"], "ci_high": row["change_ci_high"], "verdict": row["change_verdict"]}
            margin = ({"mean": row["margin_mean"], "ci_low": row["margin_ci_low"], "ci_high": row["margin_ci_high"],
                       "verdict": row["margin_verdict"]} if "margin_mean" in row else None)
            lines.append(f"| {row['ablation']} | {row['variant']} {over} | {row['against']} | {_diff_cell(pd.Series(change))} | "
                         f"{_diff_cell(pd.Series(margin)) if margin else '–'} |")
        lines.append("")
    fired = results.dropna(subset=["editing_fired_fraction"]) if "editing_fired_fraction" in results else results.iloc[:0]
    if len(fired):
        rate = fired.groupby(["setting", "variant"], sort=False)[["editing_fired_fraction", "editing_mean_similarity"]].mean()
        lines += ["## Client editing", "", "Fraction of sampled clients whose least similar `lora_A` tensor was edited "
                  "(similarity below 0.95), and the selected tensors' mean similarity, over rounds 2 onwards and seeds:", "",
                  "| setting | variant | fired | mean similarity |", "|---|---|---|---|",
                  *[f"| {s} | {v} | {r['editing_fired_fraction']:.2f} | {r['editing_mean_similarity']:.3f} |" for (s, v), r in rate.iterrows()], ""]
    lines += [
        "![accuracy vs missing rate](accuracy_vs_missing_rate.png)",
        "",
        "![accuracy per round](accuracy_per_round.png)",
        "",
        "![share of the global change](diagnostics_share.png)",
        "",
        "## Every variant in every setting (mean over seeds [95 % CI])",
        "",
        f"| setting | variant | seeds | {primary['global']} | {primary['personalized']} | global final | image absent (final) | text absent (final) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    final = f"global_{headline}_final"
    for _, row in table.iterrows():
        cells = [_mean_ci(row, m) for m in (primary["global"], primary["personalized"], final,
                                             "global_missing_image_accuracy_final", "global_missing_text_accuracy_final")]
        lines.append(f"| {row['setting']} | {row['variant']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_ci(row: pd.Series, metric: str) -> str:
    if math.isnan(row[metric]):
        return "–"
    if math.isnan(row[f"{metric}_ci_low"]):
        return f"{row[metric]:.3f}"
    return f"{row[metric]:.3f} [{row[f'{metric}_ci_low']:.3f}, {row[f'{metric}_ci_high']:.3f}]"
