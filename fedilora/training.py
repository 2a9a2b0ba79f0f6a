"""Local training and evaluation loops over index subsets of a ``FeatureTable``.

Small on purpose: one optimiser step loop, one evaluation loop. Whatever adapter slot is active
on the model is what trains or is evaluated; the caller swaps slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from fedilora.inputs import FeatureTable, make_batch


@dataclass(frozen=True)
class Subset:
    """Which rows of the table, and which modalities each of them has."""

    rows: torch.Tensor
    has_image: torch.Tensor
    has_text: torch.Tensor

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def drop(self, modality: str) -> "Subset":
        """The same rows with one modality absent everywhere (for per-pattern evaluation)."""
        off = torch.zeros_like(self.has_image)
        if modality == "image":
            return Subset(self.rows, off, torch.ones_like(off))
        if modality == "text":
            return Subset(self.rows, torch.ones_like(off), off)
        raise ValueError(f"unknown modality {modality!r}; expected 'image' or 'text'")


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs)


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator | None, bucket: int = 4) -> list[torch.Tensor]:
    """Random batches whose members have similar text lengths: shuffle, sort by length within
    windows of ``bucket`` batches, cut, shuffle the batches. Less padding to compute (make_batch
    trims it), the same samples per epoch, still random and seeded."""
    order = torch.randperm(len(lengths), generator=generator)
    window = batch_size * bucket
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train_local(
    model: nn.Module,
    table: FeatureTable,
    data: Subset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    fill: str = "absent",
    generator: torch.Generator | None = None,
) -> float:
    """AdamW over the trainable (active adapter) parameters; returns the mean training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: is an adapter active?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    total, count = 0.0, 0
    lengths = table.text_mask[data.rows].sum(1) * data.has_text
    for _ in range(epochs):
        for idx in length_bucketed_batches(lengths, batch_size, generator):
            batch = make_batch(table, data.rows[idx], data.has_image[idx], data.has_text[idx], fill)
            loss = F.cross_entropy(_forward(model, batch), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
    model.eval()
    return total / max(count, 1)


@torch.inference_mode()
def predict(model: nn.Module, table: FeatureTable, data: Subset, *, batch_size: int = 128, fill: str = "absent") -> torch.Tensor:
    model.eval()
    # Length-sorted batches carry little padding (make_batch trims it); order restored below.
    order = torch.argsort(table.text_mask[data.rows].sum(1) * data.has_text, stable=True)
    preds = torch.zeros(len(data), dtype=torch.long)
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        batch = make_batch(table, data.rows[idx], data.has_image[idx], data.has_text[idx], fill)
        preds[idx] = _forward(model, batch).argmax(-1)
    return preds


def evaluate(model: nn.Module, table: FeatureTable, data: Subset, *, batch_size: int = 128, fill: str = "absent") -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in truth or prediction)."""
    if len(data) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    pred = predict(model, table, data, batch_size=batch_size, fill=fill).numpy()
    truth = table.labels[data.rows].numpy()
    return {
        "accuracy": float((pred == truth).mean()),
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
    }
