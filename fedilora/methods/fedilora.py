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


def owner_mass(ranks: Sequence[int], p: Tensor) -> Tensor | None:
    """sum_{k : r_k > j} p_k for each dimension j (None when every client owns every one)."""
    if len(set(ranks)) == 1:
        return None
    r = torch.as_tensor(list(ranks))
    owns = (torch.arange(max(ranks))[None, :] < r[:, None]).to(p.dtype)
    return (p[:, None] * owns).sum(dim=0)


class FediLoRA(Strategy):
    name = "fedilora"

    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
        # sum_k p_k A_k[j] over the owners, then one division per dimension by the owners' mass
        return aggregation.padded_sum(states, ranks, p.tolist(), owner_mass(ranks, p))
