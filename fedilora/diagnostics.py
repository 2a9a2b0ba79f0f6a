"""Per-rank-dimension diagnostics of one aggregation: which sampled clients own each rank
dimension of the global adapter, their weights in it, how far the global adapter moved along it,
and how much of that move each client supplied.

For a method that combines dimension by dimension (``Strategy.dimension_weights``), the global
dimension j (row j of every A, column j of every B, over all adapted layers) is
sum_k W[k, j] x client k's, so its change from the previous global adapter decomposes as
Delta_j = sum_k c_kj + residual, c_kj = W[k, j] (client_k[j] - previous[j]), the residual being
(sum_k W[k, j] - 1) previous[j] (zero when the weights of dimension j sum to 1). Client k's share of
the change is the projection <c_kj, Delta_j> / ||Delta_j||^2; the shares and the residual's sum to 1.
Over several dimensions the projections are pooled (sums of the numerators over the sums of the
denominators). Methods that re-derive every component (stacking, SVD) get owners and weights only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedilora.lora import State, a_keys, b_key, rank_of


def _factors(state: State, rank: int) -> tuple[list[Tensor], list[Tensor]]:
    """Every layer's A rows and B columns, float64, each (rank x d): dimension j is row j."""
    keys = a_keys(state)
    return [state[k][:rank].double() for k in keys], [state[b_key(k)][:, :rank].double().T for k in keys]


def rank_dimensions(previous: State, new: State, states: Sequence[State], ranks: Sequence[int], clients: Sequence[int],
                    weights: tuple[Tensor, Tensor] | None, server_lr: float = 1.0) -> dict:
    """The diagnostics of one round as a JSON-ready dict: ``dimensions`` (one entry per global rank
    dimension) and ``summary`` (scalars: the global change's norm, the largest client share, the
    highest-rank client's share, the number of dimensions no sampled client owns). With a server
    learning rate the global adapter moves by ``server_lr`` x the aggregate, and so does each
    client's contribution."""
    r_global = rank_of(new)
    r_max = max(ranks)
    owners = [[c for c, r in zip(clients, ranks) if r > j] for j in range(r_global)]
    summary = {"unowned_dims": float(sum(not o for o in owners))}
    if weights is None or rank_of(previous) != r_global:
        return {"dimensions": [{"j": j, "owners": o} for j, o in enumerate(owners)], "summary": summary}
    w_a, w_b = (w.double() for w in weights)
    prev_a, prev_b = _factors(previous, r_global)
    new_a, new_b = _factors(new, r_global)
    change = sum(((n - p) ** 2).sum(1) for n, p in zip(new_a + new_b, prev_a + prev_b))  # (r_global,)
    dots = torch.zeros(len(states), r_global, dtype=torch.float64)
    for k, (state, r) in enumerate(zip(states, ranks)):
        own_a, own_b = _factors(state, r)
        for own, prev, nw, w in ((own_a, prev_a, new_a, w_a), (own_b, prev_b, new_b, w_b)):
            for c, p, n in zip(own, prev, nw):
                contribution = server_lr * w[k, :r, None] * (c - p[:r])
                dots[k, :r] += (contribution * (n[:r] - p[:r])).sum(1)
    dims = []
    for j in range(r_global):
        entry = {"j": j, "owners": owners[j], "change_norm": float(change[j].sqrt())}
        if j < r_max:
            owned = [k for k, r in enumerate(ranks) if r > j]
            entry["weights"] = [float(w_a[k, j]) for k in owned]
            entry["shares"] = [float(dots[k, j] / change[j]) if change[j] > 0 else 0.0 for k in owned]
        dims.append(entry)
    total = float(change[:r_max].sum())
    pooled = (dots.sum(1) / total).tolist() if total > 0 else [0.0] * len(states)
    highest = [k for k, r in enumerate(ranks) if r == r_max]
    summary.update(change_norm=float(change.sum().sqrt()), top_client_share=max(pooled),
                   highest_rank_share=sum(pooled[k] for k in highest))
    return {"dimensions": dims, "summary": summary, "client_shares": dict(zip(map(str, clients), pooled))}
