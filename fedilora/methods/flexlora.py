"""FlexLoRA (Bai et al. 2024): the full update dW = sum_k p_k s_k B_k A_k, redistributed by a
truncated SVD, B = U sqrt(S), A = sqrt(S) V^T. The global factors carry dW with the scaling folded
in (its slot has scaling 1), so a client of rank r receives the first r components with B divided
by its own scaling: s_r B_r A_r is then the best rank-r approximation of dW. A server learning
rate blends the products, (1 - lr) dW_previous + lr dW, before the SVD (the factors of two SVDs
are in different bases, so they cannot be blended one by one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from fedilora import aggregation
from fedilora.lora import State, a_keys, b_key, is_lora_b, other_keys
from fedilora.methods import base
from fedilora.methods.base import ServerStep, Strategy, combine


class Options(base.Options):
    """``rank``: components the global adapter keeps (default: enough for every client and to
    reproduce dW exactly, max(sum of the sampled ranks, the largest client rank))."""

    rank: Annotated[int, Field(gt=0)] | None = None


def svd_factors(states: Sequence[State], coef: Sequence[float], rank: int | None = None) -> State:
    """Truncated SVD of sum_i coef_i B_i A_i per layer; every layer gets the same rank so shares
    are uniform. Default rank: min(sum of the states' ranks, largest min(d_out, d_in)); a layer
    whose product cannot reach it is zero-padded (its extra components are 0)."""
    keys = a_keys(states[0])
    max_dim = max(min(states[0][b_key(k)].shape[0], states[0][k].shape[1]) for k in keys)
    target = min(sum(s[keys[0]].shape[0] for s in states), max_dim) if rank is None else int(rank)
    if target <= 0:
        raise ValueError(f"flexlora rank must be positive, got {rank}")
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
        return svd_factors(states, [pk * sk for pk, sk in zip(p.tolist(), scalings)], rank or self.options.rank)

    def aggregate(self, states: Sequence[State], ranks: Sequence[int], num_samples: Sequence[int],
                  previous: State) -> ServerStep:
        # enough components for the largest client rank, sampled this round or not; no unowned
        # dimensions to keep: the SVD's components are a new basis every round
        rank = self.options.rank or max(sum(ranks), max(self.setup.ranks))
        scalings = [self.setup.scaling(r) for r in ranks]
        new = combine(self, states, ranks, num_samples, scalings, rank=rank)
        lr = self.setup.server_lr
        if lr != 1.0:
            blended = svd_factors([previous, new], [1.0 - lr, lr], rank)
            blended.update({k: previous[k] + lr * (new[k] - previous[k]) for k in other_keys(new)})
            new = {key: blended[key] for key in new}
        return ServerStep(new)

    def global_alpha(self, rank: int) -> float:
        return float(rank)  # scaling 1: the factors already carry it
