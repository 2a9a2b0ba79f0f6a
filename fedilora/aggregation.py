"""The server's arithmetic over heterogeneous-rank LoRA adapters: pure, vectorised torch over
states (``fedilora.lora``), no model, no Prefect, no MLflow. The methods (``fedilora.methods``)
are thin modules that choose weights and call these kernels; the math is docs/method.md.

Memory: a weighted sum of zero-padded factors (``fedavg``, ``hetlora`` and ``fedilora``) is
computed by accumulating each client into the output through slices
(``out[:r_k].add_(A_k, alpha=w_k)``, one fused pass over the client's tensor), never building the
zero-padded stack of all clients, so the extra memory is one global state. Per-dimension weights
(``fedilora``) divide the accumulated output once by each dimension's owner mass, a pass over the
(small) output instead of a weight tensor broadcast over every client's factors. The SVD of a
stacked low-rank product (``flexlora``) comes from two thin QRs and an SVD of a small matrix,
never forming the dense ``d_out x d_in`` update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedilora.lora import State, a_keys, b_key, is_factor, is_lora_a, is_lora_b, other_keys

# --------------------------------------------------------------------------- validation


def validate(states: Sequence[State], ranks: Sequence[int], num_samples: Sequence[int],
             scalings: Sequence[float]) -> None:
    """Every client's state has the same keys, paired factors, and shapes that fit its rank."""
    if not states:
        raise ValueError("no client states to aggregate")
    n = len(states)
    for name, seq in (("ranks", ranks), ("num_samples", num_samples), ("scalings", scalings)):
        if len(seq) != n:
            raise ValueError(f"got {n} states but {len(seq)} {name}")
    for k, (r, m, s) in enumerate(zip(ranks, num_samples, scalings)):
        if int(r) != r or r <= 0:
            raise ValueError(f"client {k}: rank must be a positive integer, got {r}")
        if m <= 0:
            raise ValueError(f"client {k}: num_samples must be positive, got {m}")
        if not s > 0:
            raise ValueError(f"client {k}: scaling must be positive, got {s}")
    _check_keys(states)
    _check_shapes(states, ranks)


def _check_keys(states: Sequence[State]) -> None:
    ref = states[0]
    if not ref:
        raise ValueError("client 0: empty state")
    keys = ref.keys()
    for k, state in enumerate(states[1:], start=1):
        if state.keys() != keys:  # one set comparison per client; the loops below only name the culprit
            missing = [key for key in ref if key not in state]
            if missing:
                raise ValueError(f"client {k}: key {missing[0]!r} of client 0 is missing")
            extra = next(key for key in state if key not in ref)
            raise ValueError(f"client {k}: key {extra!r} is not in client 0's state")
    for key in ref:
        if is_lora_a(key) and b_key(key) not in ref:
            raise ValueError(f"LoRA A factor {key!r} has no B factor {b_key(key)!r}")
        if is_lora_b(key) and key.replace("lora_B", "lora_A") not in ref:
            raise ValueError(f"LoRA B factor {key!r} has no A factor")


def _shape_error(key: str, k: int, expected: tuple[int, ...], got: tuple[int, ...], why: str) -> ValueError:
    return ValueError(f"client {k}: {key!r} has shape {got}, expected {expected} ({why})")


def _check_shapes(states: Sequence[State], ranks: Sequence[int]) -> None:
    ref = states[0]
    for key, ref_t in ref.items():
        ref_shape = ref_t.shape
        if not is_factor(key):
            for k, state in enumerate(states):
                if state[key].shape != ref_shape:
                    raise _shape_error(key, k, tuple(ref_shape), tuple(state[key].shape), "as client 0")
            continue
        if len(ref_shape) != 2:
            raise _shape_error(key, 0, (-1, -1), tuple(ref_shape), "LoRA factors must be 2-D")
        a_side = is_lora_a(key)
        for k, (state, r) in enumerate(zip(states, ranks)):
            expected = (r, ref_shape[1]) if a_side else (ref_shape[0], r)
            got = state[key].shape
            if got != expected:
                why = f"declared rank {r}" + (", other dim as client 0" if k else "")
                raise _shape_error(key, k, expected, tuple(got), why)


def ownership(ranks: Sequence[int]) -> Tensor:
    """M[k, j] = 1 where client k owns rank dimension j (j < r_k), else 0; float64 (K x r_max)."""
    r = torch.as_tensor(list(ranks))
    return (torch.arange(max(ranks))[None, :] < r[:, None]).to(torch.float64)


def sample_weights(num_samples: Sequence[int]) -> Tensor:
    """p_k = n_k / sum(n), float64."""
    n = torch.as_tensor(num_samples, dtype=torch.float64)
    return n / n.sum()


# --------------------------------------------------------------------------- kernels


def padded_sum(states: Sequence[State], ranks: Sequence[int], weights: Sequence[float],
               owner_mass: Tensor | None = None) -> State:
    """``A[j] = sum_k w_k A_k[j]`` over the clients that own row j (zero-padding the others,
    without building the padding), B likewise on columns; with ``owner_mass`` (r_max,), each
    dimension j is then divided by ``owner_mass[j]``. LoRA factors only, float32."""
    r_max = max(ranks)
    w = [float(x) for x in weights]
    rows = cols = None
    if owner_mass is not None:
        mass = owner_mass.to(torch.float32)
        rows, cols = mass[:, None], mass[None, :]
    out: State = {}
    for a_key in a_keys(states[0]):
        bk = b_key(a_key)
        a = torch.zeros(r_max, states[0][a_key].shape[1], dtype=torch.float32)
        b = torch.zeros(states[0][bk].shape[0], r_max, dtype=torch.float32)
        for state, r, wk in zip(states, ranks, w):
            a[:r].add_(state[a_key], alpha=wk)  # one fused pass over the client tensor, no temporary
            b[:, :r].add_(state[bk], alpha=wk)
        if rows is not None:
            a.div_(rows)
            b.div_(cols)
        out[a_key], out[bk] = a, b
    return out


def mean_others(states: Sequence[State], p: Tensor) -> State:
    """Trained non-LoRA parameters (``modules_to_save``): weighted mean with p_k."""
    out: State = {}
    for key in other_keys(states[0]):
        acc = torch.zeros(states[0][key].shape, dtype=torch.float32)
        for state, pk in zip(states, p.tolist()):
            acc += pk * state[key].float()
        out[key] = acc
    return out


def server_step(previous: State, new: State, lr: float) -> State:
    """previous + lr (new - previous), tensor by tensor (same shapes)."""
    return {key: previous[key] + lr * (t - previous[key]) for key, t in new.items()}


def product_norm(a: Tensor, b: Tensor) -> float:
    """||B A||_F from the r x r Gram matrices: ||BA||^2 = sum((B^T B) * (A A^T))."""
    a, b = a.double(), b.double()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0).sqrt())


def stacked(states: Sequence[State], key: str, coef: Sequence[float],
            dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Stacked factors of one layer with ``B_cat @ A_cat = sum_k coef_k B_k A_k``."""
    bk = b_key(key)
    a = torch.cat([c * s[key].to(dtype) for s, c in zip(states, coef)], dim=0)
    b = torch.cat([s[bk].to(dtype) for s in states], dim=1)
    return a, b


def low_rank_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``b @ a`` without forming it: thin QRs of both factors, SVD of the core."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T
