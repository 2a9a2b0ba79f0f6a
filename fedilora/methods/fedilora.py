"""FediLoRA's dimension-wise aggregation: rank dimension j is averaged over the clients that own
it, S_j = {k : r_k > j}, with weights p_k / sum_{S_j} p, for A's rows and B's columns alike. A
dimension owned by one client keeps that client's values (no dilution by zero padding); with equal
ranks it is FedAvg exactly. A client receives the first r rows / columns.

Option ``b_columns: official`` reproduces the official code's B loop (docs/method.md): for every
client after the first its slice start jumps to its own rank, so the B columns at or above the
smallest sampled rank come from the first client alone (the lowest sampled client id: the official
code iterates a Python set of small ints, which runs in ascending order), scaled by that client's
owner weight, and are zero where the first client does not own them. A rows keep the stated rule.
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
    b_columns: Literal["stated", "official"] = "stated"


def owner_mass(ranks: Sequence[int], p: Tensor) -> Tensor | None:
    """sum_{k : r_k > j} p_k for each dimension j (None when every client owns every one)."""
    if len(set(ranks)) == 1:
        return None
    return (p[:, None] * aggregation.ownership(ranks)).sum(dim=0)


def owner_weights(ranks: Sequence[int], p: Tensor) -> Tensor:
    """W[k, j] = p_k [j < r_k] / sum_i p_i [j < r_i] (K x r_max)."""
    w = p[:, None] * aggregation.ownership(ranks)
    return w / w.sum(dim=0, keepdim=True)


def official_b_weights(ranks: Sequence[int], p: Tensor) -> Tensor:
    """The official loop's effective B weights: the stated ones below the smallest sampled rank,
    the first client's alone from there on."""
    w = owner_weights(ranks, p)
    w[1:, min(ranks):] = 0.0
    return w


class FediLoRA(Strategy):
    name = "fedilora"
    Options = Options
    official = {**Strategy.official, "b_columns": "official"}

    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
        # sum_k p_k A_k[j] over the owners, then one division per dimension by the owners' mass
        out = aggregation.padded_sum(states, ranks, p.tolist(), owner_mass(ranks, p))
        if self.options.b_columns == "official" and len(set(ranks)) > 1:
            r_min, r_first = min(ranks), ranks[0]
            w = owner_weights(ranks, p)[0, r_min:r_first].to(torch.float32)
            for key in a_keys(states[0]):
                column = out[b_key(key)]
                column[:, r_min:] = 0.0
                column[:, r_min:r_first] = states[0][b_key(key)][:, r_min:r_first].float() * w
        return out

    def dimension_weights(self, states: Sequence[State], ranks: Sequence[int], p: Tensor) -> tuple[Tensor, Tensor]:
        w = owner_weights(ranks, p)
        return w, official_b_weights(ranks, p) if self.options.b_columns == "official" else w
