"""The federated round in-process on the tiny project: every method runs and learns,
runs are deterministic, FLoRA's merge is undone between runs, editing starts in round 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedilora import lora, stages, variants
from fedilora.config import load_params
from fedilora.federation import Federation, model_spec, run
from fedilora.inputs import FeatureTable
from fedilora.models import adapters
from fedilora.models.shared import build
from fedilora.paths import DataPaths
from tiny_project import write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("fed")
    params_path = write_project(root, federation={"rounds": 3, "sample_fraction": 0.5, "batch_size": 8, "lr": 0.01})
    params = load_params(params_path)
    params = params.model_copy(
        update={"data": params.data.model_copy(update={"source": str(root / "dataset"), "root": root / "data"})}
    )
    stages.prepare(params)
    splits = stages.split(params)
    return params, splits


def _federation(project, model=None, **variant) -> Federation:
    params, splits = project
    if variant:
        params = variants.resolve(params, variant["name"])
    table = FeatureTable.load(DataPaths.of(params).features)
    return Federation(params, table, splits, model=model)


@pytest.mark.parametrize("variant", ["fedilora+edit", "fedilora", "hetlora", "flexlora", "flora"])
def test_every_method_runs_and_learns(project, variant: str) -> None:
    fed = _federation(project, name=variant)
    state, results = run(fed)
    assert [r.round for r in results] == [1, 2, 3]
    final = results[-1].summary()
    assert final["global/accuracy"] > 0.6  # 3 classes: chance is 1/3
    assert final["personalized/accuracy"] > 0.6
    assert "global/missing_image/accuracy" in final and "global/missing_text/accuracy" in final
    edits = sum(len(u.edits) for r in results for u in r.updates)
    assert (edits > 0) == variant.endswith("+edit")
    assert all(not u.edits for u in results[0].updates)  # no previous global in round 1


def test_runs_are_deterministic_and_share_one_model(project) -> None:
    first = _federation(project, name="flora")
    _, a = run(first)
    second = _federation(project, model=first.shared, name="flora")  # FLoRA merged into the base
    _, b = run(second)
    assert [r.summary() for r in a] == [r.summary() for r in b]
    assert second.model is first.model


def test_flora_merge_is_undone_for_the_next_run(project) -> None:
    fed = _federation(project, name="flora")
    weights = adapters.target_base_weights(fed.model)
    before = {k: w.clone() for k, w in weights.items()}
    run(fed)
    assert any(not torch.equal(before[k], w) for k, w in weights.items())
    fed.initial_global_state()
    assert all(torch.equal(before[k], w) for k, w in weights.items())


def test_unowned_rank_dimensions_keep_the_previous_global(project) -> None:
    fed = _federation(project, name="fedilora")
    previous = fed.initial_global_state()
    low = [c for c, r in enumerate(fed.ranks) if r == min(fed.ranks)]
    updates = [fed.client_update(c, previous, 1) for c in low]
    new = fed.aggregate(updates, previous)
    r_low, r_max = min(fed.ranks), max(fed.ranks)
    assert lora.rank_of(new) == r_max
    a_key = next(k for k in new if "lora_A." in k)
    assert torch.equal(new[a_key][r_low:], previous[a_key][r_low:])
    assert not torch.equal(new[a_key][:r_low], previous[a_key][:r_low])


def test_sampling_is_seeded(project) -> None:
    fed = _federation(project)
    assert fed.sample_clients(1) == fed.sample_clients(1)
    assert len(fed.sample_clients(1)) == round(0.5 * len(fed.ranks))


def test_splits_must_match_the_client_count(project) -> None:
    params, splits = project
    table = FeatureTable.load(DataPaths.of(params).features)
    other = params.model_copy(update={"clients": params.clients.model_copy(update={"num_clients": 5, "ranks": [2]})})
    with pytest.raises(ValueError, match="rerun `fedilora split`"):
        Federation(other, table, splits, model=build(model_spec(params, table)))
