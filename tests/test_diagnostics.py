"""Per-rank-dimension diagnostics: owners, weights, and shares of the global change that add up."""

from __future__ import annotations

import pytest
import torch

from fedilora import aggregation
from fedilora.diagnostics import rank_dimensions
from fedilora.lora import b_key
from fedilora.methods import Setup, strategy
from fedilora.methods.testing import a_key, make_state

RANKS, CLIENTS, N = [2, 4, 8], [3, 5, 7], [10, 20, 30]


def _diagnose(method: str, server_lr: float = 1.0, options: dict | None = None) -> dict:
    states = [make_state(r, s) for s, r in enumerate(RANKS)]
    previous = make_state(8, 9)
    chosen = strategy(method, Setup(0, tuple(RANKS), lambda r: 2.0 * r, server_lr), options)
    new = chosen.aggregate(states, RANKS, N, previous).state
    weights = chosen.dimension_weights(states, RANKS, aggregation.sample_weights(N))
    return rank_dimensions(previous, new, states, RANKS, CLIENTS, weights, server_lr)


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_fedilora_shares_add_up_and_single_owners_supply_everything(server_lr: float) -> None:
    out = _diagnose("fedilora", server_lr)
    dims = out["dimensions"]
    assert [d["owners"] for d in dims[:2]] == [CLIENTS, CLIENTS] and dims[5]["owners"] == [7]
    assert dims[3]["weights"] == pytest.approx([20 / 50, 30 / 50])
    for d in dims:
        assert sum(d["shares"]) == pytest.approx(1.0)  # owner weights sum to 1: no residual
    assert dims[6]["shares"] == pytest.approx([1.0])  # one owner: all of the change is its
    summary = out["summary"]
    assert summary["unowned_dims"] == 0 and summary["change_norm"] > 0
    assert 0 < summary["highest_rank_share"] <= summary["top_client_share"] + 1e-12
    assert sum(out["client_shares"].values()) == pytest.approx(1.0)


def test_hetlora_high_dimensions_leave_a_residual_toward_zero() -> None:
    dims = _diagnose("hetlora")["dimensions"]
    assert sum(dims[0]["shares"]) == pytest.approx(1.0)  # every client's weight: they sum to 1
    assert sum(dims[6]["shares"]) < 1.0  # one owner with weight < 1: the rest shrinks toward 0


def test_official_b_columns_weights_reconstruct_the_global() -> None:
    """The weights the diagnostics use are the ones the method applied, on B's columns too."""
    states = [make_state(r, s) for s, r in enumerate(RANKS)]
    chosen = strategy("fedilora", Setup(0, (2, 4, 8), lambda r: 2.0 * r), {"b_columns": "official"})
    new = chosen.aggregate(states, RANKS, N, make_state(8, 9)).state
    _, w_b = chosen.dimension_weights(states, RANKS, aggregation.sample_weights(N))
    for j in range(8):
        rebuilt = sum(w_b[k, j].item() * s[b_key(a_key(0))][:, j] for k, s in enumerate(states) if RANKS[k] > j)
        torch.testing.assert_close(new[b_key(a_key(0))][:, j], rebuilt, rtol=1e-5, atol=1e-6)


def test_methods_without_dimension_weights_report_owners_only() -> None:
    out = _diagnose("flora")
    assert out["dimensions"][7] == {"j": 7, "owners": [7]}
    assert set(out["summary"]) == {"unowned_dims"}
