"""Local training and evaluation loops over index subsets of a ``FeatureTable``.

Small on purpose: one optimiser step loop, one evaluation loop. Whatever adapter slot is active
on the model is what trains or is evaluated; the caller swaps slots. Batches are built on the
CPU from the feature table (by the model family's ``make_batch``) and moved to the model's
device; forward passes run under ``runtime``'s autocast (``fedilora.devices``); what comes back
(loss, logits) is on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedilora import devices
from fedilora import metrics as task_metrics
from fedilora.config import RuntimeConfig
from fedilora.inputs import BatchFn, FeatureTable, feature_batch

CPU = RuntimeConfig(device="cpu")


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


def subset(df) -> Subset:
    """The rows of a split table (``fedilora.data.splits``) as a ``Subset``."""
    return Subset(
        torch.tensor(df["row"].to_numpy(), dtype=torch.long),
        torch.tensor(df["has_image"].to_numpy(), dtype=torch.bool),
        torch.tensor(df["has_text"].to_numpy(), dtype=torch.bool),
    )


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], runtime: RuntimeConfig) -> torch.Tensor:
    device = devices.device_of(model)
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
    with devices.autocast(model, runtime):
        return model(**inputs)


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator | None, bucket: int = 4) -> list[torch.Tensor]:
    """Random batches whose members have similar text lengths: shuffle, sort by length within
    windows of ``bucket`` batches, cut, shuffle the batches. Less padding to compute (the batch
    builders trim it), the same samples per epoch, still random and seeded."""
    order = torch.randperm(len(lengths), generator=generator)
    window = batch_size * bucket
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator | None, epochs: int,
             steps: int | None) -> Iterator[torch.Tensor]:
    """``epochs`` passes of length-bucketed batches, or the first ``steps`` batches of as many passes as that takes."""
    if not steps:
        for _ in range(epochs):
            yield from length_bucketed_batches(lengths, batch_size, generator)
        return
    if len(lengths) == 0:
        return
    done = 0
    while done < steps:
        for idx in length_bucketed_batches(lengths, batch_size, generator)[: steps - done]:
            yield idx
            done += 1


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
    make_batch: BatchFn = feature_batch,
    runtime: RuntimeConfig = CPU,
    steps: int | None = None,
) -> float:
    """AdamW over the trainable (active adapter) parameters; returns the mean training loss.
    ``epochs`` passes over ``data``, or with ``steps`` exactly that many optimiser steps (new
    shuffled passes as long as needed), so every client takes the same number whatever its size."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: is an adapter active?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = devices.grad_scaler(model, runtime)
    model.train()
    total, count = 0.0, 0
    lengths = table.text_mask[data.rows].sum(1) * data.has_text
    for idx in _batches(lengths, batch_size, generator, epochs, steps):
        batch = make_batch(table, data.rows[idx], data.has_image[idx], data.has_text[idx], fill)
        out = _forward(model, batch, runtime)  # a generative model (LLaVA) returns its LM loss on the answers
        loss = out if out.ndim == 0 else task_metrics.loss(out.float(), batch["labels"].to(out.device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(idx)
        count += len(idx)
    model.eval()
    return total / max(count, 1)


@torch.inference_mode()
def predict_logits(model: nn.Module, table: FeatureTable, data: Subset, *, fill: str = "absent",
                   make_batch: BatchFn = feature_batch, runtime: RuntimeConfig = CPU) -> torch.Tensor:
    """The model's logits (N, C) for the subset's rows, in the subset's order, in batches of
    ``runtime.eval_batch_size``."""
    batch_size = runtime.eval_batch_size
    model.eval()
    # Length-sorted batches carry little padding (make_batch trims it); order restored below.
    order = torch.argsort(table.text_mask[data.rows].sum(1) * data.has_text, stable=True)
    logits: torch.Tensor | None = None
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        batch = make_batch(table, data.rows[idx], data.has_image[idx], data.has_text[idx], fill)
        out = _forward(model, batch, runtime).float().cpu()
        if logits is None:
            logits = torch.zeros(len(data), out.shape[-1])
        logits[idx] = out
    return logits if logits is not None else torch.zeros(0, 0)


def evaluate(model: nn.Module, table: FeatureTable, data: Subset, *, fill: str = "absent",
             make_batch: BatchFn = feature_batch, runtime: RuntimeConfig = CPU) -> dict[str, float]:
    """The task's metrics (fedilora.metrics): accuracy and macro-F1 (over the classes present in
    truth or prediction); plus AUROC for binary, micro-F1 for multi-label data."""
    task = task_metrics.task_of(table.labels)
    if len(data) == 0:
        return task_metrics.empty(task)
    logits = predict_logits(model, table, data, fill=fill, make_batch=make_batch, runtime=runtime).numpy()
    return task_metrics.compute(task, table.labels[data.rows].numpy(), logits)
