"""FediLoRA's dimension-wise aggregation: the identities of docs/method.md."""

from __future__ import annotations

import torch

from fedilora.lora import rank_of
from fedilora.methods import aggregate, strategy
from fedilora.methods.testing import HEAD_B, HEAD_W, LAYERS, a_key, b_key, make_state, setup


def test_equals_fedavg_for_equal_ranks() -> None:
    states = [make_state(8, s) for s in range(4)]
    n = [5, 7, 11, 13]
    fedilora = aggregate("fedilora", states, [8] * 4, n)
    fedavg = aggregate("fedavg", states, [8] * 4, n)
    assert fedilora.keys() == fedavg.keys()
    for key in fedavg:
        torch.testing.assert_close(fedilora[key], fedavg[key], rtol=0, atol=0)


def test_dimension_owned_by_one_client_is_not_diluted() -> None:
    ranks = [2, 4, 8]
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    out = aggregate("fedilora", states, ranks, [100, 1, 1])
    for i in range(LAYERS):
        torch.testing.assert_close(out[a_key(i)][4:], states[2][a_key(i)][4:])
        torch.testing.assert_close(out[b_key(i)][:, 4:], states[2][b_key(i)][:, 4:])


def test_shared_dimensions_hand_computed() -> None:
    ranks = [2, 4, 8]
    n = [10, 20, 70]
    states = [make_state(r, s) for s, r in enumerate(ranks)]
    out = aggregate("fedilora", states, ranks, n)
    a = [s[a_key(1)] for s in states]
    b = [s[b_key(1)] for s in states]
    # rows 0-1: all three clients, p = (.1, .2, .7)
    torch.testing.assert_close(out[a_key(1)][:2], 0.1 * a[0] + 0.2 * a[1][:2] + 0.7 * a[2][:2])
    # rows 2-3: clients 1 and 2, weights 20/90 and 70/90
    torch.testing.assert_close(out[a_key(1)][2:4], (20 * a[1][2:4] + 70 * a[2][2:4]) / 90)
    torch.testing.assert_close(out[b_key(1)][:, :2], 0.1 * b[0] + 0.2 * b[1][:, :2] + 0.7 * b[2][:, :2])
    # B columns above the first client's rank keep every owner's values (unlike the official loop)
    torch.testing.assert_close(out[b_key(1)][:, 2:4], (20 * b[1][:, 2:4] + 70 * b[2][:, 2:4]) / 90)
    for key in (HEAD_W, HEAD_B):  # trained non-LoRA parameters: the p_k-weighted mean
        torch.testing.assert_close(out[key], 0.1 * states[0][key] + 0.2 * states[1][key] + 0.7 * states[2][key])


def test_unowned_dimensions_keep_the_previous_global_or_are_zeroed() -> None:
    previous = make_state(8, 9)
    states = [make_state(r, s) for s, r in enumerate([2, 4])]  # nobody sampled owns dimensions 4-7
    kept = strategy("fedilora", setup([2, 4, 8])).aggregate(states, [2, 4], [1, 1], previous)
    zeroed = strategy("fedilora", setup([2, 4, 8]), {"unowned": "zero"}).aggregate(states, [2, 4], [1, 1], previous)
    assert kept.base_delta is None and rank_of(kept.state) == rank_of(zeroed.state) == 8
    for i in range(LAYERS):
        torch.testing.assert_close(kept.state[a_key(i)][4:], previous[a_key(i)][4:], rtol=0, atol=0)
        torch.testing.assert_close(kept.state[b_key(i)][:, 4:], previous[b_key(i)][:, 4:], rtol=0, atol=0)
        assert not zeroed.state[a_key(i)][4:].any() and not zeroed.state[b_key(i)][:, 4:].any()
        torch.testing.assert_close(kept.state[a_key(i)][:4], zeroed.state[a_key(i)][:4], rtol=0, atol=0)


def test_shares_cut_the_global_and_first_round_options() -> None:
    method = strategy("fedilora", setup([2, 4, 8]))
    global_state = make_state(8, 0)
    share = method.share(global_state, 1, 2)
    assert rank_of(share) == 4
    torch.testing.assert_close(share[a_key(0)], global_state[a_key(0)][:4], rtol=0, atol=0)
    torch.testing.assert_close(share[b_key(0)], global_state[b_key(0)][:, :4], rtol=0, atol=0)
    fresh = strategy("fedilora", setup([2, 4, 8]), {"first_round": "fresh"})
    own = [fresh.share(global_state, c, 1) for c in range(3)]
    assert [rank_of(s) for s in own] == [2, 4, 8]
    assert not torch.equal(own[1][a_key(0)], global_state[a_key(0)][:4])  # a client's own draw
    assert all(not s[b_key(0)].any() for s in own)  # B = 0: each starts as the base model
    torch.testing.assert_close(own[2][HEAD_W], global_state[HEAD_W], rtol=0, atol=0)
    torch.testing.assert_close(fresh.share(global_state, 2, 2)[a_key(0)], global_state[a_key(0)], rtol=0, atol=0)


def official_loop(states, ranks, num_samples, r_global):
    """The official code's dimension-wise loop, written out as it runs: clients in the given order,
    every factor zero-padded to the global rank, each rank-group slice scaled by the client's
    renormalised weight for that group; for B, every client after the first moves its slice start
    to its own rank after the first group (so it adds nothing above the smallest sampled rank)."""
    p = [n / sum(num_samples) for n in num_samples]
    groups = sorted(set(ranks))
    mass = {g: sum(pk for pk, r in zip(p, ranks) if r >= g) for g in groups}
    out = {}
    for k, (state, my_rank) in enumerate(zip(states, ranks)):
        for key, t in state.items():
            if "lora_A." in key:
                padded = torch.cat([t, torch.zeros(r_global - my_rank, t.shape[1])])
                rows = torch.zeros_like(padded) if k else padded.clone()
                last = 0
                for g in groups:
                    if my_rank >= g:
                        rows[last:g] = padded[last:g] * (p[k] / mass[g])
                        last = g
                out[key] = rows if k == 0 else out[key] + rows
            elif "lora_B." in key:
                padded = torch.cat([t, torch.zeros(t.shape[0], r_global - my_rank)], dim=1)
                cols = padded.clone() if k == 0 else torch.zeros_like(padded)
                last = 0
                for g in groups:
                    if my_rank >= g:
                        cols[:, last:g] = padded[:, last:g] * (p[k] / mass[g])
                        last = g if k == 0 else my_rank  # the official slice-start defect
                out[key] = cols if k == 0 else out[key] + cols
    return out


def _official(ranks: list[int], n: list[int], r_global: int = 8) -> None:
    states = [make_state(r, s, head=False) for s, r in enumerate(ranks)]
    previous = make_state(r_global, 9, head=False)
    method = strategy("fedilora", setup([*ranks, r_global]), {"b_columns": "official", "unowned": "zero"})
    ours = method.aggregate(states, ranks, n, previous).state
    theirs = official_loop(states, ranks, n, r_global)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    return ours, states


def test_official_b_columns_match_the_official_loop() -> None:
    ours, states = _official([4, 2, 8, 4], [10, 20, 30, 40])  # first client owns 4 of 8
    # above the smallest sampled rank only the first client's columns survive, scaled down
    assert torch.equal(ours[b_key(0)][:, 4:], torch.zeros(10, 4))
    assert not torch.allclose(ours[b_key(0)][:, 2:4], states[0][b_key(0)][:, 2:4])


def test_official_b_columns_vanish_when_the_first_client_has_the_smallest_rank() -> None:
    ours, _ = _official([2, 4, 8], [1, 1, 1])
    assert torch.equal(ours[b_key(1)][:, 2:], torch.zeros(10, 6))  # only the A rows keep dimensions 2-7
    assert ours[a_key(1)][2:8].abs().sum() > 0


def test_server_learning_rate_moves_part_of_the_way() -> None:
    ranks = [4, 8]
    states, previous = [make_state(r, s) for s, r in enumerate(ranks)], make_state(8, 9)
    full = strategy("fedilora", setup(ranks)).aggregate(states, ranks, [1, 1], previous).state
    slow = type(setup(ranks))(seed=0, ranks=(4, 8), alpha_for=lambda r: 2.0 * r, server_lr=0.5)
    half = strategy("fedilora", slow).aggregate(states, ranks, [1, 1], previous).state
    for key in full:
        torch.testing.assert_close(half[key], previous[key] + 0.5 * (full[key] - previous[key]))
