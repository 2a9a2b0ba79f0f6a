"""FLoRA (Wang et al. 2024), stacking: A = concat_k(p_k s_k A_k) along the rank, B = concat_k(B_k),
so B A = sum_k p_k s_k B_k A_k exactly, each client's own scaling applied. The server folds that
product into the base weights of the adapted layers; every client then starts a fresh LoRA at its
rank on the updated base (so client editing, which compares with a shared global adapter, never
applies), and the global adapter that remains carries only the averaged trained modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from fedilora import aggregation, lora
from fedilora.lora import State, a_keys, b_key, other_keys
from fedilora.methods import base
from fedilora.methods.base import ServerStep, Strategy, combine
from fedilora.seeds import derive_seed


class Options(base.Options):
    """``merge_scaling``: each client's product with its own scaling s_k (``per_client``), or the
    stacked adapter's single scaling alpha / sum of the sampled ranks (``sum_of_ranks``, the
    official code's: its merged adapter is one LoRA of rank sum(r) and the fixed alpha)."""

    merge_scaling: Literal["per_client", "sum_of_ranks"] = "per_client"


class FLoRA(Strategy):
    name = "flora"
    Options = Options
    official = {**Strategy.official, "merge_scaling": "sum_of_ranks"}

    def __init__(self, setup: base.Setup, options: base.Options | None = None):
        if setup.quantized:
            raise ValueError("flora folds each round's update into the base weights, which quantized weights cannot "
                             "take; use another method or runtime.quantization: none")
        super().__init__(setup, options)

    def share(self, global_state: State, client: int, round_idx: int) -> State:
        if round_idx == 1:  # the global adapter is still an ordinary (fresh) one
            return super().share(global_state, client, round_idx)
        rank = self.setup.ranks[client]
        return lora.fresh(global_state, rank, derive_seed(self.setup.seed, round_idx, client))

    def editable(self, round_idx: int) -> bool:
        return False

    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
        if self.options.merge_scaling == "sum_of_ranks":
            scalings = [self.setup.alpha_for(sum(ranks)) / sum(ranks)] * len(ranks)
        coef = [pk * sk for pk, sk in zip(p.tolist(), scalings)]
        out: State = {}
        for key in a_keys(states[0]):
            out[key], out[b_key(key)] = aggregation.stacked(states, key, coef)
        return out

    def aggregate(self, states: Sequence[State], ranks: Sequence[int], num_samples: Sequence[int],
                  previous: State) -> ServerStep:
        stacked = combine(self, states, ranks, num_samples, [self.setup.scaling(r) for r in ranks])
        lr = self.setup.server_lr  # the server learning rate scales the merged update
        delta = {key: lr * (stacked[b_key(key)] @ stacked[key]) if lr != 1.0 else stacked[b_key(key)] @ stacked[key]
                 for key in a_keys(stacked)}
        if lr != 1.0:
            stacked.update({k: previous[k] + lr * (stacked[k] - previous[k]) for k in other_keys(stacked)})
        return ServerStep(self.initial(stacked), base_delta=delta)
