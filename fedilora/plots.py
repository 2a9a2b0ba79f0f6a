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


def plot_diagnostics(rounds: list[dict], path: Path) -> None:
    """Left: how far the global adapter moved along each rank dimension, round by round (the
    norm of the change, a heat map). Right: the highest-rank sampled client's and the largest
    client's share of the change per round (``fedilora.diagnostics``)."""
    fig = Figure(figsize=(11, 4))
    heat, shares = fig.subplots(1, 2)
    norms = [[d.get("change_norm", float("nan")) for d in r.get("dimensions", [])] for r in rounds]
    width = max((len(n) for n in norms), default=0)
    grid = [n + [float("nan")] * (width - len(n)) for n in norms]
    if width:
        image = heat.imshow(list(map(list, zip(*grid))), aspect="auto", origin="lower", cmap="viridis",
                            extent=(0.5, len(rounds) + 0.5, -0.5, width - 0.5))
        fig.colorbar(image, ax=heat, label="norm of the global change")
    heat.set(title="global change per rank dimension", xlabel="round", ylabel="rank dimension j")
    x = [r["round"] for r in rounds]
    for key, label in (("highest_rank_share", "highest-rank client(s)"), ("top_client_share", "largest single client")):
        shares.plot(x, [r.get("summary", {}).get(key, float("nan")) for r in rounds], marker="o", label=label)
    shares.set(title="share of the global change", xlabel="round", ylabel="share", ylim=(0, 1.05))
    shares.grid(alpha=0.3)
    shares.legend(fontsize=8)
    save_figure(fig, path)
