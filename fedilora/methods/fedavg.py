"""FedAvg: the weighted mean of every factor (McMahan et al. 2017). Defined for equal ranks only;
with heterogeneous ranks use hetlora, flora, flexlora or fedilora."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedilora import aggregation
from fedilora.lora import State
from fedilora.methods.base import Options, Setup, Strategy


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, setup: Setup, options: Options | None = None):
        if len(set(setup.ranks)) > 1:
            raise ValueError(
                f"fedavg needs equal ranks across clients, got clients.ranks={list(setup.ranks)}; "
                "use hetlora, flora, flexlora or fedilora for heterogeneous ranks"
            )
        super().__init__(setup, options)

    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
        return aggregation.padded_sum(states, ranks, p.tolist())

    def dimension_weights(self, states: Sequence[State], ranks: Sequence[int], p: Tensor) -> tuple[Tensor, Tensor]:
        w = p[:, None].expand(-1, max(ranks)).clone()
        return w, w
