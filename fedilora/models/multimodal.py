"""A LLaVA-shaped classifier: image features become a few tokens in front of the text tokens.

A missing modality is *absent*: its tokens are masked out of attention and pooling, never
filled with another sample's data. The transformer is the shared, frozen foundation model;
LoRA adapters (PEFT) sit on its attention projections and the projector and head are trained
(``modules_to_save``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel


TRAINED_MODULES = ["image_projector", "classifier"]  # trained besides LoRA (PEFT modules_to_save)


class MultimodalClassifier(nn.Module):
    """Pooling is per modality (image tokens, text tokens), concatenated for the head: the
    image keeps a direct path to the decision even though the text tokens outnumber it."""

    def __init__(self, text_model: BertModel, image_dim: int, num_classes: int, num_image_tokens: int = 2):
        super().__init__()
        hidden = text_model.config.hidden_size
        self.text_model = text_model
        self.num_image_tokens = num_image_tokens
        # LayerNorm first: frozen CNN features are on another scale than token embeddings
        self.image_projector = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, num_image_tokens * hidden))
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        image_features: torch.Tensor,
        has_image: torch.Tensor,
        has_text: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, classes). ``has_image``/``has_text`` (B,) bool mask whole modalities."""
        batch = input_ids.shape[0]
        hidden = self.text_model.config.hidden_size
        image_tokens = self.image_projector(image_features).view(batch, self.num_image_tokens, hidden)
        text_tokens = self.text_model.embeddings.word_embeddings(input_ids)
        embeds = torch.cat([image_tokens, text_tokens], dim=1)
        image_mask = has_image[:, None].expand(batch, self.num_image_tokens)
        mask = torch.cat([image_mask, text_mask.bool() & has_text[:, None]], dim=1)
        out = self.text_model(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
        n = self.num_image_tokens
        pooled = torch.cat([_masked_mean(out[:, :n], mask[:, :n]), _masked_mean(out[:, n:], mask[:, n:])], dim=-1)
        return self.classifier(pooled)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the present positions; zeros where a modality is absent altogether."""
    w = mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
