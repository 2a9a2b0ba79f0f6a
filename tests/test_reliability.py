"""Crash and resume, client failures, and bad input through the real command line."""

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

from tiny_project import BIN, project_env, run_cli, write_project

SLOW_TINY = {"rounds": 8, "sample_fraction": 1.0, "batch_size": 4, "lr": 0.01}


def _prepared(root: Path, **sections) -> Path:
    write_project(root, **sections)
    run_cli(root, "prepare")
    run_cli(root, "split")
    return root


def _mlflow_run(project: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    run_id = json.loads((project / "outputs/federate/mlflow_run.json").read_text())["run_id"]
    return client, run_id


@pytest.mark.slow
def test_kill_9_mid_round_then_rerun_resumes_with_identical_results(tmp_path: Path) -> None:
    reference = _prepared(tmp_path / "reference", federation=SLOW_TINY)
    run_cli(reference, "federate")

    project = _prepared(tmp_path / "killed", federation=SLOW_TINY)
    meta = project / "outputs/federate/checkpoint/meta.json"
    proc = subprocess.Popen(
        [str(BIN / "fedilora"), "federate"], cwd=project, env=project_env(project),
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

    run_cli(project, "federate")
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
def test_thirty_percent_client_failures_still_complete(tmp_path: Path) -> None:
    project = _prepared(tmp_path / "faulty", federation={"rounds": 4, "sample_fraction": 1.0}, faults={"client_failure_rate": 0.3})
    run_cli(project, "federate")
    client, run_id = _mlflow_run(project)
    failed = client.get_metric_history(run_id, "clients/failed")
    succeeded = client.get_metric_history(run_id, "clients/succeeded")
    assert len(failed) == len(succeeded) == 4
    assert all(m.value >= 1 for m in succeeded)
    run = client.get_run(run_id)
    assert run.data.params["faults.client_failure_rate"] == "0.3"


@pytest.mark.slow
def test_all_clients_failing_stops_with_a_clear_error_and_keeps_old_outputs(tmp_path: Path) -> None:
    project = _prepared(tmp_path / "broken", federation={"rounds": 2})
    run_cli(project, "federate")
    metrics = project / "outputs/federate/metrics.json"
    before = hashlib.sha256(metrics.read_bytes()).hexdigest()
    proc = run_cli(project, "federate", "-S", "faults.client_failure_rate=1.0", "-S", "runner.retries=0", check=False)
    assert proc.returncode != 0
    assert "federation.min_clients" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert hashlib.sha256(metrics.read_bytes()).hexdigest() == before


# ---- bad input: one line naming the field or file, non-zero exit, no traceback ----------------

BAD_PARAMS = [
    ({"federaton": {"rounds": 2}}, "federaton"),
    ({"federation": {"lr": "fast"}}, "federation.lr"),
    ({"clients": {"ranks": [0, 4, 2, 2]}}, "clients.ranks"),
    ({"clients": {"ranks": [-4, 4, 2, 2]}}, "clients.ranks"),
    ({"clients": {"ranks": [64, 4, 2, 2]}}, "exceeds the width"),
    ({"clients": {"num_clients": 500, "ranks": [2]}}, "num_clients"),
    ({"missing": {"rate": -0.1}}, "missing.rate"),
    ({"aggregation": {"method": "fedsgd"}}, "aggregation.method"),
    ({"aggregation": {"method": "fedavg"}}, "fedavg needs equal ranks"),
    ({"missing": {"pattern": "audio"}}, "missing.pattern"),
    ({"clients": {"partition": "dirichlet", "dirichlet_alpha": 0}}, "clients.dirichlet_alpha"),
    ({"tracking": {"uri": "/proc/fedilora-mlruns"}}, "tracking.uri"),
    ({"data": {"root": "../../outside"}}, "data.root"),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return _prepared(tmp_path_factory.mktemp("bad"))


def _one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "data").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change, expected", BAD_PARAMS)
def test_bad_params_give_one_clear_line(prepared: Path, change: dict, expected: str) -> None:
    params = yaml.safe_load((prepared / "params.yaml").read_text())
    for section, values in change.items():
        params[section] = {**params.get(section, {}), **values} if section in params else values
    bad = prepared / "bad_params.yaml"
    bad.write_text(yaml.safe_dump(params))
    before = _snapshot(prepared)
    command = "split" if "num_clients" in expected or "dirichlet" in expected else "federate"
    _one_line_error(run_cli(prepared, command, "--params", str(bad), check=False), expected)
    assert _snapshot(prepared) == before


@pytest.mark.parametrize(
    "mutate, command, expected",
    [
        ("empty_dataset", "prepare", "dataset"),
        ("corrupt_features", "split", "features.safetensors"),
        ("corrupt_splits", "federate", "splits.parquet"),
        ("missing_params", "federate", "nope.yaml"),
        ("bad_override", "federate", "KEY=VALUE"),
        ("undecodable_image", "prepare", "row 3 does not decode"),
        ("label_out_of_range", "prepare", "label"),
        ("empty_texts", "prepare", "empty"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path: Path, prepared: Path, mutate: str, command: str, expected: str) -> None:
    project = tmp_path / "p"
    shutil.copytree(prepared, project, ignore=shutil.ignore_patterns(".prefect", "mlruns"))
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
    _one_line_error(run_cli(project, *args, check=False), expected)


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


@pytest.mark.parametrize("tamper, expected", [("shape", "has shape"), ("keys", "keys do not match")])
def test_adapter_file_with_wrong_shapes_or_keys_is_named(tmp_path: Path, prepared: Path, tamper: str, expected: str) -> None:
    """A checkpointed adapter that does not fit the model stops the resume, naming the file."""

    project = tmp_path / "p"
    shutil.copytree(prepared, project, ignore=shutil.ignore_patterns(".prefect", "mlruns"))
    run_cli(project, "federate", "-S", "federation.rounds=3", "-S", "faults.client_failure_rate=0.0")
    # fake an interrupted run: a checkpoint after round 1 whose global adapter was tampered with
    from fedilora import checkpoint
    from fedilora.config import load_params

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
    proc = run_cli(project, "federate", "-S", "federation.rounds=3", "-S", "faults.client_failure_rate=0.0", check=False)
    _one_line_error(proc, expected)
    assert "global.safetensors" in proc.stderr


def test_unreachable_prefect_server_is_named(prepared: Path) -> None:
    env = project_env(prepared) | {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    proc = subprocess.run([str(BIN / "fedilora"), "federate"], cwd=prepared, env=env, capture_output=True, text=True, timeout=120)
    _one_line_error(proc, "PREFECT_API_URL=http://127.0.0.1:9/api")


def test_debug_shows_the_traceback(prepared: Path) -> None:
    proc = run_cli(prepared, "federate", "--debug", "-S", "aggregation.method=nope", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
