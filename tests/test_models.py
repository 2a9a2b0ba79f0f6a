"""The multimodal model, adapter slots on one base model, PEFT round trips, and learning."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from PIL import Image

from fedilora.inputs import feature_batch as make_batch
from fedilora.models import adapters
from fedilora.models.encoders import encode, load_image_encoder, load_text_model, load_tokenizer
from fedilora.models.multimodal import TRAINED_MODULES, MultimodalClassifier
from fedilora.training import Subset, evaluate, train_local

TARGETS = ["query", "value"]


def _table(n: int = 48, classes: int = 3, seed: int = 0):
    """A learnable toy table: the label is written both in the text and in the image colour."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen).tolist()
    words = ["red apple", "green leaf", "blue sea"]
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    images = [Image.new("RGB", (16, 16), colours[y]) for y in labels]
    texts = [words[y] for y in labels]
    return encode(texts, images, labels, load_tokenizer(), load_image_encoder("tiny"), max_length=8)


def _model(rank: int = 4, classes: int = 3) -> PeftModel:
    torch.manual_seed(0)
    base = MultimodalClassifier(load_text_model("tiny"), load_image_encoder("tiny").dim, classes)
    return adapters.wrap_with_lora(base, rank, 2.0 * rank, TARGETS, modules_to_save=TRAINED_MODULES)


def _all(n: int, image: bool = True, text: bool = True) -> Subset:
    return Subset(torch.arange(n), torch.full((n,), image), torch.full((n,), text))


@pytest.mark.parametrize("image,text", [(True, True), (True, False), (False, True)])
def test_forward_with_each_modality_combination(image: bool, text: bool) -> None:
    table = _table(8)
    model = _model()
    data = _all(8, image, text)
    batch = make_batch(table, data.rows, data.has_image, data.has_text)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert logits.shape == (8, 3)
    assert torch.isfinite(logits).all()


def test_absent_modality_does_not_influence_output() -> None:
    """An absent image is masked: changing its features must not change the logits."""
    table = _table(8)
    model = _model().eval()
    data = _all(8, image=False)
    batch = make_batch(table, data.rows, data.has_image, data.has_text)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    before = model(**inputs)
    inputs["image_features"] = torch.randn_like(inputs["image_features"]) * 10
    assert torch.allclose(before, model(**inputs), atol=1e-5)


def test_placeholder_fill_uses_filler_not_masking() -> None:
    table = _table(4)
    data = _all(4, image=False, text=False)
    batch = make_batch(table, data.rows, data.has_image, data.has_text, fill="placeholder")
    assert batch["has_image"].all() and batch["has_text"].all()
    assert torch.equal(batch["image_features"][0], table.fill_image)
    width = batch["input_ids"].shape[1]
    assert width == int(table.fill_text_mask.sum())  # trimmed to the filler's length
    assert torch.equal(batch["input_ids"][1], table.fill_input_ids[:width])


def test_trimming_padding_leaves_logits_unchanged() -> None:
    table = _table(8)
    model = _model().eval()
    data = Subset(torch.arange(8), torch.tensor([True, False] * 4), torch.tensor([True, True, False, True] * 2))
    batch = make_batch(table, data.rows, data.has_image, data.has_text)
    assert batch["input_ids"].shape[1] < table.input_ids.shape[1]
    full = dict(batch, input_ids=table.input_ids[data.rows], text_mask=table.text_mask[data.rows])
    strip = lambda b: {k: v for k, v in b.items() if k != "labels"}  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(model(**strip(batch)), model(**strip(full)), atol=1e-5)
    only_image = make_batch(table, data.rows, torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool))
    assert only_image["input_ids"].shape[1] == 0


def test_two_ranks_share_one_base_model() -> None:
    model = _model(rank=4)
    base_params_before = sum(p.numel() for p in model.get_base_model().text_model.parameters())
    slot8 = adapters.ensure_slot(model, 8, 16.0)
    slot4 = adapters.slot_name(4, 8.0)
    s4, s8 = adapters.get_state(model, slot4), adapters.get_state(model, slot8)
    a_key = next(k for k in s4 if "lora_A." in k)
    assert s4[a_key].shape[0] == 4 and s8[a_key].shape[0] == 8
    # the foundation weights exist once: adding a slot adds only adapter tensors
    lora_params = sum(v.numel() for v in s8.values())
    total = sum(p.numel() for p in model.get_base_model().text_model.parameters())
    assert total - base_params_before == sum(v.numel() for k, v in s8.items() if "lora_" in k)
    assert lora_params < base_params_before
    # only the active slot trains
    adapters.activate(model, slot8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(slot8 in n for n in trainable)


def test_load_state_rejects_wrong_shapes_and_keys() -> None:
    model = _model(rank=4)
    slot = adapters.slot_name(4, 8.0)
    state = adapters.get_state(model, slot)
    key = next(k for k in state if "lora_A." in k)
    bad = dict(state, **{key: torch.zeros(5, state[key].shape[1])})
    with pytest.raises(ValueError, match="shape"):
        adapters.load_state(model, slot, bad)
    with pytest.raises(ValueError, match="missing keys"):
        adapters.load_state(model, slot, {k: v for k, v in state.items() if k != key})


def test_rank_larger_than_layer_width_is_an_error() -> None:
    with pytest.raises(ValueError, match="exceeds the width"):
        _model(rank=64)  # the tiny transformer is 32 wide


def test_adapter_save_load_round_trip_in_peft_format(tmp_path) -> None:
    table = _table(16)
    model = _model(rank=4)
    slot = adapters.ensure_slot(model, 8, 16.0)
    adapters.activate(model, slot)
    train_local(model, table, _all(16), epochs=1, batch_size=8, lr=1e-2)
    state = adapters.get_state(model, slot)
    out = adapters.save_adapter(model, slot, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16.0

    torch.manual_seed(123)  # a different base init must not matter for the trained head/projector
    fresh = MultimodalClassifier(load_text_model("tiny"), load_image_encoder("tiny").dim, 3)
    fresh.text_model.load_state_dict(model.get_base_model().text_model.state_dict(), strict=False)
    loaded = PeftModel.from_pretrained(fresh, str(out))
    reloaded = adapters.get_state(loaded, "default")
    assert set(reloaded) == set(state)
    for key in state:
        assert torch.equal(reloaded[key], state[key]), key
    data = _all(16)
    assert evaluate(loaded, table, data) == evaluate(model, table, data)


def test_a_few_local_steps_beat_chance() -> None:
    table = _table(60, seed=1)
    model = _model(rank=4)
    adapters.activate(model, adapters.slot_name(4, 8.0))
    data = _all(60)
    before = evaluate(model, table, data)["accuracy"]
    train_local(model, table, data, epochs=8, batch_size=12, lr=5e-3, generator=torch.Generator().manual_seed(0))
    after = evaluate(model, table, data)["accuracy"]
    assert after > 0.6 > 1 / 3  # chance is one third
    assert after > before


def test_length_bucketed_batches_cover_every_sample_once_and_group_lengths() -> None:
    from fedilora.training import length_bucketed_batches

    lengths = torch.randint(1, 30, (103,), generator=torch.Generator().manual_seed(0))
    batches = length_bucketed_batches(lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    assert all(len(b) <= 8 for b in batches)
    again = length_bucketed_batches(lengths, 8, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches) / len(batches)
    assert spread < 10  # random batches of 8 from 1..29 spread ~20
