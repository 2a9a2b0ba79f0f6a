"""The quality study: grid expansion, a tiny study through the CLI (Prefect flow on a process
pool, MLflow runs read back, table and plots), resume, and bad study files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from fedilora import study as st
from fedilora.config import ConfigError
from tiny_project import run_cli, write_project

STUDY = {
    "base_params": "params.yaml",
    "overrides": {"federation.rounds": 2},
    "methods": ["fedavg", "hetlora", "fedilora", "fedilora+edit"],
    "seeds": [0, 1],
    "rank_sets": {"het": [4, 4, 2, 2], "hom": [4]},
    "sweeps": {
        "missing": {"ranks": ["het"], "dirichlet_alpha": [0.5], "missing_rate": [0.0, 0.5], "pattern": ["both"]},
        "equal": {"ranks": ["hom"], "dirichlet_alpha": [0.5], "missing_rate": [0.0], "pattern": ["image", "text"]},
    },
    "experiment": "study-test",
    "runner": {"task_runner": "dask", "n_workers": 2},
}


def write_study(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**STUDY, **changes}, sort_keys=False))
    return path


def test_settings_union_of_sweeps_and_full_grid(tmp_path: Path) -> None:
    study = st.load_study(write_study(tmp_path / "s.yaml"))
    names = [s.name for s in st.settings(study)]
    # rate 0 ignores the pattern: 'image' and 'text' at rate 0 are one setting
    assert names == ["het-dir0.5-complete", "het-dir0.5-both0.5", "hom-dir0.5-complete"]
    assert st.methods_for(study, st.settings(study)[0]) == ["hetlora", "fedilora", "fedilora+edit"]
    assert st.methods_for(study, st.settings(study)[2]) == STUDY["methods"]
    full = st.settings(st.load_study(write_study(tmp_path / "f.yaml", full_grid=True)))
    # 2 rank sets x 1 alpha x (complete + 3 patterns at rate 0.5)
    assert len(full) == 2 * 4
    params = st.run_params(study, st.settings(study)[1], seed=7)
    assert params.seed == 7 and params.missing.rate == 0.5 and params.clients.partition == "dirichlet"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": ["fedsgd"]}, "unknown method 'fedsgd'"),
        ({"sweeps": {"x": {"ranks": ["nope"], "dirichlet_alpha": [1.0], "missing_rate": [0.0]}}}, "'nope'"),
        ({"sweeps": {"x": {"ranks": ["het"], "dirichlet_alpha": [1.0], "missing_rate": [1.5]}}}, "missing_rate"),
        ({"seed": 3}, "seed"),
    ],
)
def test_bad_study_files_name_the_field(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        st.load_study(write_study(tmp_path / "s.yaml", **change))


def test_summary_and_wins_on_known_numbers() -> None:
    rows = []
    for setting, gaps in (("a", (0.1, 0.0)), ("b", (-0.1, 0.2))):
        for seed in (0, 1):
            for method, acc in (("fedilora", 0.5 + gaps[0] + seed * 0.02), ("hetlora", 0.5), ("fedilora+edit", 0.5 + gaps[1])):
                rows.append({"setting": setting, "ranks": "het", "dirichlet_alpha": 0.5, "missing_rate": 0.0, "pattern": "both",
                             "seed": seed, "method": method, "round": 1, "global_accuracy": acc, "personalized_accuracy": acc,
                             "global_missing_image/accuracy": acc, "global_missing_text/accuracy": acc})
    table = st.summary_table(pd.DataFrame(rows))
    a = table[(table.setting == "a") & (table.method == "fedilora")].iloc[0]
    assert a["global_accuracy"] == pytest.approx(0.61) and a["global_accuracy_std"] == pytest.approx(0.02 / 2**0.5)
    assert a["seeds"] == 2
    assert st.wins(table, "fedilora", ["hetlora"], "global_accuracy") == (1, 2)
    assert st.wins(table, "fedilora+edit", ["fedilora"], "global_accuracy") == (1, 2)


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path: Path) -> None:
    project = tmp_path / "p"
    write_project(project)
    run_cli(project, "prepare")
    write_study(project / "study.yaml")
    run_cli(project, "study", "--study", "study.yaml")

    report = project / "reports/study"
    for name in ("study.md", "summary.csv", "results.csv", "accuracy_vs_missing_rate.png", "accuracy_per_round.png"):
        assert (report / name).stat().st_size > 0, name
    table = pd.read_csv(report / "summary.csv")
    # het settings run 3 methods, the equal-rank one all 4; each cell averages both seeds
    assert len(table) == 3 + 3 + 4 and (table["seeds"] == 2).all()
    assert table["global_accuracy"].between(0, 1).all() and table["personalized_accuracy"].between(0, 1).all()
    hom = table[table.setting == "hom-dir0.5-complete"].set_index("method")
    # equal ranks: FediLoRA's dimension-wise mean is FedAvg's mean, so the runs coincide
    assert hom.loc["fedilora", "global_accuracy"] == pytest.approx(hom.loc["fedavg", "global_accuracy"], abs=1e-9)
    assert "## The paper's claims here" in (report / "study.md").read_text()

    client = MlflowClient(f"sqlite:///{project / 'mlruns/mlflow.db'}")
    exp = client.get_experiment_by_name("study-test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == (3 + 3 + 4) * 2
    one = next(r for r in runs if r.data.tags["mlflow.runName"] == "het-dir0.5-both0.5/fedilora/seed1")
    assert one.data.params["missing_rate"] == "0.5"
    history = client.get_metric_history(one.info.run_id, "global/accuracy")
    assert [m.step for m in history] == [1, 2]

    # a rerun finds every (setting, seed) on disk: nothing is trained or logged again
    run_cli(project, "study", "--study", "study.yaml")
    assert json.loads((project / "outputs/study/timing.json").read_text())["units_run"] == 0
    assert len(client.search_runs([exp.experiment_id], max_results=100)) == len(runs)
