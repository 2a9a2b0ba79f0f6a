"""One base model in memory; every client's LoRA state is swapped into a PEFT adapter slot.

PEFT keeps one named adapter per *shape* (``r4``, ``r8``, ... and the global one), not one per
client: a client's turn is ``load_state`` into the slot of its rank, ``set_adapter``, train,
``get_state``. States are plain ``{name: tensor}`` dicts (PEFT's own keys), which is the seam
to the aggregation math and to safetensors files.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from fedilora.devices import keep_trained_float32

State = dict[str, torch.Tensor]


def slot_name(rank: int, alpha: float) -> str:
    return f"r{rank}_a{alpha:g}".replace(".", "p")


def lora_config(
    rank: int,
    alpha: float,
    target_modules: list[str],
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
    exclude_modules: str | None = None,
) -> PeftLoraConfig:
    """``modules_to_save``: the trained non-LoRA modules (none by default); ``exclude_modules``
    is PEFT's (a regex over module names, e.g. LLaVA's vision tower)."""
    return PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        modules_to_save=list(modules_to_save or []),
        exclude_modules=exclude_modules,
    )


def wrap_with_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: list[str],
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
    exclude_modules: str | None = None,
) -> PeftModel:
    """Freeze the foundation model and add the first adapter slot."""
    max_rank = _max_rank(model, target_modules, exclude_modules)
    if rank > max_rank:
        raise ValueError(f"clients.ranks: rank {rank} exceeds the width {max_rank} of the adapted layers")
    config = lora_config(rank, alpha, target_modules, dropout, modules_to_save, exclude_modules)
    return get_peft_model(model, config, adapter_name=slot_name(rank, alpha))


def _max_rank(model: nn.Module, target_modules: list[str], exclude_modules: str | None = None) -> int:
    widths = [
        min(m.in_features, m.out_features)
        for name, m in model.named_modules()
        if hasattr(m, "in_features") and name.split(".")[-1] in target_modules
        and not (exclude_modules and re.fullmatch(exclude_modules, name))
    ]
    if not widths:
        raise ValueError(f"model.target_modules: {target_modules} match no linear layer of the model")
    return min(widths)


def ensure_slot(model: PeftModel, rank: int, alpha: float, dropout: float = 0.0) -> str:
    """Name of the adapter slot for (rank, alpha), creating it on first use."""
    name = slot_name(rank, alpha)
    if name not in model.peft_config:
        first = next(iter(model.peft_config.values()))  # the same targets and trained modules as the first slot
        max_rank = _max_rank(model.get_base_model(), _targets(model), first.exclude_modules)
        if rank > max_rank:
            raise ValueError(f"clients.ranks: rank {rank} exceeds the width {max_rank} of the adapted layers")
        saved = list(first.modules_to_save) if first.modules_to_save is not None else None
        model.add_adapter(name, lora_config(rank, alpha, _targets(model), dropout, saved, first.exclude_modules))
        keep_trained_float32(model)
    return name


def _targets(model: PeftModel) -> list[str]:
    first = next(iter(model.peft_config.values()))
    return sorted(first.target_modules)


def activate(model: PeftModel, name: str) -> None:
    """Make ``name`` the adapter that forward passes and training use (others stay frozen)."""
    model.set_adapter(name)


def get_state(model: PeftModel, name: str) -> State:
    """Slot ``name``'s state as new CPU float32 tensors (a copy even when the model is on the CPU)."""
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}


def load_state(model: PeftModel, name: str, state: State) -> None:
    """Copy ``state`` into slot ``name``; a key or shape that does not fit is an error, not a skip."""
    expected = get_peft_model_state_dict(model, adapter_name=name)
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not fit slot {name}: missing keys {sorted(missing)[:3]}, "
            f"unexpected keys {sorted(unexpected)[:3]}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"adapter state key {key}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    set_peft_model_state_dict(model, state, adapter_name=name)  # copies into the slot's device and dtype


def save_adapter(model: PeftModel, name: str, directory: Path) -> Path:
    """PEFT's own format (adapter_config.json + adapter_model.safetensors), loadable by
    ``PeftModel.from_pretrained``; the slot is written under ``directory`` directly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), selected_adapters=[name], safe_serialization=True)
    nested = directory / name
    if nested.is_dir():  # PEFT nests non-default adapter names in a sub-folder
        for f in nested.iterdir():
            f.replace(directory / f.name)
        nested.rmdir()
    return directory


def target_base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The frozen weights under the LoRA layers, keyed like the ``lora_A`` state keys.

    Stacking methods (FLoRA) merge the aggregated update into these, so they must be restorable.
    """
    weights = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Linear) and hasattr(module, "lora_A"):
            weights[f"{name}.lora_A.weight"] = base.weight
    return weights
