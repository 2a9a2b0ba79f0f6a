"""LoRA conventions, defined once: what a state is, which keys are factors, how a state's rank is
read and cut, and how a fresh adapter is drawn.

A *state* is a PEFT adapter state dict (``{name: tensor}`` as ``get_peft_model_state_dict``
returns it): LoRA factor pairs ``...lora_A.weight`` (r x d_in) and ``...lora_B.weight``
(d_out x r), plus *trained non-LoRA parameters* (PEFT ``modules_to_save``: the projector and
head), which every method averages with the clients' sample weights. Rank dimension j is row j of
every A and column j of every B.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

State = dict[str, Tensor]

_A = "lora_A."
_B = "lora_B."


def is_lora_a(key: str) -> bool:
    return _A in key


def is_lora_b(key: str) -> bool:
    return _B in key


def is_factor(key: str) -> bool:
    return is_lora_a(key) or is_lora_b(key)


def is_trained_other(key: str) -> bool:
    """A trained parameter that is not a LoRA factor (``modules_to_save``)."""
    return not is_factor(key)


def b_key(a_key: str) -> str:
    """The B factor paired with a LoRA A key."""
    return a_key.replace(_A, _B)


def a_key(b_key: str) -> str:
    """The A factor paired with a LoRA B key."""
    return b_key.replace(_B, _A)


def a_keys(state: State) -> list[str]:
    """The A keys of ``state``, in its order (each names one adapted layer)."""
    return [k for k in state if is_lora_a(k)]


def other_keys(state: State) -> list[str]:
    return [k for k in state if is_trained_other(k)]


def rank_of(state: State) -> int:
    """Rank of the LoRA factors in ``state`` (rows of every A factor)."""
    ranks = {state[k].shape[0] for k in a_keys(state)}
    if not ranks:
        raise ValueError("state has no LoRA factors (no key contains 'lora_A.')")
    if len(ranks) > 1:
        raise ValueError(f"LoRA factors of the state have different ranks: {sorted(ranks)}")
    return ranks.pop()


def cut_tensor(key: str, tensor: Tensor, rank: int) -> Tensor:
    """The first ``rank`` rank dimensions of one tensor (a view; other parameters as they are)."""
    if is_lora_a(key):
        return tensor[:rank]
    if is_lora_b(key):
        return tensor[:, :rank]
    return tensor


def cut(state: State, rank: int) -> State:
    """A copy of ``state`` cut to ``rank``: what a client of that rank holds of a larger adapter."""
    have = rank_of(state)
    if not 1 <= rank <= have:
        raise ValueError(f"client rank {rank} must be in [1, {have}] (the state's rank)")
    return {key: cut_tensor(key, t, rank).clone() for key, t in state.items()}


def rank_shape(key: str, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The dimensions of a tensor that do not depend on the rank (all of them for non-factors)."""
    shape = tuple(shape)
    if is_lora_a(key):
        return shape[1:]
    if is_lora_b(key):
        return shape[:1]
    return shape


def fresh(template: State, rank: int, seed: int) -> State:
    """PEFT's default LoRA init at ``rank``, seeded: A Kaiming-uniform (bound 1/sqrt(d_in)), B zero,
    so the adapter starts as the identity; trained non-LoRA parameters are copied from ``template``.
    Draws follow ``template``'s key order, so the same template and seed give the same adapter."""
    gen = torch.Generator().manual_seed(seed)
    out: State = {}
    for key, t in template.items():
        if is_lora_a(key):
            bound = 1.0 / math.sqrt(t.shape[1])
            out[key] = (torch.rand((rank, t.shape[1]), generator=gen) * 2 - 1) * bound
        elif is_lora_b(key):
            out[key] = torch.zeros(t.shape[0], rank)
        else:
            out[key] = t.clone()
    return out


def pad(new: State, previous: State, *, keep: bool = True) -> State:
    """``new`` extended to ``previous``'s rank: the missing rank dimensions (no sampled client
    owned them) keep ``previous``'s values, or are zero with ``keep=False``."""
    r_new, r_prev = rank_of(new), rank_of(previous)
    if r_new >= r_prev:
        return new
    out = dict(new)
    for key, t in new.items():
        if is_lora_a(key):
            rest = previous[key][r_new:] if keep else torch.zeros(r_prev - r_new, t.shape[1], dtype=t.dtype)
            out[key] = torch.cat([t, rest], dim=0)
        elif is_lora_b(key):
            rest = previous[key][:, r_new:] if keep else torch.zeros(t.shape[0], r_prev - r_new, dtype=t.dtype)
            out[key] = torch.cat([t, rest], dim=1)
    return out
