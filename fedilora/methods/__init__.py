"""The aggregation methods, one module each, and their registry.

Adding a method: a module with a :class:`~fedilora.methods.base.Strategy` subclass, one line in
``REGISTRY`` below, and a test file beside it (``test_<name>.py``); README, "Adding a method".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from fedilora.lora import State
from fedilora.methods.base import Options, ServerStep, Setup, Strategy, combine
from fedilora.methods.fedavg import FedAvg
from fedilora.methods.fedilora import FediLoRA
from fedilora.methods.flexlora import FlexLoRA
from fedilora.methods.flora import FLoRA
from fedilora.methods.hetlora import HetLoRA

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, HetLoRA, FLoRA, FlexLoRA, FediLoRA)}

__all__ = ["REGISTRY", "Options", "ServerStep", "Setup", "Strategy", "aggregate", "method_class", "options_for", "strategy"]


def method_class(name: str) -> type[Strategy]:
    if name not in REGISTRY:
        raise ValueError(f"unknown aggregation method {name!r}; known methods: {sorted(REGISTRY)}")
    return REGISTRY[name]


def options_for(name: str, options: Mapping[str, object] | None) -> Options:
    """The method's options from a plain mapping; unknown or invalid keys are errors naming them."""
    cls = method_class(name)
    try:
        return cls.Options.model_validate(dict(options or {}))
    except ValidationError as err:
        known = sorted(cls.Options.model_fields)
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise ValueError(f"method {name!r} got unknown options {unknown}; it accepts {known}") from None
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"method {name!r}: invalid options ({where})") from None


def strategy(name: str, setup: Setup, options: Mapping[str, object] | None = None) -> Strategy:
    return method_class(name)(setup, options_for(name, options))


def aggregate(name: str, states: Sequence[State], ranks: Sequence[int], num_samples: Sequence[int], *,
              scalings: Sequence[float] | None = None, **options: object) -> State:
    """The pure combination step of method ``name``: client states in, the new global state out
    (no unowned-dimension handling, no base merge). ``scalings`` are the clients' LoRA scalings
    s_k = alpha_k / r_k (default 1.0); only the methods that merge products (flora, flexlora) use
    them: the others average raw factors, meaningful when s_k is equal across clients (the
    project default). Returns new float32 tensors; the inputs are not modified."""
    opts = options_for(name, options)
    scalings = [1.0] * len(states) if scalings is None else list(scalings)
    method = method_class(name)(Setup(seed=0, ranks=tuple(int(r) for r in ranks), alpha_for=float), opts)
    return combine(method, states, ranks, num_samples, scalings)
