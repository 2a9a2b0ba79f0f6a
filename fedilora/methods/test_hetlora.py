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
