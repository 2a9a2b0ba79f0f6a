"""FlexLoRA: the SVD reproduces dW; a client's share is the best rank-r approximation."""

from __future__ import annotations

import torch
from torch import Tensor

from fedilora.lora import State, rank_of
from fedilora.methods import aggregate, strategy
from fedilora.methods.testing import D_IN, D_OUT, LAYERS, a_key, b_key, make_state, probs, setup


def _dw(states: list[State], layer: int, p: list[float], scalings: list[float]) -> Tensor:
    return sum(pk * sk * s[b_key(layer)].double() @ s[a_key(layer)].double() for pk, sk, s in zip(p, scalings, states))


def test_reproduces_dw_and_shares_the_best_rank_r() -> None:
    ranks = [2, 3, 4]
    n = [4, 4, 2]
    states = [make_state(r, s, head=False) for s, r in enumerate(ranks)]
    method = strategy("flexlora", setup(ranks, scale=2.0))  # every scaling is 2
    out = method.aggregate(states, ranks, n, previous=make_state(4, 9, head=False)).state
    assert rank_of(out) == min(sum(ranks), D_IN, D_OUT) == 9
    p = probs(n)
    for i in range(LAYERS):
        torch.testing.assert_close((out[b_key(i)] @ out[a_key(i)]).double(), _dw(states, i, p, [2.0] * 3), rtol=1e-4, atol=1e-4)
    for client, r in enumerate(ranks):
        share = method.share(out, client, 2)
        for i in range(LAYERS):
            u, s, vh = torch.linalg.svd(_dw(states, i, p, [2.0] * 3), full_matrices=False)
            best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
            torch.testing.assert_close(2.0 * share[b_key(i)].double() @ share[a_key(i)].double(), best, rtol=1e-4, atol=1e-4)
    assert method.global_alpha(9) == 9.0  # the global factors carry the scaling


def test_global_rank_covers_the_largest_client_and_explicit_rank() -> None:
    states = [make_state(2, s, head=False) for s in range(2)]
    method = strategy("flexlora", setup([2, 2, 8]))  # the rank-8 client is not sampled
    assert rank_of(method.aggregate(states, [2, 2], [1, 1], previous=states[0]).state) == 8
    states = [make_state(r, s, head=False) for s, r in enumerate([4, 4])]
    assert rank_of(aggregate("flexlora", states, [4, 4], [1, 1], rank=5)) == 5
    big = aggregate("flexlora", states, [4, 4], [1, 1], rank=D_OUT + 3)  # beyond min(d_out, d_in)
    assert big[a_key(0)].shape == (D_OUT + 3, D_IN)
    assert torch.all(big[a_key(0)][D_OUT:] == 0)


def test_server_learning_rate_blends_the_products() -> None:
    ranks = [2, 3]
    states, previous = [make_state(r, s, head=False) for s, r in enumerate(ranks)], make_state(5, 9, head=False)
    exact = {"rank": 10}  # enough components to hold the blend of two rank-5 products exactly
    full = strategy("flexlora", setup(ranks), exact).aggregate(states, ranks, [1, 1], previous).state
    slow = strategy("flexlora", type(setup(ranks))(seed=0, ranks=(2, 3), alpha_for=lambda r: 2.0 * r, server_lr=0.25), exact)
    blended = slow.aggregate(states, ranks, [1, 1], previous).state
    for i in range(LAYERS):
        expected = 0.75 * previous[b_key(i)] @ previous[a_key(i)] + 0.25 * full[b_key(i)] @ full[a_key(i)]
        torch.testing.assert_close(blended[b_key(i)] @ blended[a_key(i)], expected, rtol=1e-4, atol=1e-4)
