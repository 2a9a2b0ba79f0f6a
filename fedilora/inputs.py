"""Model inputs computed once per dataset: token ids and cached frozen image features.

The image encoder never changes, so its features are computed in the ``prepare`` step (each model
family's ``encode``) and stored (safetensors); every client and round then only indexes tensors.
The batch builder is where a missing modality becomes a mask, or, with ``missing.fill:
placeholder`` (the official code's behaviour, for comparison), a neutral filler input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedilora.atomic import atomic_path

PLACEHOLDER_TEXT = ""  # tokenises to [CLS] [SEP]: a text that says nothing

# make_batch(table, rows, has_image, has_text, fill) -> the model's keyword inputs plus ``labels``;
# each model family has its own (fedilora.models.families)
BatchFn = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, str], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class FeatureTable:
    input_ids: torch.Tensor  # (N, L) int64
    text_mask: torch.Tensor  # (N, L) bool
    image_features: torch.Tensor  # (N, F) float32 features, or (N, 3, H, W) pixels (model.name_or_path)
    labels: torch.Tensor  # (N,) int64
    fill_input_ids: torch.Tensor  # (L,) placeholder text
    fill_text_mask: torch.Tensor  # (L,)
    fill_image: torch.Tensor  # (F,) features of an all-zero normalised image (any trailing shape)
    # model-specific tensors saved as ``extra.<name>`` (LLaVA: prompt variants and answer ids)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self) if f.name != "extra"}
            tensors.update({f"extra.{k}": v.contiguous() for k, v in self.extra.items()})
            save_file(tensors, str(tmp))

    @classmethod
    def load(cls, path: Path) -> "FeatureTable":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: feature cache not found; run `fedilora prepare` first")
        try:
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises several types for a bad file
            raise ValueError(f"{path}: not a readable safetensors feature cache ({err})") from None
        names = [f.name for f in fields(cls) if f.name != "extra"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{path}: feature cache lacks tensors {missing}")
        extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(**{n: tensors[n] for n in names}, extra=extra)


def feature_batch(
    table: FeatureTable,
    rows: torch.Tensor,
    has_image: torch.Tensor,
    has_text: torch.Tensor,
    fill: str = "absent",
) -> dict[str, torch.Tensor]:
    """Inputs of a classifier over token ids and image features or pixels (the embedded model,
    CLIP, ViLT: ``forward(input_ids, text_mask, image_features, has_image, has_text)``) plus
    ``labels``."""
    input_ids = table.input_ids[rows]
    text_mask = table.text_mask[rows]
    image_features = table.image_features[rows]
    if fill == "placeholder":
        no_text, no_image = ~has_text, ~has_image
        input_ids = torch.where(no_text[:, None], table.fill_input_ids, input_ids)
        text_mask = torch.where(no_text[:, None], table.fill_text_mask, text_mask)
        image_features = torch.where(no_image.view(-1, *[1] * (image_features.dim() - 1)), table.fill_image, image_features)
        has_image = torch.ones_like(has_image)
        has_text = torch.ones_like(has_text)
    elif fill != "absent":
        raise ValueError(f"missing.fill: unknown value {fill!r}; expected 'absent' or 'placeholder'")
    # Drop trailing text positions that no sample of the batch attends to: masked positions
    # change nothing for the others, and a batch without text keeps only the image tokens.
    attended = (text_mask & has_text[:, None]).any(0)
    width = int(attended.nonzero().max()) + 1 if attended.any() else 0
    input_ids, text_mask = input_ids[:, :width], text_mask[:, :width]
    return {
        "input_ids": input_ids,
        "text_mask": text_mask,
        "image_features": image_features,
        "has_image": has_image,
        "has_text": has_text,
        "labels": table.labels[rows],
    }
