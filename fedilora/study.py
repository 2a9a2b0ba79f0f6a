"""The quality study: every method on a grid of rank sets, missing-modality settings, label
skews and seeds, run on one base model with splits made in memory.

The grid is a union of *sweeps*: each sweep crosses its own factor levels, so a study can vary
one factor at a time around a reference setting (what fits in an hour on 2 cores) or cross
everything (``study.full_grid``) when there is more compute. One (setting, seed) pair is the
unit of work: its splits are made once and every method runs on them, so methods differ only
in how they aggregate.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedilora import methods, variants
from fedilora.config import ConfigError, Params, RunnerConfig, load_params
from fedilora.data import make_splits
from fedilora.federation import Federation, run
from fedilora.inputs import FeatureTable

Pattern = Literal["image", "text", "both"]


class Sweep(BaseModel):
    """Factor levels crossed with each other; rate 0 ignores the pattern (nothing is missing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ranks: list[str]
    dirichlet_alpha: list[Annotated[float, Field(gt=0.0)]]
    missing_rate: list[Annotated[float, Field(ge=0.0, le=1.0)]]
    pattern: list[Pattern] = ["both"]


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base_params: Path = Path("params.yaml")
    overrides: dict[str, object] = Field(default_factory=dict)  # dotted keys, applied to every run
    methods: list[str]
    seeds: list[int]
    rank_sets: dict[str, list[Annotated[int, Field(gt=0)]]]
    sweeps: dict[str, Sweep]
    full_grid: bool = False  # cross every level of every sweep instead of the union of sweeps
    experiment: str = "fedilora-study"
    runner: RunnerConfig = RunnerConfig(task_runner="dask", n_workers=2)  # a process per core
    out_dir: Path = Path("outputs/study")
    report_dir: Path = Path("reports/study")

    @model_validator(mode="after")
    def _known_names(self) -> "StudyConfig":
        for method in self.methods:
            name, _, suffix = method.partition("+")
            if name not in methods.REGISTRY or suffix not in ("", "edit"):
                raise ValueError(f"methods: unknown method {method!r}; expected one of {sorted(methods.REGISTRY)}, optionally with '+edit'")
        for sweep_name, sweep in self.sweeps.items():
            unknown = [r for r in sweep.ranks if r not in self.rank_sets]
            if unknown:
                raise ValueError(f"sweeps.{sweep_name}.ranks: {unknown} not in rank_sets {sorted(self.rank_sets)}")
        return self


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        return StudyConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{path}: {where}") from None


class Setting(BaseModel):
    model_config = ConfigDict(frozen=True)
    ranks: str
    dirichlet_alpha: float
    missing_rate: float
    pattern: Pattern

    @property
    def name(self) -> str:
        missing = "complete" if self.missing_rate == 0 else f"{self.pattern}{self.missing_rate:g}"
        return f"{self.ranks}-dir{self.dirichlet_alpha:g}-{missing}"


def settings(study: StudyConfig) -> list[Setting]:
    """The study's settings, deduplicated, in a stable order."""
    sweeps = list(study.sweeps.values())
    if study.full_grid:
        levels = {f: sorted({v for s in sweeps for v in getattr(s, f)}, key=str) for f in Sweep.model_fields}
        sweeps = [Sweep(**levels)]
    found: dict[str, Setting] = {}
    for sweep in sweeps:
        for ranks, alpha, rate, pattern in itertools.product(sweep.ranks, sweep.dirichlet_alpha, sweep.missing_rate, sweep.pattern):
            setting = Setting(ranks=ranks, dirichlet_alpha=alpha, missing_rate=rate, pattern="both" if rate == 0 else pattern)
            found.setdefault(setting.name, setting)
    return list(found.values())


def methods_for(study: StudyConfig, setting: Setting) -> list[str]:
    """FedAvg is defined for equal ranks only."""
    equal = len(set(study.rank_sets[setting.ranks])) == 1
    return [m for m in study.methods if equal or not m.startswith("fedavg")]


def run_params(study: StudyConfig, setting: Setting, seed: int) -> Params:
    ranks = study.rank_sets[setting.ranks]
    overrides = {
        **study.overrides,
        "seed": seed,
        "clients.ranks": ranks,
        "clients.partition": "dirichlet",
        "clients.dirichlet_alpha": setting.dirichlet_alpha,
        "missing.rate": setting.missing_rate,
        "missing.pattern": setting.pattern,
        "compare.variants": [m for m in study.methods if len(set(ranks)) == 1 or not m.startswith("fedavg")],
    }
    if len(ranks) > 1:
        overrides["clients.num_clients"] = len(ranks)
    return load_params(study.base_params, overrides)


def unit_key(study: StudyConfig, setting: Setting, seed: int) -> str:
    """File name of a finished (setting, seed): changed params or methods give a new name, so a
    resumed study never reuses a result computed under other settings."""
    content = run_params(study, setting, seed).model_dump_json() + ",".join(methods_for(study, setting))
    return f"{setting.name}-seed{seed}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"


def run_method(fed: Federation) -> list[dict]:
    """All rounds of one method (``federation.run``); global accuracy every round, each missing
    pattern after the last one."""
    _, results = run(fed, missing_every_round=False)
    return [
        {
            "round": r.round,
            **{f"global_{k}": v for k, v in r.global_metrics.items()},
            "personalized_accuracy": r.summary()["personalized/accuracy"],
            "edits": sum(e.edited for u in r.updates for e in u.edits),
        }
        for r in results
    ]


def run_setting(study: StudyConfig, setting: Setting, seed: int, table: FeatureTable, model_for) -> pd.DataFrame:
    """Every method on one (setting, seed): the same splits, the same initial adapter.
    ``model_for(params)`` returns the shared base model (one per process and rank layout)."""
    params = run_params(study, setting, seed)
    splits = make_splits(table.labels.numpy(), params)
    frames = []
    for method in methods_for(study, setting):
        vparams = variants.resolve(params, method)
        fed = Federation(vparams, table, splits, model=model_for(vparams))
        frame = pd.DataFrame(run_method(fed))
        frame.insert(0, "method", method)
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    for column, value in (("seed", seed), ("pattern", setting.pattern), ("missing_rate", setting.missing_rate),
                          ("dirichlet_alpha", setting.dirichlet_alpha), ("ranks", setting.ranks), ("setting", setting.name)):
        out.insert(0, column, value)
    return out


# --------------------------------------------------------------------------- summaries

FINAL_METRICS = ("global_accuracy", "personalized_accuracy", "global_missing_image/accuracy", "global_missing_text/accuracy")


def final_rows(results: pd.DataFrame) -> pd.DataFrame:
    last = results.groupby(["setting", "seed", "method"])["round"].transform("max")
    return results[results["round"] == last]


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the final-round metrics, per setting and method."""
    final = final_rows(results)
    keys = ["setting", "ranks", "dirichlet_alpha", "missing_rate", "pattern", "method"]
    grouped = final.groupby(keys, sort=False)[list(FINAL_METRICS)]
    table = grouped.mean().join(grouped.std(ddof=1), rsuffix="_std").join(grouped.size().rename("seeds"))
    return table.reset_index()


def wins(table: pd.DataFrame, method: str, rivals: list[str], metric: str) -> tuple[int, int]:
    """In how many settings ``method``'s mean beats every rival's (ties count as not beating)."""
    won = total = 0
    for _, group in table.groupby("setting", sort=False):
        means = group.set_index("method")[metric]
        present = [r for r in rivals if r in means.index]
        if method not in means.index or not present:
            continue
        total += 1
        won += bool(means[method] > means[present].max())
    return won, total


def mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f}"
