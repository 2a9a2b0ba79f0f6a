"""Server-side aggregation of heterogeneous-rank LoRA adapters.

Pure functions over PEFT adapter state dicts (``{name: tensor}`` as
``peft.get_peft_model_state_dict`` returns them), so the server needs no model, no
Prefect and no MLflow, and every strategy can be tested against a hand computation.
The math is DESIGN.md section 1; each strategy is one small function registered in
``STRATEGIES``, and :func:`aggregate` is the single entry point that validates inputs
once for all of them.

Memory: ``fedavg``, ``hetlora`` and ``fedilora`` are one rule -- a weighted sum of
zero-padded factors with a (clients x rank) weight matrix -- computed by accumulating
each client into the output through slices (``out[:r_k].addcmul_(W[k, :r_k, None], A_k)``,
a fused in-place multiply-add, so not even a per-client temporary is allocated).
That loops over clients (K is small) but never builds the zero-padded stack of all
clients the einsum formulation implies, so the extra memory is one global state.
``flexlora`` never forms the dense ``d_out x d_in`` update either: the SVD of the
stacked low-rank product comes from two thin QRs and an SVD of a small matrix.

Differences from the official FediLoRA code, on purpose: the dimension-wise B rule keeps
every client's higher columns (the official loop drops them for all but the first
client); HetLoRA uses one weight per client (the official running sum skews toward early
layers); FLoRA folds each client's own scaling into its stacked rows (the official code
uses alpha / sum(r)).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

State = dict[str, Tensor]

_A = "lora_A."
_B = "lora_B."


@dataclass(frozen=True)
class Strategy:
    """One aggregation rule and how clients must treat its output.

    ``merged``: the global factors carry the scaling-folded update ``dW = sum_k p_k s_k B_k A_k``
    rather than raw factors, so a client's share of B is divided by its scaling
    (:func:`client_share` with ``merged=True``).
    ``fresh_clients``: the global product is merged into the base weights and clients
    start fresh LoRA modules (FLoRA) instead of receiving a share.
    """

    fn: Callable[..., State]
    merged: bool = False
    fresh_clients: bool = False


# --------------------------------------------------------------------------- keys


def is_lora_a(key: str) -> bool:
    return _A in key


def is_lora_b(key: str) -> bool:
    return _B in key


def b_key(a_key: str) -> str:
    """The B factor paired with a LoRA A key."""
    return a_key.replace("lora_A", "lora_B")


def _a_keys(state: State) -> list[str]:
    return [k for k in state if is_lora_a(k)]


def _other_keys(state: State) -> list[str]:
    return [k for k in state if not (is_lora_a(k) or is_lora_b(k))]


def global_rank(state: State) -> int:
    """Rank of the LoRA factors in ``state`` (rows of every A factor)."""
    ranks = {state[k].shape[0] for k in _a_keys(state)}
    if not ranks:
        raise ValueError("state has no LoRA factors (no key contains 'lora_A.')")
    if len(ranks) > 1:
        raise ValueError(f"LoRA factors of the state have different ranks: {sorted(ranks)}")
    return ranks.pop()


# --------------------------------------------------------------------------- validation


def _check_lengths(states: Sequence[State], ranks: Sequence[int], num_samples: Sequence[int],
                   scalings: Sequence[float]) -> None:
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


def _check_keys(states: Sequence[State]) -> None:
    ref = states[0]
    if not ref:
        raise ValueError("client 0: empty state")
    for k, state in enumerate(states[1:], start=1):
        missing = [key for key in ref if key not in state]
        if missing:
            raise ValueError(f"client {k}: key {missing[0]!r} of client 0 is missing")
        extra = [key for key in state if key not in ref]
        if extra:
            raise ValueError(f"client {k}: key {extra[0]!r} is not in client 0's state")
    for key in _a_keys(ref):
        if b_key(key) not in ref:
            raise ValueError(f"LoRA A factor {key!r} has no B factor {b_key(key)!r}")
    for key in ref:
        if is_lora_b(key) and key.replace("lora_B", "lora_A") not in ref:
            raise ValueError(f"LoRA B factor {key!r} has no A factor")


def _shape_error(key: str, k: int, expected: tuple[int, ...], got: tuple[int, ...], why: str) -> ValueError:
    return ValueError(f"client {k}: {key!r} has shape {got}, expected {expected} ({why})")


def _check_shapes(states: Sequence[State], ranks: Sequence[int]) -> None:
    ref = states[0]
    for key in ref:
        ref_shape = tuple(ref[key].shape)
        if not (is_lora_a(key) or is_lora_b(key)):
            for k, state in enumerate(states):
                got = state[key].shape  # torch.Size is a tuple: compared as one
                if got != ref_shape:
                    raise _shape_error(key, k, ref_shape, tuple(got), "as client 0")
            continue
        rank_dim = 0 if is_lora_a(key) else 1
        for k, (state, r) in enumerate(zip(states, ranks)):
            got = state[key].shape
            if len(got) != 2:
                raise _shape_error(key, k, (-1, -1), tuple(got), "LoRA factors must be 2-D")
            # client 0 passed the 2-D check first, so ref_shape has two dims here
            expected = (r, ref_shape[1]) if rank_dim == 0 else (ref_shape[0], r)
            if got != expected:
                why = f"declared rank {r}" + (", other dim as client 0" if k else "")
                raise _shape_error(key, k, expected, tuple(got), why)


def _weights(num_samples: Sequence[int]) -> Tensor:
    n = torch.as_tensor(num_samples, dtype=torch.float64)
    return n / n.sum()


# --------------------------------------------------------------------------- shared math


def _mean_others(states: Sequence[State], p: Tensor) -> State:
    """Non-LoRA trained parameters (modules_to_save): weighted mean with p_k."""
    out: State = {}
    for key in _other_keys(states[0]):
        acc = torch.zeros(states[0][key].shape, dtype=torch.float32)
        for state, pk in zip(states, p.tolist()):
            acc += pk * state[key].float()
        out[key] = acc
    return out


def _padded_sum(states: Sequence[State], ranks: Sequence[int], weights: Tensor) -> State:
    """``A[j] = sum_k W[k, j] A_k[j]`` over clients owning row j; B likewise on columns.

    ``weights`` is (K x r_max); entries past a client's rank are never read, which is the
    same as zero-padding that client. Accumulates client by client into the output.
    """
    r_max = max(ranks)
    w = weights.to(torch.float32)
    rows = [w[k, :r, None] for k, r in enumerate(ranks)]  # per-client weight views, sliced once
    cols = [w[k, None, :r] for k, r in enumerate(ranks)]
    out: State = {}
    for a_key in _a_keys(states[0]):
        bk = b_key(a_key)
        a = torch.zeros(r_max, states[0][a_key].shape[1], dtype=torch.float32)
        b = torch.zeros(states[0][bk].shape[0], r_max, dtype=torch.float32)
        for state, r, w_row, w_col in zip(states, ranks, rows, cols):
            # fused multiply-add in place: one pass over the client tensor, no temporary
            a[:r].addcmul_(w_row, state[a_key].float())
            b[:, :r].addcmul_(state[bk].float(), w_col)
        out[a_key], out[bk] = a, b
    return out


def _per_client(values: Tensor, r_max: int) -> Tensor:
    """One weight per client, repeated over every rank dimension: (K,) -> (K x r_max)."""
    return values[:, None].expand(-1, r_max)


def _product_norm(a: Tensor, b: Tensor) -> float:
    """||B A||_F from the r x r Gram matrices: ||BA||^2 = sum((B^T B) * (A A^T))."""
    a, b = a.double(), b.double()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0).sqrt())


def _stack(states: Sequence[State], key: str, coef: Sequence[float],
           dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Stacked factors with B_cat @ A_cat = sum_k coef_k B_k A_k."""
    bk = b_key(key)
    a = torch.cat([c * s[key].to(dtype) for s, c in zip(states, coef)], dim=0)
    b = torch.cat([s[bk].to(dtype) for s in states], dim=1)
    return a, b


# --------------------------------------------------------------------------- strategies


def _fedavg(states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
    if len(set(ranks)) > 1:
        raise ValueError(
            f"fedavg needs equal ranks across clients, got ranks {list(ranks)}; "
            "use hetlora, flora, flexlora or fedilora for heterogeneous ranks"
        )
    return _padded_sum(states, ranks, _per_client(p, ranks[0]))


def _fedilora(states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
    r = torch.as_tensor(list(ranks))
    owns = (torch.arange(max(ranks))[None, :] < r[:, None]).to(p.dtype)  # M[k, j] = j < r_k
    w = p[:, None] * owns
    return _padded_sum(states, ranks, w / w.sum(dim=0, keepdim=True))


def _hetlora(states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
    norms = torch.tensor(
        [sum(_product_norm(s[key], s[b_key(key)]) for key in _a_keys(s)) for s in states],
        dtype=torch.float64,
    )
    w = norms / norms.sum() if norms.sum() > 0 else p
    return _padded_sum(states, ranks, _per_client(w, max(ranks)))


def _flora(states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float]) -> State:
    coef = [pk * sk for pk, sk in zip(p.tolist(), scalings)]
    out: State = {}
    for key in _a_keys(states[0]):
        out[key], out[b_key(key)] = _stack(states, key, coef)
    return out


def _low_rank_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``b @ a`` without forming it: thin QRs of both factors, SVD of the core."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def _flexlora(states: Sequence[State], ranks: Sequence[int], p: Tensor, scalings: Sequence[float],
              *, rank: int | None = None) -> State:
    """Truncated SVD of dW; every module gets the same global rank so shares are uniform.

    Default rank: min(sum r_k, largest min(d_out, d_in)) -- enough to reproduce dW exactly.
    A module whose dW cannot reach that rank is zero-padded (its extra components are 0).
    """
    a_keys = _a_keys(states[0])
    max_dim = max(min(states[0][b_key(k)].shape[0], states[0][k].shape[1]) for k in a_keys)
    target = min(sum(ranks), max_dim) if rank is None else int(rank)
    if target <= 0:
        raise ValueError(f"flexlora rank must be positive, got {rank}")
    coef = [pk * sk for pk, sk in zip(p.tolist(), scalings)]
    out: State = {}
    for key in a_keys:
        u, s, vh = _low_rank_svd(*_stack(states, key, coef, torch.float64))
        keep = min(target, s.shape[0])
        root = s[:keep].sqrt()
        a = torch.zeros(target, vh.shape[1], dtype=torch.float32)
        b = torch.zeros(u.shape[0], target, dtype=torch.float32)
        a[:keep] = (root[:, None] * vh[:keep]).float()
        b[:, :keep] = (u[:, :keep] * root[None, :]).float()
        out[key], out[b_key(key)] = a, b
    return out


STRATEGIES: dict[str, Strategy] = {
    "fedavg": Strategy(_fedavg),
    "hetlora": Strategy(_hetlora),
    "flora": Strategy(_flora, merged=True, fresh_clients=True),
    "flexlora": Strategy(_flexlora, merged=True),
    "fedilora": Strategy(_fedilora),
}


# --------------------------------------------------------------------------- public API


def _check_options(method: str, fn: Callable[..., State], options: dict[str, object]) -> None:
    known = {n for n, prm in inspect.signature(fn).parameters.items() if prm.kind is prm.KEYWORD_ONLY}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {method!r} got unknown options {unknown}; it accepts {sorted(known)}")


def aggregate(method: str, states: list[State], ranks: list[int], num_samples: list[int], *,
              scalings: list[float] | None = None, **options: object) -> State:
    """Aggregate client adapters into one global state with the named strategy.

    ``scalings`` are the clients' LoRA scalings s_k = alpha_k / r_k (default 1.0). Only the
    merged strategies (flora, flexlora) use them: fedavg, hetlora and fedilora average raw
    factors, which is meaningful when s_k is equal across clients (the project default).
    Returns new float32 tensors; the inputs are not modified.
    """
    if method not in STRATEGIES:
        raise ValueError(f"unknown aggregation method {method!r}; known methods: {sorted(STRATEGIES)}")
    strategy = STRATEGIES[method]
    _check_options(method, strategy.fn, options)
    scalings = [1.0] * len(states) if scalings is None else list(scalings)
    _check_lengths(states, ranks, num_samples, scalings)
    ranks = [int(r) for r in ranks]
    _check_keys(states)
    _check_shapes(states, ranks)
    p = _weights(num_samples)
    out = strategy.fn(states, ranks, p, scalings, **options)
    out.update(_mean_others(states, p))
    return {key: out[key] for key in states[0]}  # keep the clients' key order


def client_share(global_state: State, rank: int, *, scaling: float = 1.0, merged: bool = False) -> State:
    """What a client of ``rank`` receives: first ``rank`` rows of A, columns of B.

    For a merged strategy the global factors carry dW with scaling folded in, so B is
    divided by the client's ``scaling``: ``scaling * B_r @ A_r`` is then the truncated dW.
    """
    g = global_rank(global_state)
    if rank <= 0 or rank > g:
        raise ValueError(f"client rank {rank} must be in [1, {g}] (the global rank)")
    if merged and not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    out: State = {}
    for key, t in global_state.items():
        if is_lora_a(key):
            out[key] = t[:rank].clone()
        elif is_lora_b(key):
            out[key] = t[:, :rank] / scaling if merged else t[:, :rank].clone()
        else:
            out[key] = t.clone()
    return out


def keep_unowned(new: State, previous: State) -> State:
    """Rank dimensions that no sampled client owns keep their previous global values.

    With partial participation a round may sample only low-rank clients; the global adapter
    must still serve the largest ranks next round, so its higher dimensions carry over
    unchanged instead of shrinking (or being zeroed) away.
    """
    r_new, r_prev = global_rank(new), global_rank(previous)
    if r_new >= r_prev:
        return new
    out = dict(new)
    for key, t in new.items():
        if is_lora_a(key):
            out[key] = torch.cat([t, previous[key][r_new:]], dim=0)
        elif is_lora_b(key):
            out[key] = torch.cat([t, previous[key][:, r_new:]], dim=1)
    return out
