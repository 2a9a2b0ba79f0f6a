"""HetLoRA: zero padding with one weight per client from its product norms."""

from __future__ import annotations

import torch

from fedilora.methods import aggregate
from fedilora.methods.testing import LAYERS, a_key, b_key, make_state, pad_a, pad_b


def test_weights_follow_product_norms() -> None:
    ranks = [2, 4]
    scales = [1.0, 3.0]  # client 1's product norms are 9x larger per layer
    states = [make_state(r, s, scale=c) for s, (r, c) in enumerate(zip(ranks, scales))]
    out = aggregate("hetlora", states, ranks, [50, 50])
    norms = [sum(torch.linalg.matrix_norm(s[b_key(i)] @ s[a_key(i)]).item() for i in range(LAYERS)) for s in states]
    w = [v / sum(norms) for v in norms]
    assert w[1] > 0.8
    for i in range(LAYERS):
        torch.testing.assert_close(out[a_key(i)], w[0] * pad_a(states[0][a_key(i)], 4) + w[1] * states[1][a_key(i)])
        torch.testing.assert_close(out[b_key(i)], w[0] * pad_b(states[0][b_key(i)], 4) + w[1] * states[1][b_key(i)])


def test_all_zero_norms_fall_back_to_sample_weights() -> None:
    states = [make_state(r, s) for s, r in enumerate([2, 4])]
    for s in states:
        for i in range(LAYERS):
            s[b_key(i)].zero_()
    out = aggregate("hetlora", states, [2, 4], [1, 3])
    torch.testing.assert_close(out[a_key(0)], 0.25 * pad_a(states[0][a_key(0)], 4) + 0.75 * states[1][a_key(0)])


def test_official_running_sum_weights_match_the_official_loop() -> None:
    """The official weight loop, written out: per client a running total of ||B A||_F over the
    layers, added to the client's score after every layer; scores renormalised over clients."""
    ranks = [2, 4, 3]
    states = [make_state(r, s, scale=1.0 + s) for s, r in enumerate(ranks)]
    scores = []
    for state in states:
        running = score = 0.0
        for i in range(LAYERS):
            running += torch.linalg.matrix_norm(state[b_key(i)] @ state[a_key(i)]).item()
            score += running
        scores.append(score)
    w = [s / sum(scores) for s in scores]
    out = aggregate("hetlora", states, ranks, [5, 5, 5], weights="running_sum")
    expected = sum(wk * pad_a(s[a_key(1)], 4) for wk, s in zip(w, states))
    torch.testing.assert_close(out[a_key(1)], expected, rtol=1e-5, atol=1e-6)
    plain = aggregate("hetlora", states, ranks, [5, 5, 5])
    assert not torch.allclose(plain[a_key(1)], out[a_key(1)])  # layer 0 counts twice here
