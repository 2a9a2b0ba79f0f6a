"""The pipeline's plots as PNG files (matplotlib's object API: no global backend to choose)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from fedilora import stats
from fedilora.atomic import atomic_path


def plot_rounds(rounds: pd.DataFrame, path: Path, metric: str = "global_accuracy") -> None:
    """``metric`` per round, one line per variant: the mean over seeds, with its 95 % interval as a
    band when there are several seeds."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    seeds = rounds["seed"].nunique() if "seed" in rounds else 1
    for variant, group in rounds.groupby("variant", sort=False):
        curve = [(r, *stats.mean_ci(g[metric].to_numpy())) for r, g in group.groupby("round")]
        x, mean, low, high = (list(v) for v in zip(*curve))
        ax.plot(x, mean, marker="o", label=variant)
        if seeds > 1:
            ax.fill_between(x, low, high, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", " ") + (f"\n(mean, 95 % CI over {seeds} seeds)" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
