"""Real local servers, bound to 127.0.0.1 on free ports:

* a Prefect server plus `fedilora serve`: the `federated_training/fedilora` deployment is
  registered, a run triggered through the REST API (as the UI does) completes and writes its outputs;
* an MLflow tracking server over the project's SQLite store: the REST API shows the run, its tags,
  params and per-round metric history; and `tracking.uri=http://...` logs through the server.

The helpers (`free_port`, `Server`, `start_prefect_server`, `start_mlflow_server`, ...) are also
used by `docs/screenshots.py`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tiny_project import tiny_params, write_project

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
DEPLOYMENT = "federated_training/fedilora"


# ---------------------------------------------------------------- helpers (shared with docs/screenshots.py)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """This environment, offline and quiet, with no Prefect/MLflow settings leaking in from the user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.update(extra)
    return env


def prefect_env(home: Path, port: int) -> dict[str, str]:
    """A private Prefect home and database, pointed at the server on ``port``."""
    return base_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_API_URL=f"http://{HOST}:{port}/api",
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        PREFECT_API_LOG_RETRYABLE_ERRORS="true",  # a 503's cause goes to the server log
        PREFECT_RUNNER_POLL_FREQUENCY="2",  # `serve` picks up a triggered run within 2 s (default 10)
    )


class Server:
    """A subprocess in its own process group, with its output in a log file; ``stop`` kills the group."""

    def __init__(self, cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        self._log_file = open(log, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{' '.join(self.cmd)} exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # children that outlived the leader (uvicorn workers, flow-run subprocesses)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_file.close()


def wait_until(check: Callable[[], object], timeout: float, what: str, *, servers: tuple[Server, ...] = (),
               interval: float = 0.5) -> object:
    """Poll ``check`` until it returns something truthy; fail early if a server died."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        for server in servers:
            server.check_alive()
        try:
            value = check()
            if value:
                return value
        except (requests.RequestException, ValueError, KeyError) as err:
            last = err
        time.sleep(interval)
    logs = "\n".join(f"--- {' '.join(s.cmd[:3])}\n{s.tail()}" for s in servers)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})\n{logs}")


def http_ok(url: str) -> bool:
    return requests.get(url, timeout=5).status_code == 200


def request(method: str, url: str, *, attempts: int = 8, **kwargs) -> requests.Response:
    """An HTTP call retried on 503 and dropped connections, as Prefect's own client does: the
    SQLite-backed server answers 503 while its database is busy (here: loop services on 2 cores)."""
    kwargs.setdefault("timeout", 15)
    for attempt in range(attempts):
        try:
            resp = requests.request(method, url, **kwargs)
            if resp.status_code not in (502, 503) or attempt == attempts - 1:
                return resp
        except (requests.ConnectionError, requests.Timeout):
            if attempt == attempts - 1:
                raise
        time.sleep(min(0.5 * 2**attempt, 5))
    raise AssertionError("unreachable")


def start_prefect_server(home: Path, port: int, *, ui: bool = True, timeout: float = 90) -> Server:
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    if not ui:
        cmd.append("--no-ui")
    server = Server(cmd, cwd=home, env=prefect_env(home, port), log=home / "server.log")
    try:
        wait_until(lambda: http_ok(f"http://{HOST}:{port}/api/health"), timeout, "Prefect /api/health",
                   servers=(server,))
    except BaseException:
        server.stop()
        raise
    return server


def start_mlflow_server(backend_uri: str, port: int, workdir: Path, *, timeout: float = 90) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--host", HOST, "--port", str(port),
        "--workers", "1", "--artifacts-destination", str(workdir / "served-artifacts"),
    ]
    # no background job runner (7 huey processes, for GenAI jobs): 2 cores are enough for the rest
    env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = Server(cmd, cwd=workdir, env=env, log=workdir / "mlflow-server.log")
    try:
        wait_until(lambda: http_ok(f"http://{HOST}:{port}/health"), timeout, "MLflow /health", servers=(server,))
    except BaseException:
        server.stop()
        raise
    return server


def fedilora(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run([str(BIN / "fedilora"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"fedilora {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def prefect_api(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def find_deployment(port: int, name: str = DEPLOYMENT) -> dict | None:
    flow_name, _, deployment_name = name.partition("/")
    resp = request("GET", f"{prefect_api(port)}/deployments/name/{flow_name}/{deployment_name}")
    return resp.json() if resp.status_code == 200 else None


def trigger_run(port: int, deployment_id: str, parameters: dict | None = None) -> dict:
    """What the UI's 'Run' button does: a flow run from the deployment, its parameters merged in."""
    body = {"parameters": parameters or {}, "idempotency_key": uuid.uuid4().hex}  # retries make one run
    resp = request("POST", f"{prefect_api(port)}/deployments/{deployment_id}/create_flow_run", json=body)
    resp.raise_for_status()
    return resp.json()


def wait_final_state(port: int, flow_run_id: str, timeout: float, servers: tuple[Server, ...] = ()) -> dict:
    def final():
        run = request("GET", f"{prefect_api(port)}/flow_runs/{flow_run_id}").json()
        return run if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return wait_until(final, timeout, f"flow run {flow_run_id} to finish", servers=servers, interval=1.0)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny dataset after `fedilora prepare` and `fedilora split`, shared read-only by the tests."""
    root = tmp_path_factory.mktemp("tiny")
    write_project(root)
    env = base_env(PREFECT_HOME=str(root / ".prefect"))
    fedilora(["prepare", "--params", "params.yaml"], cwd=root, env=env)
    fedilora(["split", "--params", "params.yaml"], cwd=root, env=env)
    return root


@pytest.fixture
def project(prepared: Path, tmp_path: Path) -> Path:
    """A project dir of its own (outputs, MLflow store) reading the shared prepared data."""
    root = tmp_path / "project"
    root.mkdir()
    params = tiny_params(data={"source": str(prepared / "dataset"), "root": str(prepared / "data")},
                         tracking={"uri": str(root / "mlruns")})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Started servers go here; all are stopped (process groups killed) whatever the test did."""
    started: list[Server] = []
    yield started
    for server in reversed(started):
        server.stop()


# ---------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_served_deployment_runs_from_the_api(project: Path, tmp_path: Path, servers: list[Server]) -> None:
    port = free_port()
    home = tmp_path / "prefect-home"
    servers.append(start_prefect_server(home, port, ui=False))
    env = prefect_env(home, port)
    serve = Server([str(BIN / "fedilora"), "serve", "--params", str(project / "params.yaml")],
                   cwd=project, env=env, log=tmp_path / "serve.log")
    servers.append(serve)

    deployment = wait_until(lambda: find_deployment(port), 90, f"deployment {DEPLOYMENT}", servers=tuple(servers))
    assert deployment["parameters"] == {"params_path": str((project / "params.yaml").resolve())}
    assert set(deployment["parameter_openapi_schema"]["properties"]) == {"params_path", "overrides", "out_dir"}

    # Parameters from the 'Run' form are merged over the deployment's (params_path stays).
    run = trigger_run(port, deployment["id"], {"overrides": {"federation.rounds": 3}})
    assert run["deployment_id"] == deployment["id"]
    final = wait_final_state(port, run["id"], 120, servers=tuple(servers))
    assert final["state_type"] == "COMPLETED", f"flow run ended {final['state_name']}:\n{serve.tail()}"
    assert final["parameters"]["params_path"] == str((project / "params.yaml").resolve())

    metrics = json.loads((project / "outputs/federate/metrics.json").read_text())
    assert metrics["rounds"] == 3
    assert 0.0 <= metrics["global_accuracy"] <= 1.0
    assert (project / "outputs/federate/adapters/global").is_dir()
    # the flow's task runs were reported to the server too
    tasks = request("POST", f"{prefect_api(port)}/task_runs/filter",
                    json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
    names = {t["name"].rsplit("-", 1)[0] for t in tasks}  # "train_client-e75"
    assert {"train_client", "aggregate", "evaluate_global"} <= names
    assert all(t["state_type"] == "COMPLETED" for t in tasks)


def _mlflow(port: int, method: str, endpoint: str, **kwargs) -> dict:
    resp = request(method, f"http://{HOST}:{port}/api/2.0/mlflow/{endpoint}", **kwargs)
    assert resp.status_code == 200, f"{endpoint}: {resp.status_code} {resp.text[:500]}"
    return resp.json()


def _history(port: int, run_id: str, key: str) -> list[tuple[int, float]]:
    data = _mlflow(port, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key})
    return sorted((m["step"], m["value"]) for m in data.get("metrics", []))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mlflow_server_reads_the_store_and_takes_http_runs(project: Path, tmp_path: Path,
                                                           servers: list[Server]) -> None:
    env = base_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    fedilora(["federate", "--params", "params.yaml"], cwd=project, env=env)
    metrics = json.loads((project / "outputs/federate/metrics.json").read_text())
    rounds = metrics["rounds"]
    store = project / "mlruns"
    assert (store / "mlflow.db").is_file()

    port = free_port()
    servers.append(start_mlflow_server(f"sqlite:///{store / 'mlflow.db'}", port, tmp_path / "mlflow-server"))

    exp = _mlflow(port, "GET", "experiments/get-by-name", params={"experiment_name": "fedilora"})["experiment"]
    assert exp["artifact_location"] == (store / "artifacts").as_uri()
    runs = _mlflow(port, "POST", "runs/search", json={
        "experiment_ids": [exp["experiment_id"]], "filter": "tags.method = 'fedilora'", "max_results": 10,
    }).get("runs", [])
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert tags["method"] == "fedilora" and tags["editing"] == "true" and tags["model"] == "tiny"
    assert params["aggregation.method"] == "fedilora"
    assert params["federation.rounds"] == str(rounds)
    assert params["clients.num_clients"] == "4"
    history = _history(port, run["info"]["run_id"], "global/accuracy")
    assert [step for step, _ in history] == list(range(1, rounds + 1))
    assert history[-1][1] == pytest.approx(metrics["global_accuracy"], abs=1e-3)
    artifacts = _mlflow(port, "GET", "artifacts/list", params={"run_id": run["info"]["run_id"]})
    assert {"metrics.json", "adapters", "edits"} <= {f["path"] for f in artifacts.get("files", [])}

    # A run that logs through the server: a new experiment, so its artifacts go through the proxy.
    url = f"http://{HOST}:{port}"
    out = fedilora(["federate", "--params", "params.yaml", "-S", f"tracking.uri={url}",
                    "-S", "tracking.experiment=served", "-S", "aggregation.method=hetlora",
                    "-S", "editing.enabled=false", "--out", "outputs/served"], cwd=project, env=env)
    # stdout: MLflow's "View run ... at: http://..." lines, then the final metrics with the run id
    assert f"View run hetlora at: {url}/#/experiments/" in out
    served = json.loads(out[out.index("\n{") + 1:])
    assert (project / "outputs/served/metrics.json").is_file()
    got = _mlflow(port, "GET", "runs/get", params={"run_id": served["mlflow_run_id"]})["run"]
    assert got["info"]["status"] == "FINISHED"
    got_tags = {t["key"]: t["value"] for t in got["data"]["tags"]}
    assert got_tags["method"] == "hetlora" and got_tags["editing"] == "false"
    assert got_tags["mlflow.runName"] == "hetlora"
    assert {p["key"]: p["value"] for p in got["data"]["params"]}["aggregation.method"] == "hetlora"
    served_exp = _mlflow(port, "GET", "experiments/get-by-name", params={"experiment_name": "served"})["experiment"]
    assert got["info"]["experiment_id"] == served_exp["experiment_id"]
    assert served_exp["artifact_location"].startswith("mlflow-artifacts:")
    history = _history(port, served["mlflow_run_id"], "global/accuracy")
    assert [step for step, _ in history] == list(range(1, rounds + 1))
    files = {f["path"] for f in _mlflow(port, "GET", "artifacts/list",
                                        params={"run_id": served["mlflow_run_id"]}).get("files", [])}
    assert {"metrics.json", "rounds.csv", "adapters"} <= files
    assert list((tmp_path / "mlflow-server/served-artifacts").rglob("metrics.json"))
    # the first run is untouched and still the only fedilora run
    runs = _mlflow(port, "POST", "runs/search", json={
        "experiment_ids": [exp["experiment_id"], served_exp["experiment_id"]], "filter": "tags.method = 'fedilora'",
    }).get("runs", [])
    assert [r["info"]["run_id"] for r in runs] == [run["info"]["run_id"]]
