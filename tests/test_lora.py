"""LoRA conventions: keys, rank, cutting, fresh draws, padding to a previous rank."""

from __future__ import annotations

import pytest
import torch

from fedilora import lora
from fedilora.methods.testing import D_IN, HEAD_W, a_key, b_key, make_state


def test_keys_and_rank() -> None:
    state = make_state(4, 0)
    assert lora.a_keys(state) == [a_key(0), a_key(1)]
    assert lora.b_key(a_key(0)) == b_key(0) and lora.a_key(b_key(0)) == a_key(0)
    assert lora.other_keys(state) == [HEAD_W, "base_model.model.classifier.bias"]
    assert lora.rank_of(state) == 4
    with pytest.raises(ValueError, match="no LoRA factors"):
        lora.rank_of({HEAD_W: state[HEAD_W]})
    state[a_key(1)] = torch.zeros(3, D_IN)
    with pytest.raises(ValueError, match=r"different ranks: \[3, 4\]"):
        lora.rank_of(state)


def test_cut_copies_the_first_dimensions() -> None:
    state = make_state(8, 0)
    cut = lora.cut(state, 3)
    assert torch.equal(cut[a_key(0)], state[a_key(0)][:3]) and torch.equal(cut[b_key(0)], state[b_key(0)][:, :3])
    assert cut[HEAD_W].data_ptr() != state[HEAD_W].data_ptr()
    assert lora.rank_shape(a_key(0), (3, D_IN)) == (D_IN,) and lora.rank_shape(b_key(0), (10, 3)) == (10,)
    with pytest.raises(ValueError, match=r"client rank 9 must be in \[1, 8\]"):
        lora.cut(state, 9)


def test_fresh_is_seeded_identity_adapter() -> None:
    template = make_state(8, 0)
    one, two = lora.fresh(template, 4, seed=1), lora.fresh(template, 4, seed=1)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one[a_key(0)], lora.fresh(template, 4, seed=2)[a_key(0)])
    assert one[a_key(0)].shape == (4, D_IN) and one[a_key(0)].abs().max() <= D_IN**-0.5
    assert not one[b_key(0)].any() and torch.equal(one[HEAD_W], template[HEAD_W])


def test_pad_keeps_or_zeroes_the_missing_dimensions() -> None:
    previous, new = make_state(8, 0), make_state(4, 1)
    kept, zeroed = lora.pad(new, previous), lora.pad(new, previous, keep=False)
    assert torch.equal(kept[a_key(0)], torch.cat([new[a_key(0)], previous[a_key(0)][4:]]))
    assert torch.equal(kept[b_key(0)], torch.cat([new[b_key(0)], previous[b_key(0)][:, 4:]], dim=1))
    assert not zeroed[a_key(0)][4:].any() and torch.equal(zeroed[a_key(0)][:4], new[a_key(0)])
    assert lora.pad(previous, new) is previous  # nothing missing
