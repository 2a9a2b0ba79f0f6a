"""FedAvg: the weighted mean, equal ranks only."""

from __future__ import annotations

import pytest
import torch

from fedilora.methods import aggregate, strategy
from fedilora.methods.testing import make_state, probs, setup


def test_weighted_mean() -> None:
    states = [make_state(4, s) for s in range(3)]
    n = [10, 30, 60]
    out = aggregate("fedavg", states, [4, 4, 4], n)
    for key in states[0]:
        expected = sum(pk * s[key] for pk, s in zip(probs(n), states))
        torch.testing.assert_close(out[key], expected)
        assert out[key].dtype == torch.float32


def test_heterogeneous_ranks_raise() -> None:
    states = [make_state(r, s) for s, r in enumerate([4, 8])]
    with pytest.raises(ValueError, match=r"fedavg needs equal ranks.*\[4, 8\]"):
        aggregate("fedavg", states, [4, 8], [1, 1])


def test_share_is_the_global_and_editing_applies_from_round_2() -> None:
    method = strategy("fedavg", setup([4, 4]))
    state = make_state(4, 0)
    share = method.share(state, 1, 3)
    assert all(torch.equal(share[k], state[k]) and share[k].data_ptr() != state[k].data_ptr() for k in state)
    assert not method.editable(1) and method.editable(2)
