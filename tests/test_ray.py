"""The same federated run on a local Ray instance (2 worker processes on 127.0.0.1) gives the
same result as the threaded run; each Ray worker builds the base model once and keeps it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_project import project_env, run_cli, write_project

pytest.importorskip("prefect_ray")

# Prefect tasks through RayTaskRunner (as flows/federated.py builds it), each asking its worker
# for the runtime (tasks.runtime.federation): which process ran it and which model it got.
PROBE = """
import json, os, sys
from prefect import flow, task, unmapped
from fedilora.config import load_params
from flows.federated import task_runner

params = load_params("params.yaml", {"runner.task_runner": "ray", "runner.n_workers": 2})

@task
def probe(params, i):
    import time
    from tasks import runtime
    fed = runtime.federation(params)
    time.sleep(0.2)  # let both workers get some of the tasks
    from prefect.server.api.server import SubprocessASGIServer
    own_server = any(s.running for s in SubprocessASGIServer._instances.values())
    return {"pid": os.getpid(), "model": id(fed.model), "models": len(runtime._models),
            "threads": __import__("torch").get_num_threads(), "own_server": own_server}

@flow(task_runner=task_runner(params))
def probes():
    return [f.result() for f in probe.map(unmapped(params), range(8))]

print(json.dumps(probes()))
"""


@pytest.mark.slow
def test_ray_matches_threads_and_workers_keep_the_model(tmp_path: Path) -> None:
    project = tmp_path / "p"
    write_project(project, federation={"rounds": 3, "sample_fraction": 0.5, "batch_size": 8, "lr": 0.01})
    run_cli(project, "prepare")
    run_cli(project, "split")
    run_cli(project, "federate", "--out", "outputs/threads")
    run_cli(project, "federate", "-S", "runner.task_runner=ray", "-S", "runner.n_workers=2", "--out", "outputs/ray")
    threads = json.loads((project / "outputs/threads/metrics.json").read_text())
    ray = json.loads((project / "outputs/ray/metrics.json").read_text())
    assert ray == pytest.approx(threads, abs=1e-6)
    for adapter in ("global", "client_0"):
        a = load_file(str(project / f"outputs/threads/adapters/{adapter}/adapter_model.safetensors"))
        b = load_file(str(project / f"outputs/ray/adapters/{adapter}/adapter_model.safetensors"))
        assert a.keys() == b.keys()
        # Ray workers run torch on 1 thread (OMP_NUM_THREADS=1), the threaded run on 2: float
        # reductions differ in the last bits, as with Dask (tests/test_dask.py)
        assert all(torch.allclose(a[k], b[k], rtol=1e-2, atol=1e-3) for k in a), adapter

    script = project / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, str(script)], cwd=project, env=project_env(project),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Token authentication" not in proc.stderr and "usage stats" not in proc.stderr.lower()
    calls = json.loads(proc.stdout.strip().splitlines()[-1])
    pids = {c["pid"] for c in calls}
    assert 1 <= len(pids) <= 2 and all(c["threads"] == 1 for c in calls)
    # workers report to the flow's Prefect server (PREFECT_API_URL passed to them), not their own
    assert not any(c["own_server"] for c in calls)
    for pid in pids:  # every call in a worker got the same model object: built once, kept
        mine = [c for c in calls if c["pid"] == pid]
        assert len({c["model"] for c in mine}) == 1 and all(c["models"] == 1 for c in mine), mine
