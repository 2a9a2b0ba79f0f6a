"""Small seeded adapter states for the methods' tests (``fedilora/methods/test_*.py``)."""

from __future__ import annotations

import torch
from torch import Tensor

from fedilora.lora import State
from fedilora.methods.base import Setup

D_IN, D_OUT, LAYERS = 12, 10, 2
HEAD_W = "base_model.model.classifier.weight"
HEAD_B = "base_model.model.classifier.bias"


def a_key(layer: int, proj: str = "query") -> str:
    return f"base_model.model.layer.{layer}.attention.{proj}.lora_A.weight"


def b_key(layer: int, proj: str = "query") -> str:
    return f"base_model.model.layer.{layer}.attention.{proj}.lora_B.weight"


def make_state(rank: int, seed: int, *, head: bool = True, scale: float = 1.0) -> State:
    g = torch.Generator().manual_seed(seed)
    state: State = {}
    for i in range(LAYERS):
        state[a_key(i)] = scale * torch.randn(rank, D_IN, generator=g)
        state[b_key(i)] = scale * torch.randn(D_OUT, rank, generator=g)
    if head:
        state[HEAD_W] = torch.randn(3, D_OUT, generator=g)
        state[HEAD_B] = torch.randn(3, generator=g)
    return state


def probs(num_samples: list[int]) -> list[float]:
    return [n / sum(num_samples) for n in num_samples]


def pad_a(a: Tensor, r: int) -> Tensor:
    return torch.cat([a, torch.zeros(r - a.shape[0], a.shape[1])], dim=0)


def pad_b(b: Tensor, r: int) -> Tensor:
    return torch.cat([b, torch.zeros(b.shape[0], r - b.shape[1])], dim=1)


def setup(ranks: list[int], scale: float = 2.0, seed: int = 0) -> Setup:
    """A federation of clients with ``ranks`` and alpha = scale * r (equal scalings)."""
    return Setup(seed=seed, ranks=tuple(ranks), alpha_for=lambda r: scale * r)
