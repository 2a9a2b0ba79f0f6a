"""FediLoRA layer-wise model editing, run on the client after local training.

Local training on data with missing modalities can drag a few LoRA tensors far from the
consensus. Editing pulls back only the tensors that drifted most (lowest cosine similarity
to the previous global adapter), so the client keeps its personalisation everywhere else.
The edited adapter is both the client's personalised model and its upload.

Choices that differ from the official code, on purpose: the blend coefficient ``s`` is
clipped to [0, 1] (the official code lets a negative similarity extrapolate away from the
global tensor); a zero-norm tensor has similarity 0 instead of NaN, so it is treated as
maximally dissimilar and is a candidate for editing.

The runtime passes the client's share of the previous global adapter (what it started local
training from), so for a method whose global factors carry the scaling (flexlora) B is on the
client's own scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fedilora.lora import State, cut_tensor, is_lora_a, is_lora_b

FACTORS = ("A", "B", "both")
MODES = ("blend", "replace", "half")


@dataclass(frozen=True)
class EditRecord:
    """One selected tensor: its cosine similarity to the global (unclipped) and whether it changed."""

    key: str
    similarity: float
    edited: bool


def _candidates(local: State, factors: str) -> list[str]:
    want_a, want_b = factors in ("A", "both"), factors in ("B", "both")
    return [k for k in local if (want_a and is_lora_a(k)) or (want_b and is_lora_b(k))]


def cut_to(global_t: Tensor, local_t: Tensor, key: str) -> Tensor:
    """The global tensor cut to the local rank; a shape that cannot be cut is an error."""
    cut = cut_tensor(key, global_t, local_t.shape[0] if is_lora_a(key) else local_t.shape[-1])
    if cut.shape != local_t.shape:
        raise ValueError(
            f"{key!r}: global shape {tuple(global_t.shape)} cannot be cut to the local shape "
            f"{tuple(local_t.shape)} (global rank smaller or other dims differ)"
        )
    return cut


def cosine(x: Tensor, y: Tensor) -> float:
    """Cosine similarity of flattened tensors; 0 if either has zero norm (no NaN)."""
    x, y = x.flatten().double(), y.flatten().double()
    denom = x.norm() * y.norm()
    return float(x @ y / denom) if denom > 0 else 0.0


def _edited(local_t: Tensor, global_t: Tensor, similarity: float, mode: str) -> Tensor:
    g, x = global_t.float(), local_t.float()
    if mode == "replace":
        new = g.clone()
    elif mode == "half":
        new = 0.5 * g + 0.5 * x
    else:
        s = min(max(similarity, 0.0), 1.0)
        new = (1.0 - s) * g + s * x
    return new.to(local_t.dtype)


def _validate(factors: str, mode: str, num_layers: int) -> None:
    if factors not in FACTORS:
        raise ValueError(f"factors must be one of {list(FACTORS)}, got {factors!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")


def edit_adapter(local: State, global_prev: State, *, factors: str = "A", num_layers: int = 1,
                 min_similarity: float = 0.95, mode: str = "blend") -> tuple[State, list[EditRecord]]:
    """Edit the ``num_layers`` least similar factor tensors of ``local`` toward ``global_prev``.

    A selected tensor with similarity ``s < min_similarity`` becomes ``(1 - s) * global +
    s * local`` (``blend``, s clipped to [0, 1]), ``global`` (``replace``) or their mean
    (``half``). Returns a new state (the input is not modified) and one record per selected
    tensor, least similar first.
    """
    _validate(factors, mode, num_layers)
    keys = _candidates(local, factors)
    for key in keys:
        if key not in global_prev:
            raise ValueError(f"{key!r} is missing from the previous global state")
    cuts = {key: cut_to(global_prev[key], local[key], key) for key in keys}
    sims = {key: cosine(local[key], cuts[key]) for key in keys}
    selected = sorted(keys, key=sims.__getitem__)[:num_layers]  # stable: ties keep key order
    out = {key: t.clone() for key, t in local.items()}
    records = []
    for key in selected:
        edit = sims[key] < min_similarity
        if edit:
            out[key] = _edited(local[key], cuts[key], sims[key], mode)
        records.append(EditRecord(key, sims[key], edit))
    return out, records
