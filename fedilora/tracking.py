"""The one place that talks to MLflow.

Default store: an SQLite database and an artifact folder inside ``mlruns/`` at the repository
root (MLflow 3's maintained backend; the plain file store is in maintenance mode). Any other
tracking URI (``http://127.0.0.1:5000``, ``sqlite:///...``) is used as given.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fedilora.config import Params

DB_NAME = "mlflow.db"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and why."""


def resolve_uri(uri: str) -> tuple[str, str | None]:
    """(tracking URI, artifact root URI or None). A plain path means a local SQLite store."""
    if "://" in uri or uri.startswith("file:"):
        return uri, None
    root = Path(uri).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise TrackingError(f"tracking.uri: cannot write to {root} ({err.strerror})") from None
    return f"sqlite:///{root / DB_NAME}", (root / "artifacts").as_uri()


def configure(params: Params) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; returns its id."""
    tracking_uri, artifact_root = resolve_uri(params.tracking.uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(params.tracking.experiment)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(params.tracking.experiment, artifact_location=artifact_root)
    except Exception as err:  # MLflow raises many types for an unusable store
        raise TrackingError(f"tracking.uri: cannot use MLflow store {tracking_uri} ({err})") from None


def flatten(data: Mapping, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(params: Params, data_hash: str = "") -> dict[str, str]:
    rates = sorted({r for r, _ in params.client_missing()})
    patterns = sorted({p for _, p in params.client_missing()})
    return {
        "method": params.aggregation.method,
        "editing": str(params.editing.enabled).lower(),
        "dataset": params.data.source,
        "model": params.model.name,
        "ranks": ",".join(map(str, params.clients.client_ranks())),
        "missing": f"rate={'/'.join(map(str, rates))} pattern={'/'.join(patterns)} fill={params.missing.fill}",
        "partition": params.clients.partition,
        "git_commit": git_commit(),
        "data_hash": data_hash,
    }


@contextlib.contextmanager
def start_run(
    params: Params, run_name: str, *, nested: bool = False, run_id: str | None = None, data_hash: str = ""
) -> Iterator[mlflow.ActiveRun]:
    """A run with every param and the run's tags; ``run_id`` continues an existing run."""
    experiment_id = configure(params)
    with mlflow.start_run(run_id=run_id, run_name=run_name, experiment_id=experiment_id, nested=nested) as run:
        if run_id is None:
            mlflow.log_params(flatten(params.model_dump(mode="json")))
            mlflow.set_tags(run_tags(params, data_hash))
        yield run


def log_metrics(metrics: Mapping[str, float], step: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_dict(data: dict, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def log_artifacts(local_dir: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(local_dir), artifact_path)


def log_artifact(local_file: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(local_file), artifact_path)


def log_study_unit(frame: pd.DataFrame, params: Params, experiment: str) -> None:
    """One MLflow run per method of a finished study unit (setting, seed): params, tags and
    per-round metrics, written in one batch each."""
    experiment_id = configure(params.model_copy(update={"tracking": params.tracking.model_copy(update={"experiment": experiment})}))
    client = MlflowClient()
    for method, rows in frame.groupby("method", sort=False):
        first = rows.iloc[0]
        name = f"{first['setting']}/{method}/seed{first['seed']}"
        run = client.create_run(experiment_id, run_name=name, tags={"study": "quality", "method": method, "setting": first["setting"]})
        now = int(time.time() * 1000)
        metrics = [Metric(col.replace("global_", "global/").replace("personalized_", "personalized/"), float(v), now, int(r["round"]))
                   for _, r in rows.iterrows() for col, v in r.items()
                   if col.startswith(("global_", "personalized_")) and pd.notna(v)]
        values = {"method": method, "ranks": first["ranks"], "rank_list": params.clients.ranks, "dirichlet_alpha": first["dirichlet_alpha"],
                  "missing_rate": first["missing_rate"], "missing_pattern": first["pattern"], "seed": first["seed"],
                  "rounds": params.federation.rounds}
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in values.items()],
                         tags=[RunTag("mlflow.runName", name)])
        client.set_terminated(run.info.run_id)

