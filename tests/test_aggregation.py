"""The aggregation entry point every method shares: input validation with errors naming the
client and key, the registry, and what holds for every method (inputs untouched, float32 out,
trained non-LoRA parameters averaged with the sample weights). Each method's own math is tested
beside it, in fedilora/methods/test_<method>.py."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fedilora.methods import REGISTRY, aggregate
from fedilora.methods.testing import HEAD_B, HEAD_W, b_key, make_state


def test_registry_holds_the_five_methods() -> None:
    assert set(REGISTRY) == {"fedavg", "hetlora", "flora", "flexlora", "fedilora"}
    assert all(cls.name == name for name, cls in REGISTRY.items())


def test_unknown_method_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown aggregation method 'fedprox'.*fedilora"):
        aggregate("fedprox", [make_state(4, 0)], [4], [1])


def test_unknown_option_raises() -> None:
    with pytest.raises(ValueError, match=r"method 'fedilora' got unknown options \['rank'\]"):
        aggregate("fedilora", [make_state(4, 0)], [4], [1], rank=3)
    with pytest.raises(ValueError, match="invalid options.*unowned"):
        aggregate("fedilora", [make_state(4, 0)], [4], [1], unowned="drop")


def test_shape_inconsistent_with_rank_named() -> None:
    states = [make_state(4, 0), make_state(8, 1)]
    with pytest.raises(ValueError, match=r"client 1: '.*layer\.0.*lora_A\.weight' has shape \(8, 12\), expected \(4, 12\)"):
        aggregate("fedilora", states, [4, 4], [1, 1])
    bad = make_state(4, 2)
    bad[b_key(1)] = torch.randn(11, 4)
    with pytest.raises(ValueError, match=r"client 1: '.*layer\.1.*lora_B\.weight' has shape \(11, 4\), expected \(10, 4\)"):
        aggregate("fedilora", [make_state(4, 0), bad], [4, 4], [1, 1])


@pytest.mark.parametrize(
    ("states", "ranks", "n", "match"),
    [
        ([], [], [], "no client states"),
        ([make_state(4, 0)], [4, 4], [1], "1 states but 2 ranks"),
        ([make_state(4, 0)], [4], [1, 2], "1 states but 2 num_samples"),
        ([make_state(4, 0), make_state(4, 1)], [4, 4], [1, 0], "client 1: num_samples must be positive"),
        ([make_state(4, 0), make_state(4, 1)], [4, 0], [1, 1], "client 1: rank must be a positive integer"),
        ([make_state(4, 0), make_state(4, 1, head=False)], [4, 4], [1, 1], "client 1: key .*classifier.* is missing"),
        ([make_state(4, 0, head=False), make_state(4, 1)], [4, 4], [1, 1], "client 1: key .*classifier.* is not in client 0"),
    ],
)
def test_invalid_inputs(states: list[dict[str, Tensor]], ranks: list[int], n: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aggregate("fedilora", states, ranks, n)


def test_unpaired_factor_named() -> None:
    state = make_state(4, 0)
    del state[b_key(0)]
    with pytest.raises(ValueError, match="has no B factor"):
        aggregate("fedilora", [state], [4], [1])


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_inputs_not_mutated_and_others_averaged(method: str) -> None:
    ranks = [4, 4] if method == "fedavg" else [2, 4]
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    out = aggregate(method, states, ranks, [1, 3], scalings=[2.0, 1.0])
    for s, b in zip(states, before):
        for key in s:
            torch.testing.assert_close(s[key], b[key], rtol=0, atol=0)
    for key in out:  # outputs never alias inputs
        assert all(out[key].data_ptr() != s[key].data_ptr() for s in states)
    assert list(out) == list(states[0])  # the clients' key order
    for key in (HEAD_W, HEAD_B):
        torch.testing.assert_close(out[key], 0.25 * states[0][key] + 0.75 * states[1][key])


@pytest.mark.parametrize("method", ["hetlora", "flora", "flexlora", "fedilora"])
def test_low_precision_inputs_give_float32(method: str) -> None:
    states = [{k: v.to(torch.bfloat16) for k, v in make_state(r, s).items()} for s, r in enumerate([2, 4])]
    out = aggregate(method, states, [2, 4], [1, 1])
    assert all(t.dtype == torch.float32 for t in out.values())
