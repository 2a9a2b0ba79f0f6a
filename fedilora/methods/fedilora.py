"""FediLoRA's dimension-wise aggregation: rank dimension j is averaged over the clients that own
it, S_j = {k : r_k > j}, with weights p_k / sum_{S_j} p, for A's rows and B's columns alike. A
dimension owned by one client keeps that client's values (no dilution by zero padding); with equal
ranks it is FedAvg exactly. A client receives the first r rows / columns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedilora import aggregation
from fedilora.lora import State
from fedilora.methods.base import Strategy


def owner_weights(ranks: Sequence[int], p: Tensor) -> Tensor:
    """W[k, j] = p_k [j < r_k] / sum_i p_i [j < r_i]: (K x r_max)."""
    r = torch.as_tensor(list(ranks))
    owns = (torch.arange(max(ranks))[None, :] < r[:, None]).to(p.dtype)
    w = p[:, None] * owns
    return w / w.sum(dim=0, keepdim=True)


class FediLoRA(Strategy):
    name = "fedilora"

    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
        return aggregation.padded_sum(states, ranks, owner_weights(ranks, p))
