"""The ``quality_study`` flow: map one task per (setting, seed) over a process pool, log every
method's run to one MLflow experiment, and write the table and plots to ``reports/study``.

Each finished (setting, seed) is saved to ``outputs/study/runs/`` at once, so an interrupted
study resumes where it stopped; MLflow runs are logged by the flow itself (one writer to the
store) when a task's result arrives.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch
from prefect import flow, task, unmapped
from prefect.cache_policies import NONE

from fedilora import study as st
from fedilora import study_report, tracking
from fedilora.atomic import atomic_path
from fedilora.atomic import write_json
from flows.runners import unit_runner, unit_threads
from tasks.runtime import feature_table, shared_model

log = logging.getLogger("fedilora")


@task(name="study_setting", cache_policy=NONE)
def study_setting(study: st.StudyConfig, setting: st.Setting, seed: int, threads: int | None) -> pd.DataFrame:
    """Every method on one (setting, seed), in whichever process the runner chose; that
    process keeps its feature table and base models for the next task."""
    if threads:
        torch.set_num_threads(threads)
    params = st.run_params(study, setting, seed)
    table = feature_table(params)
    return st.run_setting(study, setting, seed, table, lambda p: shared_model(p, table))


@flow(name="quality_study")
def quality_study(study_path: str = "study/study.yaml") -> dict:
    """All (setting, seed) units not yet on disk, then the table and plots from all of them."""
    study = st.load_study(study_path)
    runs_dir = study.out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    units = [(s, seed) for s in st.settings(study) for seed in study.seeds]
    files = {(s.name, seed): runs_dir / f"{st.unit_key(study, s, seed)}.csv" for s, seed in units}
    todo = [(s, seed) for s, seed in units if not files[s.name, seed].is_file()]
    log.info("study: %d settings x %d seeds; %d units to run", len(units) // len(study.seeds), len(study.seeds), len(todo))
    start = time.perf_counter()
    if todo:
        threads = unit_threads(study.runner)
        futures = study_setting.map(unmapped(study), [s for s, _ in todo], [seed for _, seed in todo], unmapped(threads))
        for (setting, seed), future in zip(todo, futures):
            frame = future.result()
            with atomic_path(files[setting.name, seed]) as tmp:
                frame.to_csv(tmp, index=False)
            tracking.log_study_unit(frame, st.run_params(study, setting, seed), study.experiment)
    elapsed = time.perf_counter() - start
    results = pd.concat([pd.read_csv(files[s.name, seed]) for s, seed in units], ignore_index=True)
    summary = study_report.write(study, results, study.report_dir)
    write_json(study.out_dir / "timing.json", {"units_run": len(todo), "seconds": round(elapsed, 1), "runner": study.runner.model_dump()})
    return summary


def run_study(study_path: str = "study/study.yaml") -> dict:
    """The flow on the study's own task runner (``runner`` in the study file)."""
    study = st.load_study(study_path)
    return quality_study.with_options(task_runner=unit_runner(study.runner))(study_path)
