"""Aggregation strategies against hand computations and the identities of DESIGN.md section 1."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fedilora.aggregation import STRATEGIES, aggregate, client_share, global_rank

D_IN, D_OUT, LAYERS = 12, 10, 2
HEAD_W = "base_model.model.classifier.weight"
HEAD_B = "base_model.model.classifier.bias"


def a_key(layer: int, proj: str = "query") -> str:
    return f"base_model.model.layer.{layer}.attention.{proj}.lora_A.weight"


def b_key(layer: int, proj: str = "query") -> str:
    return f"base_model.model.layer.{layer}.attention.{proj}.lora_B.weight"


def make_state(rank: int, seed: int, *, head: bool = True, scale: float = 1.0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for i in range(LAYERS):
        state[a_key(i)] = scale * torch.randn(rank, D_IN, generator=g)
        state[b_key(i)] = scale * torch.randn(D_OUT, rank, generator=g)
    if head:
        state[HEAD_W] = torch.randn(3, D_OUT, generator=g)
        state[HEAD_B] = torch.randn(3, generator=g)
    return state


def probs(num_samples: list[int]) -> list[float]:
    return [n / sum(num_samples) for n in num_samples]


def pad_a(a: Tensor, r: int) -> Tensor:
    return torch.cat([a, torch.zeros(r - a.shape[0], a.shape[1])], dim=0)


def pad_b(b: Tensor, r: int) -> Tensor:
    return torch.cat([b, torch.zeros(b.shape[0], r - b.shape[1])], dim=1)


def test_registry_flags() -> None:
    assert set(STRATEGIES) == {"fedavg", "hetlora", "flora", "flexlora", "fedilora"}
    assert STRATEGIES["flora"].merged and STRATEGIES["flora"].fresh_clients
    assert STRATEGIES["flexlora"].merged and not STRATEGIES["flexlora"].fresh_clients
    assert not STRATEGIES["fedilora"].merged and not STRATEGIES["fedavg"].merged


def test_fedavg_is_weighted_mean() -> None:
    states = [make_state(4, s) for s in range(3)]
    n = [10, 30, 60]
    out = aggregate("fedavg", states, [4, 4, 4], n)
    p = probs(n)
    for key in states[0]:
        expected = sum(pk * s[key] for pk, s in zip(p, states))
        torch.testing.assert_close(out[key], expected)
        assert out[key].dtype == torch.float32


def test_fedilora_equals_fedavg_for_equal_ranks() -> None:
    states = [make_state(8, s) for s in range(4)]
    n = [5, 7, 11, 13]
    fedilora = aggregate("fedilora", states, [8] * 4, n)
    fedavg = aggregate("fedavg", states, [8] * 4, n)
    assert fedilora.keys() == fedavg.keys()
    for key in fedavg:
        torch.testing.assert_close(fedilora[key], fedavg[key], rtol=0, atol=0)


def test_fedilora_dimension_owned_by_one_client_is_not_diluted() -> None:
    ranks = [2, 4, 8]
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    out = aggregate("fedilora", states, ranks, [100, 1, 1])
    for i in range(LAYERS):
        torch.testing.assert_close(out[a_key(i)][4:], states[2][a_key(i)][4:])
        torch.testing.assert_close(out[b_key(i)][:, 4:], states[2][b_key(i)][:, 4:])


def test_fedilora_shared_dimensions_hand_computed() -> None:
    ranks = [2, 4, 8]
    n = [10, 20, 70]
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    out = aggregate("fedilora", states, ranks, n)
    a = [s[a_key(1)] for s in states]
    b = [s[b_key(1)] for s in states]
    # rows 0-1: all three clients, p = (.1, .2, .7)
    torch.testing.assert_close(out[a_key(1)][:2], 0.1 * a[0] + 0.2 * a[1][:2] + 0.7 * a[2][:2])
    # rows 2-3: clients 1 and 2, weights 20/90 and 70/90
    torch.testing.assert_close(out[a_key(1)][2:4], (20 * a[1][2:4] + 70 * a[2][2:4]) / 90)
    torch.testing.assert_close(out[b_key(1)][:, :2], 0.1 * b[0] + 0.2 * b[1][:, :2] + 0.7 * b[2][:, :2])
    # B columns above the first client's rank keep every owner's values (official-code defect)
    torch.testing.assert_close(out[b_key(1)][:, 2:4], (20 * b[1][:, 2:4] + 70 * b[2][:, 2:4]) / 90)


def test_modules_to_save_averaged_with_sample_weights() -> None:
    ranks = [2, 4, 8]
    n = [1, 1, 2]
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    for method in ("hetlora", "flora", "flexlora", "fedilora"):
        out = aggregate(method, states, ranks, n)
        for key in (HEAD_W, HEAD_B):
            expected = 0.25 * states[0][key] + 0.25 * states[1][key] + 0.5 * states[2][key]
            torch.testing.assert_close(out[key], expected)


def test_flora_stack_reproduces_scaled_weighted_sum() -> None:
    ranks = [2, 4, 8]
    n = [3, 5, 2]
    scalings = [16 / 2, 16 / 4, 32 / 8]
    states = [make_state(r, s, head=False) for s, r in enumerate(ranks)]
    out = aggregate("flora", states, ranks, n, scalings=scalings)
    p = probs(n)
    assert global_rank(out) == sum(ranks)
    for i in range(LAYERS):
        expected = sum(pk * sk * s[b_key(i)] @ s[a_key(i)] for pk, sk, s in zip(p, scalings, states))
        torch.testing.assert_close(out[b_key(i)] @ out[a_key(i)], expected)


def _dw(states: list[dict[str, Tensor]], layer: int, p: list[float], scalings: list[float]) -> Tensor:
    return sum(pk * sk * s[b_key(layer)].double() @ s[a_key(layer)].double()
               for pk, sk, s in zip(p, scalings, states))


def test_flexlora_reproduces_dw_and_shares_best_rank_r() -> None:
    ranks = [2, 3, 4]
    n = [4, 4, 2]
    scalings = [2.0, 2.0, 2.0]
    states = [make_state(r, s, head=False) for s, r in enumerate(ranks)]
    out = aggregate("flexlora", states, ranks, n, scalings=scalings)
    assert global_rank(out) == min(sum(ranks), D_IN, D_OUT) == 9
    p = probs(n)
    for i in range(LAYERS):
        dw = _dw(states, i, p, scalings)
        torch.testing.assert_close((out[b_key(i)] @ out[a_key(i)]).double(), dw, rtol=1e-4, atol=1e-4)
    for r in ranks:
        share = client_share(out, r, scaling=2.0, merged=True)
        for i in range(LAYERS):
            u, s, vh = torch.linalg.svd(_dw(states, i, p, scalings), full_matrices=False)
            best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
            approx = 2.0 * share[b_key(i)].double() @ share[a_key(i)].double()
            torch.testing.assert_close(approx, best, rtol=1e-4, atol=1e-4)


def test_flexlora_explicit_rank_and_padding() -> None:
    states = [make_state(r, s, head=False) for s, r in enumerate([4, 4])]
    assert global_rank(aggregate("flexlora", states, [4, 4], [1, 1], rank=5)) == 5
    big = aggregate("flexlora", states, [4, 4], [1, 1], rank=D_OUT + 3)  # beyond min(d_out, d_in)
    assert big[a_key(0)].shape == (D_OUT + 3, D_IN)
    assert torch.all(big[a_key(0)][D_OUT:] == 0)


def test_hetlora_weights_follow_product_norms() -> None:
    ranks = [2, 4]
    scales = [1.0, 3.0]  # client 1's product norms are 9x larger per layer
    states = [make_state(r, s, scale=c) for s, (r, c) in enumerate(zip(ranks, scales))]
    out = aggregate("hetlora", states, ranks, [50, 50])
    norms = [sum(torch.linalg.matrix_norm(s[b_key(i)] @ s[a_key(i)]).item() for i in range(LAYERS))
             for s in states]
    w = [v / sum(norms) for v in norms]
    assert w[1] > 0.8
    for i in range(LAYERS):
        expected_a = w[0] * pad_a(states[0][a_key(i)], 4) + w[1] * states[1][a_key(i)]
        expected_b = w[0] * pad_b(states[0][b_key(i)], 4) + w[1] * states[1][b_key(i)]
        torch.testing.assert_close(out[a_key(i)], expected_a)
        torch.testing.assert_close(out[b_key(i)], expected_b)


def test_hetlora_all_zero_norms_fall_back_to_sample_weights() -> None:
    states = [make_state(r, s) for s, r in enumerate([2, 4])]
    for s in states:
        for i in range(LAYERS):
            s[b_key(i)].zero_()
    out = aggregate("hetlora", states, [2, 4], [1, 3])
    torch.testing.assert_close(out[a_key(0)], 0.25 * pad_a(states[0][a_key(0)], 4) + 0.75 * states[1][a_key(0)])


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "fedilora"])
def test_client_share_shapes(method: str) -> None:
    ranks = [2, 4, 8]
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    out = aggregate(method, states, ranks, [1, 2, 3])
    for r in ranks:
        share = client_share(out, r, merged=STRATEGIES[method].merged)
        assert share.keys() == out.keys()
        for i in range(LAYERS):
            assert share[a_key(i)].shape == (r, D_IN)
            assert share[b_key(i)].shape == (D_OUT, r)
        torch.testing.assert_close(share[HEAD_W], out[HEAD_W])
        assert share[HEAD_W].data_ptr() != out[HEAD_W].data_ptr()


def test_client_share_rank_above_global_raises() -> None:
    out = aggregate("fedilora", [make_state(4, 0)], [4], [1])
    with pytest.raises(ValueError, match="global rank"):
        client_share(out, 5)


def test_fedavg_heterogeneous_ranks_raises() -> None:
    states = [make_state(r, s) for s, r in enumerate([4, 8])]
    with pytest.raises(ValueError, match=r"fedavg needs equal ranks.*\[4, 8\]"):
        aggregate("fedavg", states, [4, 8], [1, 1])


def test_unknown_method_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown aggregation method 'fedprox'.*fedilora"):
        aggregate("fedprox", [make_state(4, 0)], [4], [1])


def test_unknown_option_raises() -> None:
    with pytest.raises(ValueError, match="unknown options"):
        aggregate("fedilora", [make_state(4, 0)], [4], [1], rank=3)


def test_shape_inconsistent_with_rank_named() -> None:
    states = [make_state(4, 0), make_state(8, 1)]
    with pytest.raises(ValueError, match=r"client 1: '.*layer\.0.*lora_A\.weight' has shape \(8, 12\), expected \(4, 12\)"):
        aggregate("fedilora", states, [4, 4], [1, 1])
    bad = make_state(4, 2)
    bad[b_key(1)] = torch.randn(D_OUT + 1, 4)
    with pytest.raises(ValueError, match=r"client 1: '.*layer\.1.*lora_B\.weight' has shape \(11, 4\), expected \(10, 4\)"):
        aggregate("fedilora", [make_state(4, 0), bad], [4, 4], [1, 1])


@pytest.mark.parametrize(
    ("states", "ranks", "n", "match"),
    [
        ([], [], [], "no client states"),
        ([make_state(4, 0)], [4, 4], [1], "1 states but 2 ranks"),
        ([make_state(4, 0)], [4], [1, 2], "1 states but 2 num_samples"),
        ([make_state(4, 0), make_state(4, 1)], [4, 4], [1, 0], "client 1: num_samples must be positive"),
        ([make_state(4, 0), make_state(4, 1, head=False)], [4, 4], [1, 1], "client 1: key .*classifier"),
    ],
)
def test_invalid_inputs(states: list[dict[str, Tensor]], ranks: list[int], n: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aggregate("fedilora", states, ranks, n)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_inputs_not_mutated(method: str) -> None:
    ranks = [4, 4] if method == "fedavg" else [2, 4]
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    out = aggregate(method, states, ranks, [1, 2], scalings=[2.0, 1.0])
    for s, b in zip(states, before):
        for key in s:
            torch.testing.assert_close(s[key], b[key], rtol=0, atol=0)
    for key in out:  # outputs never alias inputs
        assert all(out[key].data_ptr() != s[key].data_ptr() for s in states)


def test_low_precision_inputs_give_float32() -> None:
    states = [{k: v.to(torch.bfloat16) for k, v in make_state(r, s).items()} for s, r in enumerate([2, 4])]
    for method in ("hetlora", "flora", "flexlora", "fedilora"):
        out = aggregate(method, states, [2, 4], [1, 1])
        assert all(t.dtype == torch.float32 for t in out.values())
