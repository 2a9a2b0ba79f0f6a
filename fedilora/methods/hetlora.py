"""HetLoRA (Cho et al. 2024): zero-pad every client to the largest rank and weight each client by
the size of its update, sum over adapted layers of ||B A||_F, renormalised over the clients (the
sample weights when every update is zero). A client receives the first r rows / columns.

Option ``weights: running_sum`` reproduces the official code's weights: its sum over layers
accumulates a running total, so layer l (in the state's order) counts L - l + 1 times and the
weights lean toward the early layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from fedilora import aggregation
from fedilora.lora import State, a_keys, b_key
from fedilora.methods import base
from fedilora.methods.base import Strategy


class Options(base.Options):
    weights: Literal["per_client", "running_sum"] = "per_client"


def norm_weights(states: Sequence[State], p: Tensor, running_sum: bool = False) -> Tensor:
    """w_k = sum_l c_l ||B_l A_l||_F / sum over clients; c_l = 1, or L - l + 1 for the running sum."""
    keys = a_keys(states[0])
    counts = torch.arange(len(keys), 0, -1, dtype=torch.float64) if running_sum else torch.ones(len(keys), dtype=torch.float64)
    norms = torch.tensor([[aggregation.product_norm(s[k], s[b_key(k)]) for k in keys] for s in states], dtype=torch.float64)
    total = norms @ counts
    return total / total.sum() if total.sum() > 0 else p


class HetLoRA(Strategy):
    name = "hetlora"
    Options = Options
    official = {**Strategy.official, "weights": "running_sum"}

    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
        return aggregation.padded_sum(states, ranks, self._weights(states, p).tolist())

    def _weights(self, states: Sequence[State], p: Tensor) -> Tensor:
        return norm_weights(states, p, running_sum=self.options.weights == "running_sum")

    def dimension_weights(self, states: Sequence[State], ranks: Sequence[int], p: Tensor) -> tuple[Tensor, Tensor]:
        w = self._weights(states, p)[:, None] * aggregation.ownership(ranks)
        return w, w
