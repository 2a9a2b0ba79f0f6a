"""Which model family a run uses, and what each family owns: building its base model (and where
its LoRA goes), encoding a dataset into a ``FeatureTable``, and building a batch from table rows.

* ``embedded``: MiniLM text transformer + cached EfficientNet-Lite0 image features
  (``fedilora.models.encoders``, ``fedilora.models.multimodal``); ``model.name: tiny`` is the same
  family with random small encoders, for tests.
* ``clip``, ``vilt``, ``llava``: a Hugging Face checkpoint at ``model.name_or_path``
  (``fedilora.models.hf``), the family read from its ``config.model_type``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedilora.config import DataConfig, ModelConfig, RuntimeConfig
from fedilora.inputs import BatchFn, FeatureTable, feature_batch
from fedilora.models import encoders, hf
from fedilora.models.multimodal import TRAINED_MODULES, MultimodalClassifier

# build(model, num_classes, seed, image_dim, runtime) -> (unwrapped base model, wrap_with_lora keyword arguments)
Builder = Callable[[ModelConfig, int, int, int, RuntimeConfig], tuple[nn.Module, dict]]
# encode(texts, images, labels, class_names, model, data) -> FeatureTable
Encoder = Callable[[list[str], list, torch.Tensor, list[str], ModelConfig, DataConfig], FeatureTable]


@dataclass(frozen=True)
class Family:
    name: str
    build: Builder
    encode: Encoder
    make_batch: BatchFn
    head: str | None  # the classification head among the trained modules (model.trainable: lora+head)


def _build_embedded(model: ModelConfig, num_classes: int, seed: int, image_dim: int,
                    runtime: RuntimeConfig) -> tuple[nn.Module, dict]:
    text_model = encoders.load_text_model(model.name, seed)
    torch.manual_seed(seed)  # the projector and head start the same in every process
    base = MultimodalClassifier(text_model, image_dim, num_classes, model.num_image_tokens)
    return base, {"target_modules": model.target_modules, "modules_to_save": list(TRAINED_MODULES)}


def _encode_embedded(texts, images, labels, class_names, model: ModelConfig, data: DataConfig) -> FeatureTable:
    return encoders.encode(texts, images, labels, encoders.load_tokenizer(),
                           encoders.load_image_encoder(model.name, data.image_size), data.max_text_length)


def _build_hf(model: ModelConfig, num_classes: int, seed: int, image_dim: int,
              runtime: RuntimeConfig) -> tuple[nn.Module, dict]:
    base, spec = hf.build(model, num_classes, seed, runtime)
    return base, {"target_modules": spec.target_modules, "modules_to_save": spec.modules_to_save,
                  "exclude_modules": spec.exclude_modules}


def _encode_hf(texts, images, labels, class_names, model: ModelConfig, data: DataConfig) -> FeatureTable:
    return hf.encode(texts, images, labels, class_names, model, data.max_text_length)


EMBEDDED = Family("embedded", _build_embedded, _encode_embedded, feature_batch, head="classifier")


@functools.lru_cache(maxsize=None)
def _hf_family(name_or_path: str) -> Family:
    name = hf.family_of(hf.load_config(name_or_path))
    return Family(name, _build_hf, _encode_hf, hf.prompt_batch if name == "llava" else feature_batch,
                  head=None if name == "llava" else "classifier")


def family_of(model: ModelConfig) -> Family:
    return _hf_family(str(model.name_or_path)) if model.name_or_path else EMBEDDED


def trained_modules(model: ModelConfig, family_modules: list[str]) -> list[str]:
    """The family's trained modules the federation trains (``model.trainable``): all of them, the
    head only, or none (LoRA only; the modules stay as built or aligned, frozen)."""
    if model.trainable == "all":
        return list(family_modules)
    head = family_of(model).head
    return [head] if model.trainable == "lora+head" and head in family_modules else []
