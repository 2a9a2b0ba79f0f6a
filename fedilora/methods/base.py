"""What every aggregation method is made of, and the defaults most methods keep.

A method is a :class:`Strategy` subclass in a module of its own (``fedilora/methods/<name>.py``)
that owns everything about it: what a client of rank r receives from the global state
(:meth:`Strategy.share`), how the clients' updates combine (:meth:`Strategy.combine`, calling
the pure math of ``fedilora.aggregation``), what the server does with the result
(:meth:`Strategy.aggregate`: keep the rank dimensions no sampled client owned, or fold an update
into the base weights), the global adapter's scaling (:meth:`Strategy.global_alpha`), whether
client editing applies (:meth:`Strategy.editable`), and its own options (:class:`Options`, a
pydantic model validated from ``aggregation.options``). The runtime (``fedilora.federation``)
calls these hooks and knows no method by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from fedilora import aggregation, lora
from fedilora.lora import State
from fedilora.seeds import derive_seed


class Options(BaseModel):
    """Knobs every method has. ``unowned``: rank dimensions that no sampled client owns keep
    their previous global values (``keep``) or are zeroed (``zero``, the official code's
    behaviour: a zeroed A and B pair gets no gradient again). ``first_round``: in round 1 every
    client starts from a share of one seeded global adapter (``global``) or from its own fresh
    LoRA draw (``fresh``, the official code's behaviour)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    unowned: Literal["keep", "zero"] = "keep"
    first_round: Literal["global", "fresh"] = "global"


@dataclass(frozen=True)
class Setup:
    """What a method may know of the federation: the run seed, every client's rank, the LoRA
    alpha a slot of a given rank gets (``lora.alpha_for``), the server learning rate
    (``federation.server_lr``: the global adapter moves by lr x the aggregated update), and whether
    the base weights are quantized (``runtime.quantization``: nothing can be folded into them)."""

    seed: int
    ranks: tuple[int, ...]
    alpha_for: Callable[[int], float]
    server_lr: float = 1.0
    quantized: bool = False

    def scaling(self, rank: int) -> float:
        return self.alpha_for(rank) / rank


@dataclass(frozen=True)
class ServerStep:
    """The new global adapter and, for methods that fold their update into the foundation
    model, the delta to add to each adapted layer's base weight (keyed like its ``lora_A``)."""

    state: State
    base_delta: State | None = None


class Strategy:
    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    # The options that reproduce the official code's behaviour (the ``@official`` variant);
    # docs/method.md says what each does and why the default differs.
    official: ClassVar[dict[str, object]] = {"unowned": "zero", "first_round": "fresh"}

    def __init__(self, setup: Setup, options: Options | None = None):
        self.setup = setup
        self.options = options if options is not None else self.Options()

    # ---- client side -----------------------------------------------------------------------
    def initial(self, template: State) -> State:
        """The round-1 global adapter: a seeded fresh one at the largest client rank (B = 0,
        so the model starts as the foundation model); ``template`` gives keys, shapes and the
        trained non-LoRA parameters."""
        return lora.fresh(template, max(self.setup.ranks), derive_seed(self.setup.seed, 0))

    def share(self, global_state: State, client: int, round_idx: int) -> State:
        """What ``client`` starts local training from: the first r rows of A and columns of B."""
        rank = self.setup.ranks[client]
        if round_idx == 1 and self.options.first_round == "fresh":
            return lora.fresh(global_state, rank, derive_seed(self.setup.seed, round_idx, client))
        return lora.cut(global_state, rank)

    def editable(self, round_idx: int) -> bool:
        """Whether client editing may apply: it compares with the previous global adapter,
        which clients receive a share of from round 2 on."""
        return round_idx >= 2

    # ---- server side -----------------------------------------------------------------------
    def combine(self, states: Sequence[State], ranks: Sequence[int], p: Tensor,
                scalings: Sequence[float]) -> State:
        """The LoRA factors of the new global adapter from validated client states."""
        raise NotImplementedError

    def aggregate(self, states: Sequence[State], ranks: Sequence[int], num_samples: Sequence[int],
                  previous: State) -> ServerStep:
        new = combine(self, states, ranks, num_samples, [self.setup.scaling(r) for r in ranks])
        new = lora.pad(new, previous, keep=self.options.unowned == "keep")
        if self.setup.server_lr != 1.0:
            new = aggregation.server_step(previous, new, self.setup.server_lr)
        return ServerStep(new)

    def global_alpha(self, rank: int) -> float:
        """LoRA alpha of the slot that holds the global adapter."""
        return self.setup.alpha_for(rank)

    def dimension_weights(self, states: Sequence[State], ranks: Sequence[int], p: Tensor) -> tuple[Tensor, Tensor] | None:
        """(W_A, W_B), each (K x r_max): the weight of client k in rank dimension j of A's rows and
        of B's columns, for methods whose global dimension j is sum_k W[k, j] x client k's (the
        per-dimension diagnostics); None for methods that do not combine dimension by dimension."""
        return None


def combine(strategy: Strategy, states: Sequence[State], ranks: Sequence[int], num_samples: Sequence[int],
            scalings: Sequence[float], **kwargs: object) -> State:
    """Validate, combine the LoRA factors with the strategy, average the trained non-LoRA
    parameters with p_k; the clients' key order is kept. Inputs are not modified."""
    aggregation.validate(states, ranks, num_samples, scalings)
    ranks = [int(r) for r in ranks]
    p = aggregation.sample_weights(num_samples)
    out = strategy.combine(states, ranks, p, scalings, **kwargs)
    out.update(aggregation.mean_others(states, p))
    return {key: out[key] for key in states[0]}
