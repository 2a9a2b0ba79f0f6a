"""A tiny, learnable project for pipeline tests: a saved `datasets` dataset (colour + words
give the label) and a params file for the tiny model, so a whole run takes seconds."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import yaml
from PIL import Image

from fedilora.config import Params

CLASSES = ["red", "green", "blue"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
WORDS = ["apple cherry", "leaf frog", "sea sky"]


def write_dataset(path: Path, per_class: int = 30) -> Path:
    rows = {"image": [], "name": [], "keywords": [], "label": []}
    for label in range(len(CLASSES)):
        for i in range(per_class):
            shade = (i * 3) % 20
            rows["image"].append(Image.new("RGB", (8, 8), tuple(min(255, c + shade) for c in COLOURS[label])))
            rows["name"].append(f"{CLASSES[label]} thing {i}")
            rows["keywords"].append(WORDS[label])
            rows["label"].append(label)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "name": datasets.Value("string"),
            "keywords": datasets.Value("string"),
            "label": datasets.ClassLabel(names=CLASSES),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def tiny_params(**sections) -> dict:
    """Paths are relative to the project folder: run the CLI (or DVC) from there."""
    params = {
        "seed": 0,
        "data": {"source": "dataset", "root": "data", "max_text_length": 8},
        "clients": {"num_clients": 4, "ranks": [4, 4, 2, 2], "test_fraction": 0.25},
        "missing": {"rate": 0.4, "pattern": "both"},
        "model": {"name": "tiny"},
        "federation": {"rounds": 2, "sample_fraction": 0.5, "batch_size": 8, "lr": 0.01},
        "tracking": {"uri": "mlruns"},
        "runner": {"max_workers": 2},
        "compare": {"variants": ["fedilora+edit", "hetlora"], "seeds": [0, 1], "runner": {"task_runner": "threads"}},
    }
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    return params


def write_project(root: Path, **sections) -> Path:
    """Dataset + params.yaml under ``root``; returns the params path."""
    root.mkdir(parents=True, exist_ok=True)
    write_dataset(root / "dataset")
    path = root / "params.yaml"
    full = Params.model_validate(tiny_params(**sections)).model_dump(mode="json")  # DVC wants every key
    path.write_text(yaml.safe_dump(full, sort_keys=False))
    return path


BIN = Path(sys.executable).parent


def project_env(project: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment in tests: this venv first on PATH, a private PREFECT_HOME (its own
    ephemeral server and database), no inherited server URL, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(project / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    env.update(extra)
    return env


def run_cli(project: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``fedilora ARGS`` as a new process in the project folder (its own imports, ~20 s, and by
    default its own Prefect server; ``env=session_prefect_api()`` reports to this process's):
    for tests about the process itself (exit status, ``kill -9``, what a terminal shows).
    Otherwise :func:`call_cli`. With ``check``, a failure shows its stderr."""
    proc = subprocess.run(
        [str(BIN / "fedilora"), *args], cwd=project, env=project_env(project, **(env or {})),
        capture_output=True, text=True, timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def session_prefect_api() -> dict[str, str]:
    """``PREFECT_API_URL`` of this process's Prefect server (the one in-process flows use; started
    here if none has), for a new process to report to instead of starting its own (~10 s)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return {"PREFECT_API_URL": server.api_url}


def call_cli(project: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``fedilora ARGS`` in this process, from the project folder (``None``: where we are): the
    CLI's own argument parsing, checks, flows and one-line errors, without a new interpreter per
    call. Flows report to this process's Prefect server (started once: tests/conftest.py gives
    the session its own PREFECT_HOME). The per-process runtime cache is emptied around the call:
    it keys on params whose paths are relative to the project folder."""
    from flows import cli as fedilora_cli

    out, err = io.StringIO(), io.StringIO()
    folder = contextlib.chdir(project) if project is not None else contextlib.nullcontext()
    try:
        with folder, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            _log_to(sys.stderr)  # the CLI's log handler, made on its first call, writes to the current stderr
            _clear_runtime()
            code = fedilora_cli.main(list(args))
    finally:
        _clear_runtime()
        _log_to(sys.stderr)
    proc = subprocess.CompletedProcess(["fedilora", *args], code, out.getvalue(), err.getvalue())
    if check:
        assert code == 0, proc.stderr[-3000:]
    return proc


def _log_to(stream) -> None:
    """Point the CLI's own log handler (a plain StreamHandler; not pytest's) at ``stream``."""
    for handler in logging.getLogger("fedilora").handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(stream)


def _clear_runtime() -> None:
    runtime = sys.modules.get("tasks.runtime")
    if runtime is not None:
        runtime.clear()


def seed_mlflow_store(project: Path, template: Path) -> None:
    """Copy an empty MLflow store (``template``: tests/conftest.py's ``mlflow_template``) to
    the project's ``tracking.uri`` folder: creating one runs MLflow's migrations, ~6 s a store.
    tests/test_pipeline.py's ``dvc repro`` still starts without one, as a new project does."""
    (project / "mlruns").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, project / "mlruns" / "mlflow.db")
