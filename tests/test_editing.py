"""Layer-wise model editing: which tensors are edited, and the exact edit formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fedilora.editing import EditRecord, cosine, edit_adapter

D_IN, D_OUT, R = 6, 5, 3
HEAD = "base_model.model.classifier.weight"


def a_key(layer: int) -> str:
    return f"base_model.model.layer.{layer}.attention.query.lora_A.weight"


def b_key(layer: int) -> str:
    return f"base_model.model.layer.{layer}.attention.query.lora_B.weight"


def make_global(rank: int = R, layers: int = 3, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for i in range(layers):
        state[a_key(i)] = torch.randn(rank, D_IN, generator=g)
        state[b_key(i)] = torch.randn(D_OUT, rank, generator=g)
    state[HEAD] = torch.randn(2, D_OUT, generator=g)
    return state


def perturbed(global_state: dict[str, Tensor], noise: dict[str, float], rank: int = R) -> dict[str, Tensor]:
    """Local state = global cut to ``rank`` plus noise of the given size per key (0 elsewhere)."""
    g = torch.Generator().manual_seed(1)
    local: dict[str, Tensor] = {}
    for key, t in global_state.items():
        cut = t[:rank] if "lora_A." in key else t[:, :rank] if "lora_B." in key else t
        local[key] = cut.clone() + noise.get(key, 0.0) * torch.randn(cut.shape, generator=g)
    return local


def assert_unchanged(out: dict[str, Tensor], local: dict[str, Tensor], skip: set[str]) -> None:
    for key in local:
        if key not in skip:
            torch.testing.assert_close(out[key], local[key], rtol=0, atol=0)


def test_only_least_similar_a_is_edited_with_blend_formula() -> None:
    glob = make_global()
    local = perturbed(glob, {a_key(0): 0.3, a_key(1): 2.0, a_key(2): 0.6, b_key(0): 5.0})
    before = {k: v.clone() for k, v in local.items()}
    out, records = edit_adapter(local, glob)
    s = cosine(local[a_key(1)], glob[a_key(1)])
    assert 0 < s < 0.95
    assert records == [EditRecord(a_key(1), s, True)]
    torch.testing.assert_close(out[a_key(1)], (1 - s) * glob[a_key(1)] + s * local[a_key(1)])
    assert_unchanged(out, local, {a_key(1)})  # B0 is far less similar but is not an A factor
    assert_unchanged(local, before, set())  # input not mutated


def test_similarity_above_threshold_no_edit() -> None:
    glob = make_global()
    local = perturbed(glob, {a_key(0): 0.01, a_key(1): 0.02})
    out, records = edit_adapter(local, glob)
    assert len(records) == 1 and records[0].key == a_key(1)
    assert not records[0].edited and records[0].similarity >= 0.95
    assert_unchanged(out, local, set())


@pytest.mark.parametrize(("mode", "coef"), [("replace", 1.0), ("half", 0.5)])
def test_replace_and_half(mode: str, coef: float) -> None:
    glob = make_global()
    local = perturbed(glob, {a_key(2): 3.0})
    out, records = edit_adapter(local, glob, mode=mode)
    assert records[0].key == a_key(2) and records[0].edited
    expected = coef * glob[a_key(2)] + (1 - coef) * local[a_key(2)]
    torch.testing.assert_close(out[a_key(2)], expected)
    assert_unchanged(out, local, {a_key(2)})


def test_factors_b_and_both() -> None:
    glob = make_global()
    local = perturbed(glob, {a_key(0): 1.0, b_key(2): 2.0})
    out, records = edit_adapter(local, glob, factors="B", mode="replace")
    assert [r.key for r in records] == [b_key(2)]
    torch.testing.assert_close(out[b_key(2)], glob[b_key(2)])
    assert_unchanged(out, local, {b_key(2)})

    out, records = edit_adapter(local, glob, factors="both", num_layers=2, mode="replace")
    assert {r.key for r in records} == {a_key(0), b_key(2)}
    assert all(r.edited for r in records)
    assert_unchanged(out, local, {a_key(0), b_key(2)})


def test_global_of_larger_rank_is_cut() -> None:
    glob = make_global(rank=8)
    local = perturbed(glob, {a_key(1): 2.0, b_key(1): 2.0}, rank=R)
    out, records = edit_adapter(local, glob, factors="both", num_layers=2, mode="replace")
    assert {r.key for r in records} == {a_key(1), b_key(1)}
    torch.testing.assert_close(out[a_key(1)], glob[a_key(1)][:R])
    torch.testing.assert_close(out[b_key(1)], glob[b_key(1)][:, :R])
    assert out[a_key(1)].shape == (R, D_IN) and out[b_key(1)].shape == (D_OUT, R)


def test_negative_similarity_clipped_to_global() -> None:
    glob = make_global()
    local = perturbed(glob, {})
    local[a_key(0)] = -glob[a_key(0)]
    out, records = edit_adapter(local, glob)
    assert records[0].key == a_key(0)
    assert math.isclose(records[0].similarity, -1.0, abs_tol=1e-6)  # reported unclipped
    torch.testing.assert_close(out[a_key(0)], glob[a_key(0)])


def test_num_layers_two_edits_two_least_similar() -> None:
    glob = make_global()
    local = perturbed(glob, {a_key(0): 4.0, a_key(1): 0.05, a_key(2): 2.0})
    out, records = edit_adapter(local, glob, num_layers=2)
    assert len(records) == 2 and {r.key for r in records} == {a_key(0), a_key(2)}
    assert records[0].similarity <= records[1].similarity
    for r in records:
        expected = (1 - r.similarity) * glob[r.key] + r.similarity * local[r.key]
        torch.testing.assert_close(out[r.key], expected)
    assert_unchanged(out, local, {a_key(0), a_key(2)})


def test_zero_norm_tensor_has_similarity_zero() -> None:
    glob = make_global()
    local = perturbed(glob, {})
    local[a_key(1)] = torch.zeros(R, D_IN)
    out, records = edit_adapter(local, glob)
    assert records == [EditRecord(a_key(1), 0.0, True)]
    torch.testing.assert_close(out[a_key(1)], glob[a_key(1)])  # s = 0 -> global


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"factors": "C"}, "factors must be"), ({"mode": "avg"}, "mode must be"), ({"num_layers": 0}, "num_layers")],
)
def test_invalid_options(kwargs: dict[str, object], match: str) -> None:
    glob = make_global()
    with pytest.raises(ValueError, match=match):
        edit_adapter(perturbed(glob, {}), glob, **kwargs)  # type: ignore[arg-type]


def test_key_missing_from_global_named() -> None:
    glob = make_global()
    local = perturbed(glob, {})
    del glob[a_key(2)]
    with pytest.raises(ValueError, match=r"layer\.2.*lora_A\.weight.*missing"):
        edit_adapter(local, glob)


def test_global_smaller_rank_raises() -> None:
    glob = make_global(rank=2)
    local = perturbed(make_global(rank=R), {})
    with pytest.raises(ValueError, match="cannot be cut"):
        edit_adapter(local, glob)
