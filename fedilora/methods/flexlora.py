"""FlexLoRA (Bai et al. 2024): the full update dW = sum_k p_k s_k B_k A_k, redistributed by a
truncated SVD, B = U sqrt(S), A = sqrt(S) V^T. The global factors carry dW with the scaling folded
in (its slot has scaling 1), so a client of rank r receives the first r components with B divided
by its own scaling: s_r B_r A_r is then the best rank-r approximation of dW."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from fedilora import aggregation
from fedilora.lora import State, a_keys, b_key, is_lora_b
from fedilora.methods import base
from fedilora.methods.base import ServerStep, Strategy, combine


class Options(base.Options):
    """``rank``: components the global adapter keeps (default: enough for every client and to
    reproduce dW exactly, max(sum of the sampled ranks, the largest client rank))."""

    rank: Annotated[int, Field(gt=0)] | None = None


def svd_factors(states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float],
                rank: int | None = None) -> State:
    """Truncated SVD of dW per layer; every layer gets the same rank so shares are uniform.
    Default rank: min(sum r_k, largest min(d_out, d_in)); a layer whose dW cannot reach it is
    zero-padded (its extra components are 0)."""
    keys = a_keys(states[0])
    max_dim = max(min(states[0][b_key(k)].shape[0], states[0][k].shape[1]) for k in keys)
    target = min(sum(ranks), max_dim) if rank is None else int(rank)
    if target <= 0:
        raise ValueError(f"flexlora rank must be positive, got {rank}")
    coef = [pk * sk for pk, sk in zip(p.tolist(), scalings)]
    out: State = {}
    for key in keys:
        u, s, vh = aggregation.low_rank_svd(*aggregation.stacked(states, key, coef, torch.float64))
        keep = min(target, s.shape[0])
        root = s[:keep].sqrt()
        a = torch.zeros(target, vh.shape[1], dtype=torch.float32)
        b = torch.zeros(u.shape[0], target, dtype=torch.float32)
        a[:keep] = (root[:, None] * vh[:keep]).float()
        b[:, :keep] = (u[:, :keep] * root[None, :]).float()
        out[key], out[b_key(key)] = a, b
    return out


class FlexLoRA(Strategy):
    name = "flexlora"
    Options = Options

    def share(self, global_state: State, client: int, round_idx: int) -> State:
        share = super().share(global_state, client, round_idx)
        if round_idx == 1 and self.options.first_round == "fresh":
            return share  # a client's own fresh draw, on its own scale
        scaling = self.setup.scaling(self.setup.ranks[client])
        return {key: t / scaling if is_lora_b(key) else t for key, t in share.items()}

    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float],
                rank: int | None = None) -> State:
        return svd_factors(states, ranks, p, scalings, rank or self.options.rank)

    def aggregate(self, states: Sequence[State], ranks: Sequence[int], num_samples: Sequence[int],
                  previous: State) -> ServerStep:
        # enough components for the largest client rank, sampled this round or not; no unowned
        # dimensions to keep: the SVD's components are a new basis every round
        rank = self.options.rank or max(sum(ranks), max(self.setup.ranks))
        scalings = [self.setup.scaling(r) for r in ranks]
        return ServerStep(combine(self, states, ranks, num_samples, scalings, rank=rank))

    def global_alpha(self, rank: int) -> float:
        return float(rank)  # scaling 1: the factors already carry it
