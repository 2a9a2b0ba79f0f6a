"""The ``compare_methods`` flow: every variant under every seed, each (variant, seed) a task mapped
over the compare runner's worker processes, then the comparison over seeds (``fedilora.comparison``)
in files, in MLflow (a parent run, a nested run per variant, a nested run per seed under it) and in
the report.

Each finished (variant, seed) is written to ``runs/<variant>/seed_<s>/`` at once with the hash of
its params, so an interrupted comparison resumes with the units it lacks. Only the flow's own
process writes to MLflow.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pandas as pd
import torch
from prefect import flow, task, unmapped
from prefect.cache_policies import NONE

from fedilora import checkpoint, comparison, outputs, tracking, variants
from fedilora import metrics as task_metrics
from fedilora.atomic import atomic_dir
from fedilora.config import Params, load_params
from fedilora.federation import check_methods, run
from fedilora.paths import DataPaths
from fedilora.prepared import check_prepared
from flows.runners import unit_threads
from tasks.runtime import federation

log = logging.getLogger("fedilora")


def unit_params(params: Params, variant: str, seed: int) -> Params:
    """A variant's params under one seed: the seed draws its splits, schedule and initial adapter."""
    return variants.resolve(params, variant).model_copy(update={"seed": seed})


@task(name="compare_unit", cache_policy=NONE)
def compare_unit(params: Params, variant: str, seed: int, threads: int | None) -> dict:
    """One variant under one seed, in whichever process the runner chose (which keeps its
    feature table and base models for the next unit): every round in process, then the rounds,
    the clients' last personalized accuracy and the global adapter's files (PEFT format)."""
    if threads:
        torch.set_num_threads(threads)
    fed = federation(unit_params(params, variant, seed))
    state, results = run(fed, missing_every_round=False)  # the absent-modality patterns after the last round
    with tempfile.TemporaryDirectory() as tmp:
        fed.save_adapter(state, Path(tmp), is_global=True)
        adapter = {f.name: f.read_bytes() for f in Path(tmp).iterdir()}
    rounds = outputs.rounds_frame(results, variant)
    rounds.insert(1, "seed", seed)
    return {"rounds": rounds, "clients": outputs.clients_frame(results), "adapter": adapter,
            "headline": task_metrics.HEADLINE[task_metrics.task_of(fed.table.labels)]}


def _unit_dir(out_dir: Path, variant: str, seed: int) -> Path:
    return out_dir / "runs" / variant / f"seed_{seed}"


def _save_unit(path: Path, result: dict, phash: str) -> None:
    with atomic_dir(path) as tmp:
        result["rounds"].to_csv(tmp / "rounds.csv", index=False)
        result["clients"].to_csv(tmp / "clients.csv", index=False)
        (tmp / "adapter").mkdir()
        for name, data in result["adapter"].items():
            (tmp / "adapter" / name).write_bytes(data)
        (tmp / "unit.json").write_text(json.dumps({"params_hash": phash, "headline": result["headline"]}))


def _load_unit(path: Path, phash: str) -> dict | None:
    """A finished unit of these params, or None (absent, or computed under other params)."""
    try:
        meta = json.loads((path / "unit.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("params_hash") != phash:
        return None
    return {"rounds": pd.read_csv(path / "rounds.csv"), "headline": meta["headline"]}


@flow(name="compare_methods")
def compare_methods(params_path: str = "params.yaml", overrides: dict | None = None, out_dir: str = "outputs/compare") -> dict:
    """``compare.variants`` x ``compare.seeds``; returns the primary metric's pairs."""
    params = load_params(params_path, overrides)
    check_methods(params)
    check_prepared(DataPaths.of(params))
    out = Path(out_dir)
    variants, seeds = params.compare.variants, params.compare.seeds
    units = [(v, s) for s in seeds for v in variants]
    hashes = {u: checkpoint.params_hash(unit_params(params, *u).model_dump_json()) for u in units}
    done = {u: _load_unit(_unit_dir(out, *u), hashes[u]) for u in units}
    todo = [u for u in units if done[u] is None]
    log.info("compare: %d variants x %d seeds; %d runs to do", len(variants), len(seeds), len(todo))
    threads = unit_threads(params.compare.runner)
    futures = compare_unit.map(unmapped(params), [v for v, _ in todo], [s for _, s in todo], unmapped(threads))
    for unit, future in zip(todo, futures):
        result = future.result()
        _save_unit(_unit_dir(out, *unit), result, hashes[unit])
        done[unit] = result
    headline = done[units[0]]["headline"]
    rounds = pd.concat([done[u]["rounds"] for u in units], ignore_index=True)
    metrics = comparison.write(out, rounds, variants, headline)
    tracking.log_comparison(params, out, rounds, {u: _unit_dir(out, *u) / "adapter" for u in units},
                            lambda v, s: unit_params(params, v, s))
    return metrics["pairs"]
