"""The ``quality_study`` flow: map one task per (setting, seed) over a process pool, log every
run to one MLflow experiment, and write the verdicts, tables and plots to ``reports/study``.

Each finished (setting, seed) is saved to ``outputs/study/runs/`` at once, so an interrupted
study resumes where it stopped; MLflow runs are logged by the flow itself (one writer to the
store) when a task's result arrives.
"""

from __future__ import annotations

import logging
import time

import pandas as pd
import torch
from prefect import flow, task, unmapped
from prefect.cache_policies import NONE

from fedilora import study as st
from fedilora import study_report, tracking
from fedilora.atomic import atomic_path, write_json
from fedilora.paths import DataPaths
from fedilora.prepared import check_prepared
from fedilora.stages import official_test_rows
from flows.runners import unit_runner, unit_threads
from tasks.runtime import feature_table, shared_model

log = logging.getLogger("fedilora")


@task(name="study_unit", cache_policy=NONE)
def study_unit(study: st.StudyConfig, setting: str, seed: int, threads: int | None) -> pd.DataFrame:
    """Every run of one (setting, seed), in whichever process the runner chose; that process keeps
    its feature table and base models for the next task."""
    if threads:
        torch.set_num_threads(threads)
    params = st.setting_params(study, setting, seed)
    table = feature_table(params)
    test_rows, _ = official_test_rows(DataPaths.of(params))
    return st.run_unit(study, setting, seed, table, lambda p: shared_model(p, table), test_rows)


@flow(name="quality_study")
def quality_study(study_path: str = "study/study.yaml") -> dict:
    """All (setting, seed) units not yet on disk, then the verdicts, tables and plots from all of them."""
    study = st.load_study(study_path)
    check_prepared(DataPaths.of(st.setting_params(study, st.REFERENCE, study.seeds[0])), splits=False)
    runs_dir = study.out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    units = [(s, seed) for s in st.setting_names(study) for seed in st.seeds_for(study, s)]
    files = {u: runs_dir / f"{st.unit_key(study, *u)}.csv" for u in units}
    todo = [u for u in units if not files[u].is_file()]
    log.info("study: %d settings, %d units; %d to run", len(st.setting_names(study)), len(units), len(todo))
    start = time.perf_counter()
    if todo:
        futures = study_unit.map(unmapped(study), [s for s, _ in todo], [seed for _, seed in todo], unmapped(unit_threads(study.runner)))
        for (setting, seed), future in zip(todo, futures):
            frame = future.result()
            with atomic_path(files[setting, seed]) as tmp:
                frame.to_csv(tmp, index=False)
            tracking.log_study_unit(frame, study.experiment, lambda label, s=setting, sd=seed: st.run_params(study, s, sd, label))
    elapsed = time.perf_counter() - start
    results = pd.concat([pd.read_csv(files[u]) for u in units], ignore_index=True)
    summary = study_report.write(study, results, study.report_dir)
    write_json(study.out_dir / "timing.json", {"units_run": len(todo), "seconds": round(elapsed, 1), "runner": study.runner.model_dump()})
    return summary


def run_study(study_path: str = "study/study.yaml") -> dict:
    """The flow on the study's own task runner (``runner`` in the study file)."""
    study = st.load_study(study_path)
    return quality_study.with_options(task_runner=unit_runner(study.runner))(study_path)
