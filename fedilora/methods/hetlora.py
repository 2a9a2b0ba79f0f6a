"""HetLoRA (Cho et al. 2024): zero-pad every client to the largest rank and weight each client by
the size of its update, sum over adapted layers of ||B A||_F, renormalised over the clients (the
sample weights when every update is zero). A client receives the first r rows / columns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedilora import aggregation
from fedilora.lora import State, a_keys, b_key
from fedilora.methods.base import Strategy


def norm_weights(states: Sequence[State], p: Tensor) -> Tensor:
    norms = torch.tensor(
        [sum(aggregation.product_norm(s[key], s[b_key(key)]) for key in a_keys(s)) for s in states],
        dtype=torch.float64,
    )
    return norms / norms.sum() if norms.sum() > 0 else p


class HetLoRA(Strategy):
    name = "hetlora"

    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
        return aggregation.padded_sum(states, ranks, norm_weights(states, p).tolist())
