"""Typed model of ``params.yaml``: every knob of a run, validated before any work starts.

Unknown keys are rejected (``extra="forbid"``) so a misspelt knob fails loudly instead of
silently running the default; errors name the dotted field and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Pattern = Literal["image", "text", "both"]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the dataset lives and how each sample's text is built."""

    source: str = "emoji"  # "emoji" (embedded default), a local dataset directory, or a Hub name
    # How ``source`` is laid out (README, "Your own data"); ``auto`` detects it from the files.
    format: Literal["auto", "hf", "imagefolder", "table", "food101", "mmimdb", "hateful_memes"] = "auto"
    root: Path = Path("data")
    text_field: Literal["name", "keywords", "both"] = "keywords"
    image_size: PositiveInt = 224
    max_text_length: PositiveInt = 24
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    # a public slice of the data that no client holds and no test split draws from: the alignment
    # stage's data (0: none). Drawn once, with its own seed, so every run seed shares it (and the
    # aligned modules), as every run shares the foundation model.
    public_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    public_seed: int = 0

    @field_validator("root")
    @classmethod
    def _root_stays_inside(cls, root: Path) -> Path:
        """A relative data root may not climb out of the project with '..' (an absolute one
        is an explicit choice): stages delete and rewrite what is under it."""
        if not root.is_absolute() and ".." in root.parts:
            raise ValueError(f"relative path {str(root)!r} escapes the project directory; use a path inside it or an absolute path")
        return root


class ClientsConfig(_Section):
    """How samples are spread over clients and which LoRA rank each client affords."""

    num_clients: PositiveInt = 10
    ranks: list[PositiveInt] = Field(default_factory=lambda: [16, 16, 8, 8, 4, 4, 2, 2, 2, 2])
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: Annotated[float, Field(gt=0.0)] = 0.5
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2

    @model_validator(mode="after")
    def _ranks_per_client(self) -> "ClientsConfig":
        if len(self.ranks) not in (1, self.num_clients):
            raise ValueError(
                f"clients.ranks has {len(self.ranks)} entries; expected 1 or "
                f"clients.num_clients={self.num_clients}"
            )
        return self

    def client_ranks(self) -> list[int]:
        return self.ranks * self.num_clients if len(self.ranks) == 1 else list(self.ranks)


class MissingConfig(_Section):
    """Per-client modality dropout; a scalar applies to every client, a list gives one per client."""

    rate: Probability | list[Probability] = 0.4
    pattern: Pattern | list[Pattern] = "both"
    fill: Literal["absent", "placeholder"] = "absent"


class ModelConfig(_Section):
    """The foundation model: the embedded pretrained encoders, a tiny random one for tests, or a
    Hugging Face checkpoint (``name_or_path``: a hub id or a local directory; CLIP, ViLT, LLaVA).
    With ``name_or_path``, the default ``target_modules`` stands for the family's default
    (README, "Hugging Face models") and ``num_image_tokens`` is unused."""

    name: Literal["embedded", "tiny"] = "embedded"
    name_or_path: str | None = None
    # what the federation trains: LoRA only; LoRA and the classification head; or LoRA and every
    # trained module of the family (the embedded model's image projector and head)
    trainable: Literal["lora", "lora+head", "all"] = "all"
    num_image_tokens: PositiveInt = 2
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])

    @model_validator(mode="after")
    def _one_model(self) -> "ModelConfig":
        if self.name_or_path is not None and not self.name_or_path.strip():
            raise ValueError("name_or_path is empty; give a hub id or a local directory, or leave it out")
        if self.name_or_path and self.name != "embedded":
            raise ValueError(
                f"name={self.name!r} and name_or_path={self.name_or_path!r} both choose the model; "
                "with name_or_path leave name at its default ('embedded')"
            )
        return self


class LoraConfig(_Section):
    """LoRA scaling rule: ``per_rank`` keeps alpha/r equal across clients so factors average cleanly."""

    alpha_mode: Literal["per_rank", "fixed"] = "per_rank"
    scale: Annotated[float, Field(gt=0.0)] = 2.0  # per_rank: alpha = scale * r
    alpha: Annotated[float, Field(gt=0.0)] = 32.0  # fixed: the same alpha for every rank
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    def alpha_for(self, rank: int) -> float:
        return self.scale * rank if self.alpha_mode == "per_rank" else self.alpha


class AlignConfig(_Section):
    """The alignment stage (LLaVA's stage 1): before the federation, the family's trained modules
    (the embedded model's image projector and head) train centrally on the public slice
    (``data.public_fraction``) with the encoder frozen and no LoRA; the federation starts from
    them (and with ``model.trainable: lora`` keeps them frozen)."""

    enabled: bool = False
    epochs: PositiveInt = 20
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    batch_size: PositiveInt = 32


class FederationConfig(_Section):
    """Rounds, client sampling and the local optimiser (AdamW)."""

    rounds: PositiveInt = 8
    sample_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
    local_epochs: PositiveInt = 1
    # optimiser steps per client per round, whatever the client's size (batches cycle through
    # its data); null: local_epochs passes over it
    local_steps: PositiveInt | None = None
    batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0.0)] = 2e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    min_clients: PositiveInt = 1  # a round with fewer successful clients stops the run
    # the global adapter moves by server_lr x the aggregated update (every method alike; 1: plain averaging)
    server_lr: Annotated[float, Field(gt=0.0)] = 1.0


class FaultsConfig(_Section):
    """Fault injection for testing: each client training attempt fails with this probability
    (seeded by round, client and attempt, so a rerun fails the same way)."""

    client_failure_rate: Probability = 0.0


class AggregationConfig(_Section):
    """``method``: a name in ``fedilora.methods.REGISTRY``; ``options``: that method's own knobs
    (its ``Options``; docs/method.md). The method checks both (``fedilora.federation.check_methods``,
    before any run starts), so that this file, which every stage reads, knows no method."""

    method: str = "fedilora"
    options: dict[str, Any] = Field(default_factory=dict)


class EditingConfig(_Section):
    """FediLoRA's layer-wise model editing on the client (docs/method.md)."""

    enabled: bool = True
    factors: Literal["A", "B", "both"] = "A"
    num_layers: PositiveInt = 1
    min_similarity: Probability = 0.95
    mode: Literal["blend", "replace", "half"] = "blend"


class TrackingConfig(_Section):
    """MLflow: ``uri`` is a directory (an SQLite store and artifacts inside it) or any tracking URI."""

    uri: str = "mlruns"
    experiment: str = "fedilora"


class RunnerConfig(_Section):
    """How Prefect runs client tasks: threads in this process, or a Dask or Ray cluster (a local
    one with ``n_workers`` worker processes on 127.0.0.1, or an existing one at ``address``).
    Threads share one base model (and one GPU): clients train one at a time."""

    task_runner: Literal["threads", "dask", "ray", "sequential"] = "threads"
    max_workers: PositiveInt = 4
    retries: Annotated[int, Field(ge=0)] = 2
    address: str | None = None
    n_workers: PositiveInt = 2
    # dask/ray: GPUs each worker process owns (docs/gpu.md); 0 = CPU workers. Ray takes a
    # fraction (workers sharing a GPU); a local Dask cluster gives worker i its own whole GPUs.
    gpus_per_worker: Annotated[float, Field(ge=0.0)] = 0.0

    @model_validator(mode="after")
    def _address_fits_runner(self) -> "RunnerConfig":
        if self.task_runner == "dask" and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker}: a Dask worker owns whole GPUs (CUDA_VISIBLE_DEVICES); "
                "use an integer, or the ray runner for a fraction"
            )
        scheme = self.address.split("://")[0] if self.address and "://" in self.address else None
        if self.task_runner == "dask" and scheme == "ray":
            raise ValueError(f"address {self.address!r} is a Ray address; a Dask scheduler is tcp://host:8786")
        if self.task_runner == "ray" and scheme not in (None, "ray"):
            raise ValueError(f"address {self.address!r} is not a Ray address: ray://host:10001, host:6379 or auto")
        return self


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


class RuntimeConfig(_Section):
    """Where and in what precision a worker computes (docs/gpu.md). ``device: auto`` is the GPU
    when torch sees one, else the CPU. ``dtype`` is the frozen base's; LoRA factors, trained
    modules and their optimizer state are always float32. ``mixed_precision: auto`` autocasts
    to ``dtype`` when that is not float32. ``quantization`` loads the base's linear layers in
    4-bit (NF4, QLoRA) or 8-bit through bitsandbytes (the ``gpu`` extra; CUDA only)."""

    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mixed_precision: Literal["auto", "none", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    quantization: Literal["none", "4bit", "8bit"] = "none"
    # samples per evaluation batch; LLaVA's greedy generation keeps a KV cache per sample
    # (`fedilora plan` prints its size): lower it on a small GPU
    eval_batch_size: PositiveInt = 128

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, device):
            raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")
        return device

    @model_validator(mode="after")
    def _precision_fits(self) -> "RuntimeConfig":
        if self.mixed_precision == "none" and self.dtype != "float32":
            raise ValueError(
                f"mixed_precision=none with dtype={self.dtype}: the float32 LoRA factors and trained modules "
                f"meet the {self.dtype} base only under autocast; use mixed_precision auto or {self.dtype}"
            )
        return self

    def autocast_dtype(self) -> str | None:
        """The autocast dtype of training and evaluation, or None for none."""
        if self.mixed_precision == "auto":
            return None if self.dtype == "float32" else self.dtype
        return None if self.mixed_precision == "none" else self.mixed_precision


class CompareConfig(_Section):
    """``fedilora compare``: every variant (``method`` or ``method+edit``) under every seed, paired
    by seed (each seed draws its own splits, client schedule and initial adapter), each (variant,
    seed) a task on ``runner`` (default: a local Dask cluster, a process per core)."""

    variants: list[str] = Field(
        default_factory=lambda: ["fedilora+edit", "fedilora", "hetlora", "flexlora", "flora"]
    )
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [0, 1, 2])
    runner: RunnerConfig = RunnerConfig(task_runner="dask", n_workers=2)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


class Params(_Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    clients: ClientsConfig = ClientsConfig()
    missing: MissingConfig = MissingConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    align: AlignConfig = AlignConfig()
    federation: FederationConfig = FederationConfig()
    aggregation: AggregationConfig = AggregationConfig()
    editing: EditingConfig = EditingConfig()
    faults: FaultsConfig = FaultsConfig()
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    compare: CompareConfig = CompareConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        n = self.clients.num_clients
        for name in ("rate", "pattern"):
            value = getattr(self.missing, name)
            if isinstance(value, list) and len(value) != n:
                raise ValueError(
                    f"missing.{name} has {len(value)} entries; expected a single value or "
                    f"clients.num_clients={n}"
                )
        if self.align.enabled and self.data.public_fraction == 0:
            raise ValueError("align.enabled needs a public slice to train on: set data.public_fraction > 0")
        if self.runtime.quantization != "none" and not self.model.name_or_path:
            raise ValueError(
                f"runtime.quantization={self.runtime.quantization} applies to a Hugging Face model "
                "(model.name_or_path); the embedded and tiny models are not quantized"
            )
        for variant in self.compare.variants:
            if not re.fullmatch(r"[A-Za-z0-9_]+(\+edit)?(@official)?", variant):
                raise ValueError(f"compare.variants: {variant!r} is not METHOD, METHOD+edit or METHOD[+edit]@official")
        return self

    def client_missing(self) -> list[tuple[float, str]]:
        """(rate, pattern) for each client."""
        n = self.clients.num_clients
        rates = self.missing.rate if isinstance(self.missing.rate, list) else [self.missing.rate] * n
        pats = self.missing.pattern if isinstance(self.missing.pattern, list) else [self.missing.pattern] * n
        return list(zip(rates, pats))


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and field."""


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        lines.append(f"{source}: {loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and "input" in e and not isinstance(e["input"], dict) else ""))
    return "; ".join(lines)


def parse_params(data: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read and validate a params file; ``overrides`` maps dotted keys to values (``a.b=1``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(_apply(data, overrides), str(path))


def _apply(data: dict, overrides: dict | None) -> dict:
    """Dotted keys (``a.b``) set into a nested mapping, in place."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def with_overrides(params: Params, overrides: dict | None, source: str = "overrides") -> Params:
    """``params`` with dotted-key overrides, validated again."""
    if not overrides:
        return params
    return parse_params(_apply(params.model_dump(mode="json"), overrides), source)
