"""The alignment stage (LLaVA's stage 1): before the federation, the model family's trained modules
(the embedded model's image projector and classification head) train centrally on the public
slice of the data (``data.public_fraction``, no client holds it), with the encoder frozen and no
LoRA. The federation then starts from them; with ``model.trainable: lora`` they stay frozen and
only LoRA trains, as in the paper's setting (docs/testbed.md says why).

One file of aligned modules serves every run seed: the public slice and the modules' initial
values are drawn with ``data.public_seed``, like a foundation model every run shares.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedilora import metrics as task_metrics
from fedilora.atomic import atomic_path
from fedilora.config import Params
from fedilora.data.splits import PUBLIC, for_seed, load_splits
from fedilora.inputs import FeatureTable
from fedilora.lora import State
from fedilora.models.families import family_of
from fedilora.models.shared import ModelSpec, base_model
from fedilora.paths import DataPaths
from fedilora.prepared import check_prepared
from fedilora.seeds import derive_seed
from fedilora.training import subset, train_local


def inputs(params: Params) -> dict[str, str]:
    """What the aligned modules depend on (kept in their file's metadata): a run whose params
    differ here needs another alignment."""
    fields = {"data": params.data.model_dump(mode="json", include={"source", "format", "text_field", "image_size",
                                                                   "max_text_length", "public_fraction", "public_seed"}),
              "model": params.model.model_dump(mode="json", exclude={"trainable"}),
              "align": params.align.model_dump(mode="json")}
    return {k: json.dumps(v, sort_keys=True) for k, v in fields.items()}


def align(params: Params, table: FeatureTable, splits: pd.DataFrame) -> State:
    """The family's trained modules after ``align.epochs`` on ``splits``' public rows (CPU
    float32 tensors keyed as in the unwrapped base model), from the model as seeded by
    ``data.public_seed``: every run seed shares them."""
    public = splits[splits["client"] == PUBLIC]
    if public.empty:
        raise ValueError("the splits hold no public slice to align on; set data.public_fraction > 0 and rerun `fedilora split`")
    every = params.model_copy(update={"seed": params.data.public_seed,
                                      "model": params.model.model_copy(update={"trainable": "all"})})
    base, lora_kwargs = base_model(ModelSpec.of(every, table.image_features.shape[1], task_metrics.num_classes(table.labels)))
    trained = set(lora_kwargs["modules_to_save"])
    for name, param in base.named_parameters():
        param.requires_grad_(bool(trained & set(name.split("."))))
    base = base.to(torch.device("cpu")).train()
    train_local(base, table, subset(public), epochs=params.align.epochs, batch_size=params.align.batch_size,
                lr=params.align.lr, make_batch=family_of(params.model).make_batch,  # public rows have both modalities
                generator=torch.Generator().manual_seed(derive_seed(params.data.public_seed, 0, 0, 2)))
    return {name: t.detach().to("cpu", torch.float32).clone() for name, t in base.state_dict().items()
            if trained & set(name.split("."))}


def run_stage(params: Params) -> bool:
    """The ``align`` stage: ``data/aligned.safetensors`` (empty when ``align.enabled`` is off);
    whether it aligned."""
    paths = DataPaths.of(params)
    check_prepared(paths)
    state = {}
    if params.align.enabled:
        splits = load_splits(paths.splits)
        state = align(params, FeatureTable.load(paths.features), for_seed(splits, params.seed, paths.splits))
    with atomic_path(paths.aligned) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=inputs(params))
    return params.align.enabled


def checked(params: Params) -> Path:
    """The alignment stage's file, if it was made for these params (else an error naming it)."""
    path = DataPaths.of(params).aligned
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `fedilora align` (align.enabled is on)")
    with safe_open(str(path), "pt") as fh:
        made, tensors = fh.metadata() or {}, list(fh.keys())
    if made != inputs(params) or not tensors:
        changed = sorted(k for k in inputs(params) if made.get(k) != inputs(params)[k]) or ["align.enabled"]
        raise ValueError(f"{path}: aligned for other {', '.join(changed)} settings than these params; rerun `fedilora align`")
    return path
