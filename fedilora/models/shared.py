"""The one base model of a process: built once from a :class:`ModelSpec`, wrapped with PEFT, and
shared by every run and client in the process (clients swap adapter slots on it).

A :class:`SharedModel` keeps, beside the PEFT model, what must survive runs that change it: the
adapted layers' foundation weights (FLoRA folds its updates into them; a new run restores them)
and the first slot's state at build time (the keys and shapes of a fresh adapter, and the seeded
initial projector and head)."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file

from fedilora import devices
from fedilora.config import ModelConfig, Params, RuntimeConfig
from fedilora.lora import State
from fedilora.models import adapters
from fedilora.models.families import family_of, trained_modules


class ModelSpec(BaseModel):
    """Everything building the base model reads, derived from the params and the feature table;
    its JSON is the key of the process-wide model cache, so two runs share a model exactly when
    they would build the same one."""

    model_config = ConfigDict(frozen=True)
    model: ModelConfig
    runtime: RuntimeConfig  # device, dtype, quantization: a model is built for them
    seed: int
    image_dim: int
    num_classes: int
    rank: int  # the first slot's: the largest client rank
    alpha: float
    dropout: float
    aligned: Path | None = None  # the alignment stage's trained modules, loaded into the base
    aligned_sha256: str | None = None  # their content: a re-aligned file is another model

    @classmethod
    def of(cls, params: Params, image_dim: int, num_classes: int, aligned: Path | None = None) -> "ModelSpec":
        rank = max(params.clients.client_ranks())
        digest = hashlib.sha256(Path(aligned).read_bytes()).hexdigest() if aligned else None
        return cls(model=params.model, runtime=params.runtime, seed=params.seed, image_dim=image_dim, num_classes=num_classes, rank=rank,
                   alpha=params.lora.alpha_for(rank), dropout=params.lora.dropout, aligned=aligned, aligned_sha256=digest)

    def key(self) -> str:
        return self.model_dump_json()


@dataclass
class SharedModel:
    """Runs and threads that use the model hold ``lock`` while they swap adapters or base weights."""

    peft: adapters.PeftModel
    foundation: State  # the adapted layers' base weights as built, keyed like their lora_A
    initial: State  # the first slot's state as built
    base_changed: bool = False  # whether the adapted layers' base weights now differ from ``foundation``
    lock: threading.RLock = field(default_factory=threading.RLock)


def base_model(spec: ModelSpec):
    """The unwrapped base model, its trained modules aligned when the spec says so, and where its
    LoRA goes (``wrap_with_lora`` keyword arguments; ``modules_to_save``: what ``model.trainable``
    trains of the family's trained modules)."""
    base, lora_kwargs = family_of(spec.model).build(spec.model, spec.num_classes, spec.seed, spec.image_dim, spec.runtime)
    if spec.aligned is not None:
        aligned = load_file(str(spec.aligned))
        unexpected = base.load_state_dict(aligned, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{spec.aligned}: tensors {unexpected[:3]} do not fit the model; rerun `fedilora align`")
    lora_kwargs["modules_to_save"] = trained_modules(spec.model, lora_kwargs["modules_to_save"])
    return base, lora_kwargs


def build(spec: ModelSpec) -> SharedModel:
    """The PEFT-wrapped base model on ``runtime.device`` in its precision policy (``devices.place``).
    The foundation weights are kept on the CPU (a quantized base keeps none: no method may fold
    an update into it)."""
    base, lora_kwargs = base_model(spec)
    peft = adapters.wrap_with_lora(base, spec.rank, spec.alpha, dropout=spec.dropout, **lora_kwargs)
    peft = devices.place(peft, spec.runtime)
    foundation = {} if spec.runtime.quantization != "none" else {
        k: w.detach().to("cpu", copy=True) for k, w in adapters.target_base_weights(peft).items()}
    return SharedModel(peft, foundation, adapters.get_state(peft, next(iter(peft.peft_config))))


def load_adapter_model(spec: ModelSpec, adapter_dir: Path):
    """A logged adapter (PEFT format) on a freshly built base model, ready for inference."""
    from peft import PeftModel

    return devices.place(PeftModel.from_pretrained(base_model(spec)[0], str(adapter_dir)), spec.runtime).eval()
