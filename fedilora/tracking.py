"""The one place that talks to MLflow.

Default store: an SQLite database and an artifact folder inside ``mlruns/`` at the repository
root (MLflow 3's maintained backend; the plain file store is in maintenance mode). Any other
tracking URI (``http://127.0.0.1:5000``, ``sqlite:///...``) is used as given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from fedilora.config import Params
from fedilora.paths import DataPaths
from fedilora.outputs import ROUND_COLUMNS

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


def log_study_unit(frame: pd.DataFrame, experiment: str, params_for: Callable[[str], Params]) -> None:
    """One MLflow run per run of a finished study unit (setting, seed): every param, tags
    (setting, variant, seed) and per-round metrics, written in one batch each."""
    client = None
    for label, rows in frame.groupby("variant", sort=False):
        params = params_for(label)
        if client is None:
            experiment_id = configure(params.model_copy(update={"tracking": params.tracking.model_copy(update={"experiment": experiment})}))
            client = MlflowClient()
        first = rows.iloc[0]
        name = f"{first['setting']}/{label}/seed{first['seed']}"
        tags = {"study": "quality", "setting": first["setting"], "variant": label, "seed": str(first["seed"]), "mlflow.runName": name}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        now = int(time.time() * 1000)
        columns = [c for c in rows.columns if c.startswith(("global_", "personalized_", "diag_", "editing_"))]
        metrics = [Metric(metric_key(c), float(r[c]), now, int(r["round"])) for _, r in rows.iterrows() for c in columns if pd.notna(r[c])]
        values = [Param(k, v) for k, v in flatten(params.model_dump(mode="json")).items()]
        for i in range(0, len(values), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            client.log_batch(run.info.run_id, params=values[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
        client.set_terminated(run.info.run_id)


def data_hash(params: Params) -> str:
    """Content hash of the prepared features and splits: which data a run saw."""
    paths = DataPaths.of(params)
    digest = hashlib.md5()
    for path in (paths.features, paths.splits):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def metric_key(column: str) -> str:
    """A per-round CSV column as the metric it was logged as (``global_accuracy`` -> ``global/accuracy``)."""
    logged = {col: key for key, col in ROUND_COLUMNS.items()}
    return logged.get(column, column.replace("_", "/", 1))


def _safe(name: str) -> str:
    """A variant as MLflow accepts it in a metric name ('+' is not allowed)."""
    return name.replace("+", "-")


def _log_finite(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}, step=step)


def _log_rounds(rows: pd.DataFrame) -> None:
    """Per-round metrics of one run (or of a variant's mean over seeds), step = round."""
    columns = [c for c in rows.columns if c.startswith(("global_", "personalized_"))]
    for _, row in rows.iterrows():
        _log_finite({metric_key(c): row[c] for c in columns}, step=int(row["round"]))


def log_comparison(params: Params, out_dir: Path, rounds: pd.DataFrame, adapters: Mapping[tuple[str, int], Path],
                   params_for: Callable[[str, int], Params]) -> str:
    """The comparison in MLflow: a parent run with the paired differences of the primary metric
    (``compare/<a>_minus_<b>/mean``, ``/ci_low``, ``/ci_high``) and the CI tables as artifacts; a
    nested run per variant (mean over seeds per round, and each summary's mean and interval);
    a nested run per seed under it (its params, tagged with its seed, per-round metrics, the global
    adapter). Returns the parent run's id."""
    out_dir = Path(out_dir)
    primary = json.loads((out_dir / "metrics.json").read_text())["primary_metric"]
    pairs, table = pd.read_csv(out_dir / "pairs.csv"), pd.read_csv(out_dir / "comparison.csv")
    hash_ = data_hash(params)
    with start_run(params, "compare", data_hash=hash_) as parent:
        mlflow.set_tags({"primary_metric": primary, "seeds": ",".join(map(str, params.compare.seeds))})
        for _, r in pairs[pairs["metric"] == primary].iterrows():
            name = f"compare/{_safe(r['a'])}_minus_{_safe(r['b'])}"
            _log_finite({f"{name}/mean": r["mean"], f"{name}/ci_low": r["ci_low"], f"{name}/ci_high": r["ci_high"]})
        for name in ("comparison.csv", "pairs.csv", "seeds.csv", "metrics.json"):
            mlflow.log_artifact(str(out_dir / name), "comparison")
        for _, row in table.iterrows():
            variant = row["variant"]
            runs = rounds[rounds["variant"] == variant]
            with mlflow.start_run(run_name=variant, nested=True, experiment_id=parent.info.experiment_id):
                mlflow.set_tags({"variant": variant, "level": "variant", "seeds": ",".join(map(str, sorted(runs["seed"].unique())))})
                _log_finite({k.replace("_ci_low", "/ci_low").replace("_ci_high", "/ci_high"): v for k, v in row.items()
                             if k not in ("variant", "seeds")})
                _log_rounds(runs.drop(columns=["variant"]).groupby("round", as_index=False).mean(numeric_only=True))
                for seed, seed_rows in runs.groupby("seed"):
                    run_params = params_for(variant, int(seed))
                    with mlflow.start_run(run_name=f"{variant}/seed{seed}", nested=True, experiment_id=parent.info.experiment_id):
                        mlflow.log_params(flatten(run_params.model_dump(mode="json")))
                        mlflow.set_tags({**run_tags(run_params, hash_), "variant": variant, "seed": str(seed), "level": "seed"})
                        _log_rounds(seed_rows)
                        mlflow.log_artifacts(str(adapters[variant, int(seed)]), "adapters/global")
        return parent.info.run_id

