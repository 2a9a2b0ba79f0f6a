"""Crash and resume, client failures, and bad input through the command line. A `kill -9` needs a
process of its own, and so does what a failed flow prints on a terminal; the rest runs the CLI's
``main`` in this process (tiny_project.call_cli), on one tiny project prepared once per module."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedilora.config import ConfigError
from tiny_project import BIN, call_cli, project_env, run_cli, seed_mlflow_store, session_prefect_api, write_project

SLOW_TINY = {"rounds": 8, "sample_fraction": 1.0, "batch_size": 4, "lr": 0.01}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The tiny project after `prepare` and `split`, shared read-only: tests that write copy it."""
    root = tmp_path_factory.mktemp("bad")
    write_project(root)
    call_cli(root, "prepare")
    call_cli(root, "split")
    return root


@pytest.fixture(scope="module")
def federated(prepared: Path, tmp_path_factory, mlflow_template: Path) -> Path:
    """A copy of ``prepared`` after a finished 3-round `federate`, shared read-only."""
    project = _copy(prepared, tmp_path_factory.mktemp("federated") / "p", mlflow_template)
    call_cli(project, "federate", *TAMPER_RUN)
    return project


TAMPER_RUN = ("-S", "federation.rounds=3", "-S", "faults.client_failure_rate=0.0")


def _copy(source: Path, project: Path, mlflow_template: Path | None = None, **sections) -> Path:
    """A private copy of a project (without its Prefect home), its params updated by ``sections``."""
    shutil.copytree(source, project, ignore=shutil.ignore_patterns(".prefect"))
    if mlflow_template is not None and not (project / "mlruns").exists():
        seed_mlflow_store(project, mlflow_template)
    if sections:
        params = yaml.safe_load((project / "params.yaml").read_text())
        for name, values in sections.items():
            params[name].update(values)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def _mlflow_run(project: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    run_id = json.loads((project / "outputs/federate/mlflow_run.json").read_text())["run_id"]
    return client, run_id


@pytest.mark.slow
def test_kill_9_mid_round_then_rerun_resumes_with_identical_results(tmp_path: Path, prepared: Path, mlflow_template: Path) -> None:
    reference = _copy(prepared, tmp_path / "reference", mlflow_template, federation=SLOW_TINY)
    call_cli(reference, "federate")

    project = _copy(prepared, tmp_path / "killed", mlflow_template, federation=SLOW_TINY)
    meta = project / "outputs/federate/checkpoint/meta.json"
    proc = subprocess.Popen(
        [str(BIN / "fedilora"), "federate"], cwd=project, env=project_env(project, **session_prefect_api()),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if meta.is_file() and json.loads(meta.read_text())["round"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = json.loads(meta.read_text())
    assert 2 <= saved["round"] < SLOW_TINY["rounds"]
    assert not (project / "outputs/federate/metrics.json").exists()

    call_cli(project, "federate")  # the rerun: the same command, in this process
    assert not meta.exists()  # a finished run leaves no checkpoint behind
    assert json.loads((project / "outputs/federate/metrics.json").read_text()) == json.loads(
        (reference / "outputs/federate/metrics.json").read_text()
    )
    for adapter in ("global", "client_0", "client_3"):
        got = load_file(str(project / f"outputs/federate/adapters/{adapter}/adapter_model.safetensors"))
        want = load_file(str(reference / f"outputs/federate/adapters/{adapter}/adapter_model.safetensors"))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), adapter

    client, run_id = _mlflow_run(project)
    assert run_id == saved["run_id"]  # the same MLflow run continued
    steps = sorted({m.step for m in client.get_metric_history(run_id, "global/accuracy")})
    assert steps == list(range(1, SLOW_TINY["rounds"] + 1))
    runs = client.search_runs([client.get_experiment_by_name("fedilora").experiment_id])
    assert len(runs) == 1


@pytest.mark.slow
def test_thirty_percent_client_failures_still_complete(tmp_path: Path, prepared: Path, mlflow_template: Path) -> None:
    from fedilora.config import load_params
    from tasks.federated import InjectedFault, inject_fault

    project = _copy(prepared, tmp_path / "faulty", mlflow_template)
    overrides = {"federation.rounds": 4, "federation.sample_fraction": 1.0, "faults.client_failure_rate": 0.3}
    call_cli(project, "federate", *(arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")))
    client, run_id = _mlflow_run(project)
    failed = client.get_metric_history(run_id, "clients/failed")
    succeeded = client.get_metric_history(run_id, "clients/succeeded")
    assert len(failed) == len(succeeded) == 4
    assert all(m.value >= 1 for m in succeeded)
    # faults did fire in this run (first attempts that failed; the retries took them over)
    params = load_params(project / "params.yaml", overrides)
    first_attempts = [(c, r) for r in range(1, 5) for c in range(4)]
    assert any(_raises(InjectedFault, inject_fault, params, c, r, 1) for c, r in first_attempts)
    run = client.get_run(run_id)
    assert run.data.params["faults.client_failure_rate"] == "0.3"


def _raises(error: type[BaseException], fn, *args) -> bool:
    try:
        fn(*args)
    except error:
        return True
    return False


@pytest.mark.slow
def test_all_clients_failing_stops_with_a_clear_error_and_keeps_old_outputs(tmp_path: Path, federated: Path) -> None:
    """Through a real process: what a failed flow prints on a terminal is one line, no traceback."""
    project = _copy(federated, tmp_path / "broken")
    metrics = project / "outputs/federate/metrics.json"
    before = hashlib.sha256(metrics.read_bytes()).hexdigest()
    proc = run_cli(project, "federate", "-S", "faults.client_failure_rate=1.0", "-S", "runner.retries=0", check=False,
                   env=session_prefect_api())
    _one_line_error(proc, "federate", "federation.min_clients")
    assert hashlib.sha256(metrics.read_bytes()).hexdigest() == before


# ---- bad input: one line naming the field or file, exit 2, no traceback ------------------------

IN_FLOW = pytest.mark.slow  # found once the flow runs (Prefect server, model): still in-process

BAD_PARAMS = [
    ({"federaton": {"rounds": 2}}, "federaton"),
    ({"federation": {"lr": "fast"}}, "federation.lr"),
    ({"clients": {"ranks": [0, 4, 2, 2]}}, "clients.ranks"),
    ({"clients": {"ranks": [-4, 4, 2, 2]}}, "clients.ranks"),
    pytest.param({"clients": {"ranks": [64, 4, 2, 2]}}, "exceeds the width", marks=IN_FLOW),
    ({"clients": {"num_clients": 500, "ranks": [2]}}, "num_clients"),
    ({"missing": {"rate": -0.1}}, "missing.rate"),
    pytest.param({"aggregation": {"method": "fedsgd"}}, "aggregation.method", marks=IN_FLOW),
    pytest.param({"aggregation": {"method": "fedavg"}}, "fedavg needs equal ranks", marks=IN_FLOW),
    ({"missing": {"pattern": "audio"}}, "missing.pattern"),
    ({"clients": {"partition": "dirichlet", "dirichlet_alpha": 0}}, "clients.dirichlet_alpha"),
    pytest.param({"tracking": {"uri": "/proc/fedilora-mlruns"}}, "tracking.uri", marks=IN_FLOW),
    ({"data": {"root": "../../outside"}}, "data.root"),
]


def _one_line_error(proc: subprocess.CompletedProcess, command: str, expected: str) -> None:
    """Exit 2, no traceback, and one line mentioning an error: the CLI's, naming ``expected``."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"fedilora {command}: error:") and expected in lines[0], lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "data").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, expected", BAD_PARAMS)
def test_bad_params_give_one_clear_line(tmp_path: Path, prepared: Path, change: dict, expected: str) -> None:
    params = yaml.safe_load((prepared / "params.yaml").read_text())
    for section, values in change.items():
        params[section] = {**params.get(section, {}), **values} if section in params else values
    bad = tmp_path / "bad_params.yaml"
    bad.write_text(yaml.safe_dump(params))
    before = _snapshot(prepared)
    command = "split" if "num_clients" in expected or "dirichlet" in expected else "federate"
    _one_line_error(call_cli(prepared, command, "--params", str(bad), check=False), command, expected)
    assert _snapshot(prepared) == before
    assert not (prepared / "outputs").exists()


@pytest.mark.parametrize(
    "mutate, command, expected",
    [
        ("empty_dataset", "prepare", "dataset"),
        ("corrupt_features", "split", "features.safetensors"),
        pytest.param("corrupt_splits", "federate", "splits.parquet", marks=IN_FLOW),
        ("missing_params", "federate", "nope.yaml"),
        ("bad_override", "federate", "KEY=VALUE"),
        ("undecodable_image", "prepare", "row 3 does not decode"),
        ("label_out_of_range", "prepare", "label"),
        ("empty_texts", "prepare", "empty"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path: Path, prepared: Path, mutate: str, command: str, expected: str) -> None:
    project = _copy(prepared, tmp_path / "p")
    args = [command]
    if mutate == "empty_dataset":
        shutil.rmtree(project / "dataset")
        (project / "dataset").mkdir()
    elif mutate == "corrupt_features":
        (project / "data/features.safetensors").write_bytes(b"not a safetensors file")
    elif mutate == "corrupt_splits":
        (project / "data/splits.parquet").write_bytes(b"PAR1 garbage")
    elif mutate == "missing_params":
        args += ["--params", "nope.yaml"]
    elif mutate == "bad_override":
        args += ["-S", "federation.rounds"]
    else:
        _rewrite_dataset(project / "dataset", mutate)
    _one_line_error(call_cli(project, *args, check=False), command, expected)


def _rewrite_dataset(path: Path, mutate: str) -> None:
    import datasets

    ds = datasets.load_from_disk(str(path)).cast_column("image", datasets.Image(decode=False))
    rows = ds.to_dict()
    if mutate == "undecodable_image":
        rows["image"][3] = {"bytes": b"\x89PNG broken", "path": None}
    elif mutate == "label_out_of_range":
        rows["label"][0] = 7
    elif mutate == "empty_texts":
        rows["name"] = [""] * len(rows["name"])
        rows["keywords"] = [""] * len(rows["keywords"])
    features = ds.features.copy()
    if mutate == "label_out_of_range":
        features["label"] = datasets.Value("int64")
    out = datasets.Dataset.from_dict(rows, features=features)
    shutil.rmtree(path)
    out.save_to_disk(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("tamper, expected", [("shape", "has shape"), ("keys", "keys do not match")])
def test_adapter_file_with_wrong_shapes_or_keys_is_named(tmp_path: Path, federated: Path, tamper: str, expected: str) -> None:
    """A checkpointed adapter that does not fit the model stops the resume, naming the file."""
    from fedilora import checkpoint
    from fedilora.config import load_params

    project = _copy(federated, tmp_path / "p")
    # fake an interrupted run: a checkpoint after round 1 whose global adapter was tampered with
    params = load_params(project / "params.yaml", {"federation.rounds": 3, "faults.client_failure_rate": 0.0})
    adapter = load_file(str(project / "outputs/federate/adapters/global/adapter_model.safetensors"))
    state = dict(adapter)
    key = next(k for k in state if "lora_A." in k)
    if tamper == "shape":
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    else:
        state["base_model.model.unexpected.weight"] = torch.zeros(1)
    ckpt = checkpoint.Checkpoint(1, "0" * 32, checkpoint.params_hash(params.model_dump_json()), state, {}, None, [])
    checkpoint.save(project / "outputs/federate/checkpoint", ckpt)
    proc = call_cli(project, "federate", *TAMPER_RUN, check=False)
    _one_line_error(proc, "federate", expected)
    assert "global.safetensors" in proc.stderr


def test_unreachable_prefect_server_is_named(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    _one_line_error(call_cli(prepared, "federate", check=False), "federate", "PREFECT_API_URL=http://127.0.0.1:9/api")


def test_debug_shows_the_traceback(prepared: Path) -> None:
    """``--debug`` lets the error through (a process prints its traceback) instead of one line."""
    with pytest.raises(ConfigError, match="federation.lr"):
        call_cli(prepared, "federate", "--debug", "-S", "federation.lr=fast")
