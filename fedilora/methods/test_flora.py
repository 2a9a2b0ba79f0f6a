"""FLoRA: stacking reproduces the scaled weighted sum; the server folds it into the base weights."""

from __future__ import annotations

import torch

from fedilora.lora import rank_of
from fedilora.methods import aggregate, strategy
from fedilora.methods.testing import HEAD_W, LAYERS, a_key, b_key, make_state, probs, setup


def test_stack_reproduces_scaled_weighted_sum() -> None:
    ranks = [2, 4, 8]
    n = [3, 5, 2]
    scalings = [16 / 2, 16 / 4, 32 / 8]
    states = [make_state(r, s, head=False) for s, r in enumerate(ranks)]
    out = aggregate("flora", states, ranks, n, scalings=scalings)
    assert rank_of(out) == sum(ranks)
    for i in range(LAYERS):
        expected = sum(pk * sk * s[b_key(i)] @ s[a_key(i)] for pk, sk, s in zip(probs(n), scalings, states))
        torch.testing.assert_close(out[b_key(i)] @ out[a_key(i)], expected)


def test_server_merges_the_product_and_clients_start_fresh() -> None:
    ranks = [2, 4, 8]
    method = strategy("flora", setup(ranks, scale=2.0))
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    step = method.aggregate(states, ranks, [1, 1, 2], previous=make_state(8, 9))
    assert step.base_delta is not None and set(step.base_delta) == {a_key(i) for i in range(LAYERS)}
    for i in range(LAYERS):  # every client's scaling is 2
        expected = sum(pk * 2.0 * s[b_key(i)] @ s[a_key(i)] for pk, s in zip(probs([1, 1, 2]), states))
        torch.testing.assert_close(step.base_delta[a_key(i)], expected)
    # what remains is a fresh adapter at the largest rank (B = 0) with the averaged head
    assert rank_of(step.state) == 8 and not any(step.state[b_key(i)].any() for i in range(LAYERS))
    torch.testing.assert_close(step.state[HEAD_W], 0.25 * states[0][HEAD_W] + 0.25 * states[1][HEAD_W] + 0.5 * states[2][HEAD_W])
    later = method.share(step.state, 1, 2)
    assert rank_of(later) == 4 and not later[b_key(0)].any()
    assert not torch.equal(later[a_key(0)], step.state[a_key(0)][:4])  # drawn per (round, client)
    assert not torch.equal(later[a_key(0)], method.share(step.state, 1, 3)[a_key(0)])
    assert not method.editable(2)  # no shared global adapter to compare with


def test_official_sum_of_ranks_scaling() -> None:
    """The official merge: one LoRA of rank sum(r) with the fixed alpha 32, so the merged product
    is 32 / sum(r) x sum_k p_k B_k A_k whatever each client's own scaling."""
    ranks = [2, 4, 8]
    fixed = setup(ranks)
    fixed = type(fixed)(seed=0, ranks=tuple(ranks), alpha_for=lambda r: 32.0)
    states = [make_state(r, s, head=False) for s, r in enumerate(ranks)]
    step = strategy("flora", fixed, {"merge_scaling": "sum_of_ranks"}).aggregate(states, ranks, [1, 2, 3], make_state(8, 9, head=False))
    for i in range(LAYERS):
        expected = 32.0 / 14 * sum(pk * s[b_key(i)] @ s[a_key(i)] for pk, s in zip(probs([1, 2, 3]), states))
        torch.testing.assert_close(step.base_delta[a_key(i)], expected, rtol=1e-5, atol=1e-5)
