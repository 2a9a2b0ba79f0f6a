"""The quality study: settings and runs from the study file, verdicts on known numbers, a tiny
study through the CLI (Prefect flow on a process pool, MLflow runs read back, report), resume, and
bad study files."""

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
    "reference": {"federation.rounds": 2, "missing.rate": 0.4},
    "settings": {"missing_0": {"missing.rate": 0.0}, "equal_ranks": {"overrides": {"clients.ranks": [4]}, "extra": ["fedavg"]}},
    "variants": ["hetlora", "fedilora", "fedilora+edit"],
    "ablations": {
        "official": {"variant": "fedilora@official", "against": "fedilora"},
        "b_columns": {"variant": "fedilora", "overrides": {"aggregation.options": {"b_columns": "official"}}},
    },
    "seeds": [0, 1],
    "reference_seeds": [0, 1, 2],
    "experiment": "study-test",
    "runner": {"task_runner": "dask", "n_workers": 2},
}


def write_study(folder: Path, **changes) -> Path:
    if not (folder / "params.yaml").is_file():
        write_project(folder)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **changes}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("study")
    write_study(folder)
    return folder


def test_settings_runs_and_params(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    study = st.load_study("study.yaml")
    assert st.setting_names(study) == ["reference", "missing_0", "equal_ranks"]
    assert st.seeds_for(study, "reference") == [0, 1, 2] and st.seeds_for(study, "missing_0") == [0, 1]
    assert list(st.runs_for(study, "reference")) == ["hetlora", "fedilora", "fedilora+edit", "official", "b_columns"]
    assert list(st.runs_for(study, "equal_ranks")) == ["hetlora", "fedilora", "fedilora+edit", "fedavg"]
    params = st.run_params(study, "missing_0", 7, "fedilora+edit")
    assert params.seed == 7 and params.missing.rate == 0.0 and params.federation.rounds == 2 and params.editing.enabled
    ablated = st.run_params(study, "reference", 0, "b_columns")
    assert ablated.aggregation.options == {"b_columns": "official"} and not ablated.editing.enabled
    official = st.run_params(study, "reference", 0, "official")
    assert official.lora.alpha_mode == "fixed" and official.missing.fill == "placeholder"
    assert st.unit_key(study, "reference", 0) != st.unit_key(study, "reference", 1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"variants": ["fedilora+magic"]}, "fedilora\\+magic"),
        ({"settings": {"x": {"overrides": {}, "variants": ["nope@x"]}}}, "nope@x"),
        ({"settings": {**STUDY["settings"], "bad": {"missing.rate": 1.5}}}, "setting 'bad'.*missing.rate"),
        ({"seed": 3}, "seed"),
    ],
)
def test_bad_study_files_name_the_field(project: Path, monkeypatch, change: dict, message: str) -> None:
    monkeypatch.chdir(project)
    path = Path("bad.yaml")
    path.write_text(yaml.safe_dump({**STUDY, **change}))
    with pytest.raises(ConfigError, match=message):
        st.load_study(path)


def test_verdicts_and_ablations_on_known_numbers(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    study = st.load_study("study.yaml").model_copy(update={"ablation_seeds": [0, 1]})  # fewer seeds than the reference's
    rows = []
    gap = {"hetlora": 0.0, "fedilora": 0.10, "fedilora+edit": 0.10, "official": 0.02, "b_columns": 0.10, "fedavg": 0.0}
    for setting in st.setting_names(study):
        for seed in st.seeds_for(study, setting):
            for label in st.runs_for(study, setting, seed):
                for r in (1, 2):
                    acc = 0.5 + gap[label] + 0.01 * seed
                    rows.append({"setting": setting, "variant": label, "seed": seed, "round": r, "global_accuracy": acc,
                                 "personalized_accuracy": acc, "global_missing_image_accuracy": acc, "global_missing_text_accuracy": acc})
    seeds = st.per_seed(pd.DataFrame(rows))
    verdicts = st.verdicts(study, seeds, ["global_accuracy_last3"]).set_index(["setting", "claim"])
    beat = verdicts.loc[("reference", "fedilora beats hetlora")]
    assert beat["mean"] == pytest.approx(0.10) and beat["verdict"] == "better" and beat["seeds"] == 3
    assert verdicts.loc[("missing_0", "editing improves fedilora"), "verdict"] == "indistinguishable"  # no difference
    ablations = st.ablation_table(study, seeds, "global_accuracy_last3").set_index("ablation")
    assert ablations.loc["official", "change_mean"] == pytest.approx(-0.08) and ablations.loc["official", "against"] == "fedilora"
    assert ablations.loc["official", "seeds"] == 2  # paired over the seeds both ran
    assert ablations.loc["b_columns", "margin_mean"] == pytest.approx(0.10) and ablations.loc["b_columns", "best_baseline"] == "hetlora"


@pytest.mark.slow
def test_tiny_study_end_to_end(project: Path) -> None:
    run_cli(project, "prepare")
    run_cli(project, "study", "--study", "study.yaml")
    report = project / "reports/study"
    for name in ("study.md", "summary.csv", "results.csv", "verdicts.csv", "ablations.csv",
                 "accuracy_vs_missing_rate.png", "accuracy_per_round.png", "diagnostics_share.png"):
        assert (report / name).stat().st_size > 0, name
    table = pd.read_csv(report / "summary.csv")
    assert len(table) == 5 + 3 + 4
    assert table.set_index(["setting", "variant"]).loc[("reference", "fedilora"), "seeds"] == 3
    eq = table[table.setting == "equal_ranks"].set_index("variant")
    # equal ranks: FediLoRA's dimension-wise mean is FedAvg's mean, so the runs coincide
    assert eq.loc["fedilora", "global_accuracy_last3"] == pytest.approx(eq.loc["fedavg", "global_accuracy_last3"], abs=1e-9)
    text = (report / "study.md").read_text()
    assert "## The paper's claims" in text and "## Ablations at the reference" in text
    verdicts = pd.read_csv(report / "verdicts.csv")
    assert set(verdicts["claim"]) == {"fedilora beats hetlora", "editing improves fedilora"}
    assert verdicts["ci_low"].le(verdicts["mean"]).all() and verdicts["mean"].le(verdicts["ci_high"]).all()

    client = MlflowClient(f"sqlite:///{project / 'mlruns/mlflow.db'}")
    exp = client.get_experiment_by_name("study-test")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    assert len(runs) == 5 * 3 + 3 * 2 + 4 * 2
    one = next(r for r in runs if r.data.tags["mlflow.runName"] == "reference/b_columns/seed1")
    assert one.data.params["aggregation.options.b_columns"] == "official" and one.data.params["seed"] == "1"
    assert [m.step for m in client.get_metric_history(one.info.run_id, "global/accuracy")] == [1, 2]
    assert client.get_metric_history(one.info.run_id, "diag/highest_rank_share")

    # a rerun finds every (setting, seed) on disk: nothing is trained or logged again
    run_cli(project, "study", "--study", "study.yaml")
    assert json.loads((project / "outputs/study/timing.json").read_text())["units_run"] == 0
    assert len(client.search_runs([exp.experiment_id], max_results=200)) == len(runs)
