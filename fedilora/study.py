"""The quality study: the paper's claims tested in the paper's regime (the *reference* setting),
then one factor at a time around it, each comparison paired over seeds with its 95 % CI
(``fedilora.stats``), plus ablations at the reference (the official code's behaviours one by one,
a server learning rate for every method alike).

Every setting, variant and ablation is a set of dotted param overrides on the base params file, so
the study file says exactly what differs from a plain run. One (setting, seed) pair is the unit of
work: its splits are made once and every variant runs on them, so variants differ only in what
their overrides change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedilora import comparison, stats, variants
from fedilora.config import ConfigError, Params, RunnerConfig, load_params, with_overrides
from fedilora.data.splits import make_splits
from fedilora.federation import Federation, run
from fedilora.inputs import FeatureTable
from fedilora.outputs import rounds_frame

REFERENCE = "reference"
MAIN, RIVALS, EDITED = "fedilora", ("hetlora", "flora", "flexlora"), "fedilora+edit"
Overrides = dict[str, Any]


class Ablation(BaseModel):
    """A variant at the reference with more overrides; ``against``: the variant it is measured
    against (default: its own variant without the overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    variant: str
    overrides: Overrides = Field(default_factory=dict)
    against: str | None = None


class Setting(BaseModel):
    """Overrides of the reference, and optionally the variants this setting runs instead of the
    study's (``variants``) and besides them (``extra``). A plain mapping is its overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    overrides: Overrides = Field(default_factory=dict)
    variants: list[str] | None = None
    extra: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and not set(data) & {"overrides", "variants", "extra"}:
            return {"overrides": data}
        return data


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base_params: Path = Path("params.yaml")
    reference: Overrides = Field(default_factory=dict)  # dotted overrides of the base params
    settings: dict[str, Setting] = Field(default_factory=dict)  # one factor at a time around the reference
    variants: list[str]
    ablations: dict[str, Ablation] = Field(default_factory=dict)  # at the reference only
    seeds: Annotated[list[int], Field(min_length=1)]
    reference_seeds: list[int] | None = None  # default: ``seeds``
    ablation_seeds: list[int] | None = None  # the reference seeds that run the ablations (default: all)
    experiment: str = "fedilora-study"
    runner: RunnerConfig = RunnerConfig(task_runner="dask", n_workers=2)  # a process per core
    out_dir: Path = Path("outputs/study")
    report_dir: Path = Path("reports/study")

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        named = [*self.variants, *(a.variant for a in self.ablations.values())]
        named += [v for s in self.settings.values() for v in [*(s.variants or []), *s.extra]]
        for name in named:
            variants.parse(name)  # raises naming a malformed variant
        if REFERENCE in self.settings:
            raise ValueError(f"settings: {REFERENCE!r} is the reference itself; give the setting another name")
        clash = set(self.ablations) & set(self.variants)
        if clash:
            raise ValueError(f"ablations: {sorted(clash)} reuse variant names")
        return self


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        study = StudyConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{path}: {where}") from None
    for name in [REFERENCE, *study.settings]:  # every setting must make valid params
        setting_params(study, name, study.seeds[0])
    return study


def setting_names(study: StudyConfig) -> list[str]:
    return [REFERENCE, *study.settings]


def seeds_for(study: StudyConfig, setting: str) -> list[int]:
    return list(study.reference_seeds or study.seeds) if setting == REFERENCE else list(study.seeds)


def setting_params(study: StudyConfig, setting: str, seed: int) -> Params:
    """The base params with the reference's overrides, the setting's, and the seed."""
    try:
        params = load_params(study.base_params, study.reference)
        overrides = study.settings[setting].overrides if setting in study.settings else {}
        return with_overrides(params, {**overrides, "seed": seed})
    except ConfigError as err:
        raise ConfigError(f"study setting {setting!r}: {err}") from None


def runs_for(study: StudyConfig, setting: str, seed: int | None = None) -> dict[str, tuple[str, Overrides]]:
    """label -> (variant name, extra overrides) of every run in one setting (under ``seed``:
    the ablations run at the reference's ``ablation_seeds`` only)."""
    spec = study.settings.get(setting, Setting())
    out = {v: (v, {}) for v in [*(spec.variants or study.variants), *spec.extra]}
    if setting == REFERENCE and (seed is None or study.ablation_seeds is None or seed in study.ablation_seeds):
        out.update({name: (a.variant, a.overrides) for name, a in study.ablations.items()})
    return out


def run_params(study: StudyConfig, setting: str, seed: int, label: str) -> Params:
    variant, overrides = runs_for(study, setting)[label]
    return with_overrides(variants.resolve(setting_params(study, setting, seed), variant), overrides)


def unit_key(study: StudyConfig, setting: str, seed: int) -> str:
    """File name of a finished (setting, seed): changed params or runs give a new name, so a
    resumed study never reuses a result computed under other settings."""
    content = "".join(run_params(study, setting, seed, label).model_dump_json() for label in runs_for(study, setting, seed))
    return f"{setting}-seed{seed}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"


def run_unit(study: StudyConfig, setting: str, seed: int, table: FeatureTable, model_for, test_rows=None) -> pd.DataFrame:
    """Every run of one (setting, seed): the same splits, the same initial adapter. ``model_for(params)``
    returns the shared base model (one per process and model spec)."""
    params = setting_params(study, setting, seed)
    splits = make_splits(table.labels.numpy(), params, test_rows=test_rows)
    frames = []
    for label in runs_for(study, setting, seed):
        vparams = run_params(study, setting, seed, label)
        fed = Federation(vparams, table, splits, model=model_for(vparams))
        _, results = run(fed, missing_every_round=False)
        frames.append(rounds_frame(results, label))
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "seed", seed)
    out.insert(0, "setting", setting)
    return out


# --------------------------------------------------------------------------- verdicts


def per_seed(results: pd.DataFrame, headline: str = "accuracy") -> pd.DataFrame:
    """One row per (setting, variant, seed): the comparison summaries (last 3 rounds, final)."""
    rows = [{"setting": s, "variant": v, "seed": seed, **comparison.seed_summary(g, headline)}
            for (s, v, seed), g in results.groupby(["setting", "variant", "seed"], sort=False)]
    return pd.DataFrame(rows)


def claim_pairs(study: StudyConfig) -> list[tuple[str, str, str]]:
    """(claim, a, b): FediLoRA against each baseline, and editing against no editing."""
    pairs = [(f"{MAIN} beats {rival}", MAIN, rival) for rival in RIVALS if rival in study.variants]
    if EDITED in study.variants and MAIN in study.variants:
        pairs.append(("editing improves fedilora", EDITED, MAIN))
    return pairs


def verdicts(study: StudyConfig, seeds_table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per setting, claim and metric: the paired difference, its CI and the verdict."""
    rows = []
    for setting in setting_names(study):
        here = seeds_table[seeds_table["setting"] == setting]
        for claim, a, b in claim_pairs(study):
            for metric in metrics:
                wide = here.pivot_table(index="seed", columns="variant", values=metric, aggfunc="first")
                if a not in wide or b not in wide:
                    continue
                both = wide[[a, b]].dropna()
                diff = stats.paired_difference(both[a].to_numpy(), both[b].to_numpy())
                rows.append({"setting": setting, "claim": claim, "a": a, "b": b, "metric": metric, **diff.as_dict()})
    return pd.DataFrame(rows)


def _paired(wide: pd.DataFrame, a: str, b: str) -> stats.PairedDifference:
    """a - b over the seeds that ran both."""
    both = wide[[a, b]].dropna()
    return stats.paired_difference(both[a], both[b])


def ablation_table(study: StudyConfig, seeds_table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each ablation at the reference: its difference from what it is measured against, and its
    margin over the best baseline (the rival with the highest mean), both paired with CIs."""
    ref = seeds_table[seeds_table["setting"] == REFERENCE]
    wide = ref.pivot_table(index="seed", columns="variant", values=metric, aggfunc="first")
    rivals = [r for r in RIVALS if r in wide]
    best = max(rivals, key=lambda r: wide[r].mean()) if rivals else None
    rows = []
    for name, ablation in study.ablations.items():
        base = ablation.against or ablation.variant
        if name not in wide or base not in wide:
            continue
        change = _paired(wide, name, base)  # over the ablation's seeds (ablation_seeds), fewer than the reference's
        row = {"ablation": name, "variant": ablation.variant, "against": base, "seeds": change.seeds, "change_mean": change.mean,
               "change_ci_low": change.ci_low, "change_ci_high": change.ci_high, "change_verdict": change.verdict}
        if best is not None:
            margin = _paired(wide, name, best)
            row.update(best_baseline=best, margin_mean=margin.mean, margin_ci_low=margin.ci_low,
                       margin_ci_high=margin.ci_high, margin_verdict=margin.verdict)
        rows.append(row)
    return pd.DataFrame(rows)
