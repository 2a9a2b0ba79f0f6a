"""End to end: `dvc repro` on a tiny project in a temporary git repo, then what it left behind:
DVC outputs and status, the MLflow run, a PEFT adapter that reproduces the logged accuracy,
and the Prefect flow run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_project import project_env, write_project

REPO = Path(__file__).resolve().parents[1]


def _env(project: Path) -> dict[str, str]:
    return project_env(
        project, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com"
    )


def _run(cmd: list[str], project: Path) -> str:
    proc = subprocess.run(cmd, cwd=project, env=_env(project), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project, a git + DVC repo with the real dvc.yaml and code, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("e2e")
    write_project(root)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for name in ("fedilora", "tasks", "flows", "bin"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "tiny project"], root)
    root.joinpath("first_repro.log").write_text(_run(["dvc", "repro"], root))
    return root


@pytest.mark.slow
def test_dvc_repro_runs_every_stage(project: Path) -> None:
    log = project.joinpath("first_repro.log").read_text()
    for stage in ("prepare", "split", "federate", "compare", "report"):
        assert f"Running stage '{stage}'" in log
    metrics = json.loads((project / "outputs/federate/metrics.json").read_text())
    assert metrics["rounds"] == 2
    assert 0.0 <= metrics["global_accuracy"] <= 1.0
    compare = json.loads((project / "outputs/compare/metrics.json").read_text())
    assert set(compare["variants"]) == {"fedilora+edit", "hetlora"} and compare["seeds"] == 2
    for name in ("report.md", "global_accuracy.png", "clients.png"):
        assert (project / "reports" / name).stat().st_size > 0
    stats = json.loads((project / "data/split_stats.json").read_text())
    assert stats["num_clients"] == 4
    assert (project / "dvc.lock").is_file()


@pytest.mark.slow
def test_second_repro_does_nothing_and_one_param_reruns_only_its_stages(project: Path) -> None:
    log = _run(["dvc", "repro"], project)
    assert "Running stage" not in log
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("lr: 0.01", "lr: 0.02"))
    try:
        status = json.loads(_run(["dvc", "status", "--json"], project))
        assert set(status) == {"federate", "compare"}
    finally:
        (project / "params.yaml").write_text(params)
    assert json.loads(_run(["dvc", "status", "--json"], project)) == {}


@pytest.mark.slow
def test_mlflow_run_has_every_round_and_a_loadable_adapter(project: Path) -> None:
    from mlflow.tracking import MlflowClient

    from fedilora.config import load_params
    from fedilora.data import load_splits
    from fedilora.federation import aligned_path, model_spec, subsets_from_splits
    from fedilora.models.shared import load_adapter_model
    from fedilora.inputs import FeatureTable
    from fedilora.training import evaluate

    metrics = json.loads((project / "outputs/federate/metrics.json").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(json.loads((project / "outputs/federate/mlflow_run.json").read_text())["run_id"])
    assert run.data.tags["method"] == "fedilora"
    assert run.data.params["aggregation.method"] == "fedilora"
    for name in ("global/accuracy", "personalized/accuracy", "global/missing_image/accuracy", "global/missing_text/accuracy"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "global/accuracy")}
    assert logged[2] == pytest.approx(metrics["global_accuracy"], abs=1e-4)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapters")}
    assert "adapters/global" in artifacts
    local = Path(client.download_artifacts(run.info.run_id, "adapters/global", str(project / "download")))
    assert (local / "adapter_model.safetensors").is_file()

    params = load_params(project / "params.yaml")
    table = FeatureTable.load(project / "data/features.safetensors")
    _, _, global_test = subsets_from_splits(load_splits(project / "data/splits.parquet"))
    model = load_adapter_model(model_spec(params, table, aligned_path(params)), local)
    with torch.no_grad():
        acc = evaluate(model, table, global_test)["accuracy"]
    assert acc == pytest.approx(logged[2], abs=1e-6)


@pytest.mark.slow
def test_prefect_flow_runs_are_recorded_completed(project: Path) -> None:
    script = (
        "import asyncio\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        runs = await c.read_flow_runs()\n"
        "        print(sorted({(r.name and (await c.read_flow(r.flow_id)).name, r.state.type.value) for r in runs}))\n"
        "asyncio.run(main())\n"
    )
    out = _run([sys.executable, "-c", script], project)
    assert "('federated_training', 'COMPLETED')" in out
    assert "('compare_methods', 'COMPLETED')" in out
    assert "FAILED" not in out


@pytest.mark.slow
def test_compare_pairs_seeds_and_logs_the_intervals(project: Path) -> None:
    """compare.seeds=[0, 1]: every variant under both seeds, the paired difference with its interval
    in the files, the report (in words first) and MLflow (parent, variant and seed runs)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    out = project / "outputs/compare"
    seeds = pd.read_csv(out / "seeds.csv")
    assert sorted(zip(seeds["variant"], seeds["seed"])) == [("fedilora+edit", 0), ("fedilora+edit", 1), ("hetlora", 0), ("hetlora", 1)]
    pairs = pd.read_csv(out / "pairs.csv")
    primary = pairs[pairs["metric"] == "global_accuracy_last3"].iloc[0]
    per_seed = seeds.set_index(["variant", "seed"])["global_accuracy_last3"]
    diffs = [per_seed["fedilora+edit", s] - per_seed["hetlora", s] for s in (0, 1)]
    assert primary["mean"] == pytest.approx(sum(diffs) / 2) and primary["seeds"] == 2
    assert primary["ci_low"] <= primary["mean"] <= primary["ci_high"]
    report = (project / "reports/report.md").read_text()
    assert report.index("Which methods differ") < report.index("Each variant") < report.index("Main run")
    assert "| fedilora+edit − hetlora |" in report

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fedilora").experiment_id], max_results=100)
    parent = next(r for r in runs if r.info.run_name == "compare")
    for key in ("mean", "ci_low", "ci_high"):
        assert f"compare/fedilora-edit_minus_hetlora/{key}" in parent.data.metrics
    assert parent.data.metrics["compare/fedilora-edit_minus_hetlora/mean"] == pytest.approx(primary["mean"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {"comparison/pairs.csv", "comparison/comparison.csv"}
    variants = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(variants) == {"fedilora+edit", "hetlora"}
    seed_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == variants["hetlora"].info.run_id]
    assert sorted(r.data.tags["seed"] for r in seed_runs) == ["0", "1"]
    assert all(r.data.params["seed"] == r.data.tags["seed"] for r in seed_runs)


@pytest.mark.slow
def test_dvc_experiment_compares_methods(project: Path) -> None:
    _run(["dvc", "exp", "run", "-S", "aggregation.method=hetlora", "-S", "editing.enabled=false", "-n", "het"], project)
    proc = subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, env=_env(project), capture_output=True, text=True, timeout=120)
    text = json.dumps(json.loads(proc.stdout))
    assert '"het"' in text and "hetlora" in text
    assert "global_accuracy" in text
    # the workspace itself is left as it was
    assert json.loads(_run(["dvc", "status", "--json"], project)) == {}
