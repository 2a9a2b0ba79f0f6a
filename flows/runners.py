"""The Prefect task runner a run's clients are mapped over (``runner.*``): threads in this
process, or the worker processes of a Dask or Ray cluster (a local one, or an existing one)."""

from __future__ import annotations

import logging
import os

from prefect.task_runners import ThreadPoolTaskRunner

from fedilora.config import Params, RunnerConfig

# Passed to Ray workers (a cluster's workers do not inherit this process's environment).
_WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY",
               "TOKENIZERS_PARALLELISM", "PREFECT_API_URL")


def _local_prefect_api() -> dict[str, str]:
    """Where the worker processes of a local cluster report their task runs: this process's
    Prefect API. Without ``PREFECT_API_URL`` that is Prefect's ephemeral server, started here
    (once per process; the flow's own client then uses the same one). Otherwise every worker
    would start an ephemeral server of its own on the same database."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value():
        return {"PREFECT_API_URL": PREFECT_API_URL.value()}
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return {}
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return {"PREFECT_API_URL": server.api_url}


def task_runner(params: Params):
    """The Prefect task runner from ``runner.*``. Each Dask or Ray worker process loads the base
    model once (tasks.runtime) and keeps it; only adapter states travel."""
    runner = params.runner
    if runner.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
        init_kwargs = {"logging_level": logging.WARNING, "runtime_env": {"env_vars": env}}
        if runner.address:  # ray://head:10001 (Ray Client) or head:6379 / auto on a cluster node
            return RayTaskRunner(address=runner.address, init_kwargs=init_kwargs)
        # "local": always a new private instance, never one a `ray start` left on this machine.
        # Token auth as Ray's default for a new local cluster, said explicitly so Ray does not
        # warn about it (the token is ~/.ray/auth_token).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        env.update(_local_prefect_api())
        init_kwargs.update(num_cpus=runner.n_workers, include_dashboard=False, _node_ip_address="127.0.0.1")
        return RayTaskRunner(address="local", init_kwargs=init_kwargs)
    if runner.task_runner == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return DaskTaskRunner(address=runner.address)
        # Dask's default MALLOC_TRIM_THRESHOLD_=65536 for its workers makes glibc return freed
        # memory to the OS after almost every torch step: training ran 1.5x slower in the
        # workers (measured, README "Scaling out"). Keep glibc's default.
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": runner.n_workers,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": None,
                "env": _local_prefect_api(),  # the workers' environment (dask.distributed.Nanny)
            }
        )
    workers = 1 if runner.task_runner == "sequential" else runner.max_workers
    return ThreadPoolTaskRunner(max_workers=workers)


def unit_runner(runner: RunnerConfig):
    """The runner for whole runs as tasks (compare's and the study's units). In threads, one unit
    at a time: the units of one process share its base models and their base weights."""
    if runner.task_runner == "threads":
        runner = runner.model_copy(update={"max_workers": 1})
    return task_runner(Params(runner=runner))


def unit_threads(runner: RunnerConfig) -> int | None:
    """torch threads per unit: one per worker process (a process per core), else torch's default."""
    return 1 if runner.task_runner in ("dask", "ray") else None
