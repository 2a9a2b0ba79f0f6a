"""One GPU per worker: the Ray and Dask task runners ask for the right resources (built, not
started: no cluster runs here)."""

from __future__ import annotations

import pytest

from fedilora.config import ConfigError, parse_params
from flows import runners


def _params(task_runner: str, gpus: float, **runner):
    return parse_params({"runner": {"task_runner": task_runner, "gpus_per_worker": gpus, **runner}})


@pytest.fixture
def no_local_server(monkeypatch):
    """A local cluster's workers get this process's Prefect API; not started in these tests."""
    monkeypatch.setattr(runners, "_local_prefect_api", lambda: {"PREFECT_API_URL": "http://127.0.0.1:1/api"})


def test_ray_tasks_ask_for_a_gpu_and_keep_their_worker(no_local_server) -> None:
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import RemoteOptionsContext, remote_options

    for params in (_params("ray", 1), _params("ray", 1, address="ray://head:10001")):
        runner = runners.task_runner(params)
        assert isinstance(runner, RayTaskRunner)
        assert runner.remote_options == {"num_gpus": 1, "max_calls": 0}
        assert runner.duplicate() == runner and runner.duplicate().remote_options == runner.remote_options
    assert runners.task_runner(_params("ray", 0.5)).remote_options == {"num_gpus": 0.5, "max_calls": 0}
    assert runners.task_runner(_params("ray", 0)).remote_options == {}
    assert runners.task_runner(_params("ray", 0)) != runners.task_runner(_params("ray", 1))

    seen = []

    def fake_submit(self, task, parameters, wait_for=None, dependencies=None):  # what ray.remote would get
        seen.append(dict(RemoteOptionsContext.get().current_remote_options))

    runner = runners.task_runner(_params("ray", 1))
    original = RayTaskRunner.submit
    RayTaskRunner.submit = fake_submit
    try:
        runner.submit(None, {})
        with remote_options(num_cpus=2, num_gpus=2):  # a caller's own options win
            runner.submit(None, {})
    finally:
        RayTaskRunner.submit = original
    assert seen == [{"num_gpus": 1, "max_calls": 0}, {"num_gpus": 2, "max_calls": 0, "num_cpus": 2}]


def test_dask_workers_each_see_their_own_gpus() -> None:
    specs = runners.dask_gpu_specs(_params("dask", 1, n_workers=3), ["0", "1", "2", "3"], {"X": "1"})
    workers = list(specs["workers"].values())
    assert [w["options"]["env"]["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1", "2"]
    assert all(w["options"]["resources"] == {"GPU": 1} and w["options"]["nthreads"] == 1 for w in workers)
    assert all(w["options"]["env"]["X"] == "1" and w["options"]["host"] == "127.0.0.1" for w in workers)
    specs = runners.dask_gpu_specs(_params("dask", 2, n_workers=2), ["GPU-a", "GPU-b", "GPU-c", "GPU-d"], {})
    assert [w["options"]["env"]["CUDA_VISIBLE_DEVICES"] for w in specs["workers"].values()] == ["GPU-a,GPU-b", "GPU-c,GPU-d"]
    with pytest.raises(ValueError, match=r"runner.gpus_per_worker=1 x runner.n_workers=3 needs 3 GPUs; this machine shows 2"):
        runners.dask_gpu_specs(_params("dask", 1, n_workers=3), ["0", "1"], {})


def test_dask_task_runner_builds_the_gpu_cluster(monkeypatch, no_local_server) -> None:
    from distributed import SpecCluster
    from prefect_dask import DaskTaskRunner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert runners.visible_gpus() == ["4", "5"]
    runner = runners.task_runner(_params("dask", 1, n_workers=2))
    assert isinstance(runner, DaskTaskRunner) and runner.cluster_class is SpecCluster
    envs = [w["options"]["env"] for w in runner.cluster_kwargs["workers"].values()]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "5"]
    assert all(e["PREFECT_API_URL"] == "http://127.0.0.1:1/api" for e in envs)
    cpu = runners.task_runner(_params("dask", 0))
    assert cpu.cluster_class is None and cpu.cluster_kwargs["n_workers"] == 2


def test_a_dask_worker_owns_whole_gpus() -> None:
    with pytest.raises(ConfigError, match="runner: .*a Dask worker owns whole GPUs"):
        _params("dask", 0.5)
    with pytest.raises(ConfigError, match="runner.gpus_per_worker"):
        _params("ray", -1)
