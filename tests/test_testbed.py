"""The testbed's pieces: a public slice no client or test split touches, the alignment stage, what
``model.trainable`` trains, and ``federation.local_steps``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedilora import alignment, stages
from fedilora.config import load_params, parse_params
from fedilora.data.splits import PUBLIC, load_splits, make_splits
from fedilora.federation import Federation, aligned_path, run
from fedilora.inputs import FeatureTable
from fedilora.lora import is_factor
from fedilora.paths import DataPaths
from fedilora.training import Subset, length_bucketed_batches, train_local
from tiny_project import write_project

ALIGNED = {"data": {"public_fraction": 0.2}, "align": {"enabled": True, "epochs": 3, "lr": 0.01, "batch_size": 8},
           "model": {"name": "tiny", "trainable": "lora"}}


def test_public_slice_is_seed_free_and_disjoint() -> None:
    labels = np.repeat(np.arange(3), 40)
    plain = parse_params({"clients": {"num_clients": 4, "ranks": [2]}})
    with_slice = parse_params({"clients": {"num_clients": 4, "ranks": [2]}, "data": {"public_fraction": 0.25}})
    runs = {seed: make_splits(labels, with_slice.model_copy(update={"seed": seed})) for seed in (0, 1)}
    public = [set(s[s.client == PUBLIC]["row"]) for s in runs.values()]
    assert public[0] == public[1] and len(public[0]) == 30  # 25 % of 120, the same rows for every seed
    assert np.bincount(labels[sorted(public[0])]).tolist() == [10, 10, 10]  # stratified
    for s in runs.values():
        others = set(s[s.client != PUBLIC]["row"])
        assert not public[0] & others  # no client and no test split holds a public row
        assert (s[s.client == PUBLIC]["split"] == "public").all() and s[s.client == PUBLIC]["has_image"].all()
    base = make_splits(labels, plain)
    assert PUBLIC not in set(base["client"]) and len(base) == len(runs[0]) == 120  # every row is placed once


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("testbed")
    write_project(root, **ALIGNED)
    params = load_params(root / "params.yaml")
    params = params.model_copy(update={"data": params.data.model_copy(update={"source": str(root / "dataset"), "root": root / "data"})})
    stages.prepare(params)
    stages.split(params)
    alignment.run_stage(params)
    return root


def _params(project: Path, **changes):
    params = load_params(project / "params.yaml")
    params = params.model_copy(update={"data": params.data.model_copy(update={"source": str(project / "dataset"), "root": project / "data"})})
    return params.model_copy(update=changes)


def test_alignment_trains_only_the_trained_modules_and_is_checked(project: Path) -> None:
    params = _params(project)
    path = aligned_path(params)
    assert path == DataPaths.of(params).aligned
    fed = Federation(params, FeatureTable.load(path.parent / "features.safetensors"),
                     load_splits(DataPaths.of(params).splits).query("seed == 0"))
    base = fed.model.get_base_model()
    aligned = alignment.checked(params)
    from safetensors.torch import load_file

    weights = load_file(str(aligned))
    assert weights and all(k.startswith(("image_projector.", "classifier.")) for k in weights)
    for key, value in weights.items():  # the run's base starts from the aligned modules
        torch.testing.assert_close(base.state_dict()[key], value)
    other = params.model_copy(update={"align": params.align.model_copy(update={"epochs": 4})})
    with pytest.raises(ValueError, match="aligned for other align settings.*rerun `fedilora align`"):
        alignment.checked(other)


def test_trainable_lora_trains_and_sends_only_lora(project: Path) -> None:
    params = _params(project)
    table = FeatureTable.load(DataPaths.of(params).features)
    splits = load_splits(DataPaths.of(params).splits).query("seed == 0")
    fed = Federation(params, table, splits)
    head = {k: v.clone() for k, v in fed.model.get_base_model().classifier.state_dict().items()}
    state, results = run(fed, missing_every_round=False)
    assert state and all(is_factor(k) for k in state)  # no projector or head in what travels
    assert all(all(is_factor(k) for k in u.state) for r in results for u in r.updates)
    after = fed.model.get_base_model().classifier.state_dict()
    assert all(torch.equal(head[k], after[k]) for k in head)  # frozen at the aligned values
    both = parse_params({**ALIGNED, "model": {"name": "tiny", "trainable": "lora+head"}})
    assert both.model.trainable == "lora+head"


def test_local_steps_take_exactly_that_many_steps() -> None:
    lengths = torch.randint(1, 8, (10,))
    model = torch.nn.Linear(1, 1)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))

    class Table:  # what train_local reads of a feature table
        text_mask = torch.ones(10, 8, dtype=torch.bool)
        labels = torch.zeros(10, dtype=torch.long)

    def batch(table, rows, has_image, has_text, fill):
        return {"x": torch.ones(len(rows), 1), "labels": torch.zeros(len(rows), 1)}

    def forward(model_, batch_, runtime):  # the loss path: a regression on ones
        return (model_(batch_["x"]) ** 2).mean()

    data = Subset(torch.arange(10), torch.ones(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool))
    import fedilora.training as training

    original = training._forward
    training._forward = forward
    try:
        train_local(model, Table(), data, epochs=1, batch_size=4, lr=0.1, make_batch=batch, steps=7,
                    generator=torch.Generator().manual_seed(0))
    finally:
        training._forward = original
    assert len(calls) == 7  # 3 batches a pass (4, 4, 2): two passes and one more batch
    assert len(length_bucketed_batches(lengths, 4, torch.Generator().manual_seed(0))) == 3
