"""``fedilora plan``: what a run will need, from the configuration alone, before any weight is read.

The configured model is built on PyTorch's ``meta`` device (shapes, no storage), wrapped with
the same PEFT slots a run creates (one per distinct client rank) and put in the run's precision
(``fedilora.devices``' policy). From it:

* parameter counts: frozen base, trainable per client (LoRA factors + trained modules);
* bytes of the base in float32, 16-bit, 8-bit and 4-bit (bitsandbytes' formats: int8 with a
  float32 scale per output row; NF4 with double quantization, 4.127 bits per weight);
* adapter bytes per client (the CPU float32 state that travels) and bytes sent per round;
* peak training memory of one worker: the resident model (base, every rank slot, the copy of
  the adapted weights a run keeps to undo merges), plus one client's training: float32 gradients
  and AdamW state of its slot, and activations. Activations are counted by PyTorch's own
  ``MemTracker`` over one forward and backward pass on meta tensors, in the compute dtype, with
  gradient checkpointing when configured. The pass is the model's dense path for a full batch
  (every sample with both modalities, the longest sequence): data-dependent steps (masking absent
  modalities, placing image tokens) cannot run on meta and are replaced by their dense result.

Not counted: the CUDA context and the caching allocator's slack (allow ~1 GiB), and evaluation,
which runs without gradients (LLaVA's generation needs its KV cache: ``eval_kv_cache``).
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from fedilora import devices
from fedilora import metrics as task_metrics
from fedilora.config import Params
from fedilora.inputs import FeatureTable
from fedilora.models import adapters, encoders, hf
from fedilora.models.families import trained_modules
from fedilora.models.multimodal import TRAINED_MODULES, MultimodalClassifier
from fedilora.paths import DataPaths

# llava-hf/llava-1.5-7b-hf's config.json (its architecture; no weights needed): CLIP ViT-L/14
# at 336 px, a 2-layer GELU projector, Vicuna-7B (Llama, 32 layers, 4096 wide).
LLAVA_15_7B = "llava-hf/llava-1.5-7b-hf"
LLAVA_15_7B_CONFIG = {
    "model_type": "llava",
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
    "text_config": {
        "model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 0,
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000,
    },
}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, float32 per 256 absmax
PROMPT_TOKENS = 16  # LLaVA without a prepared table: the chat template and question around the text
ANSWER_TOKENS = 8  # ... and the class name answered


@dataclass(frozen=True)
class Shapes:
    """One training batch of the dense path: ``text`` tokens per sample (LLaVA: the whole
    sequence, image tokens included) and ``image`` (features (F,) or pixels (3, H, W))."""

    batch: int
    text: int
    image: tuple[int, ...]
    num_classes: int


@dataclass
class Plan:
    model: str
    family: str
    runtime: dict
    ranks: list[int]
    shapes: dict
    frozen_params: int
    trainable_params: dict[int, int]  # per distinct rank: LoRA factors + trained modules
    base_bytes: dict[str, int]  # the frozen base in float32, 16bit, 8bit and 4bit
    adapter_bytes: dict[int, int]  # per distinct rank: the float32 state a client sends
    sent_bytes: dict[int, dict[str, int]]  # per distinct rank: down and up per round
    memory: dict[str, int] = field(default_factory=dict)  # peak training memory of one worker, by part
    eval_kv_cache: int = 0  # LLaVA: the generation cache of one evaluation batch

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# ---- the model on meta ---------------------------------------------------------------------------


def model_config(params: Params):
    """The Hugging Face config of ``model.name_or_path`` (a local directory or the HF cache);
    llava-1.5-7b's architecture is known here, so its plan needs nothing on disk."""
    from transformers import LlavaConfig


    name = str(params.model.name_or_path)
    try:
        return hf.load_config(name)
    except ValueError:
        if name.rstrip("/").endswith(LLAVA_15_7B.split("/")[1]):
            cfg = {k: v for k, v in LLAVA_15_7B_CONFIG.items() if k != "model_type"}
            return LlavaConfig(**cfg)
        raise


class _Tokenizer:
    """What the wrappers read of a tokenizer when nothing is tokenized (plans)."""

    cls_token_id = pad_token_id = eos_token_id = 0


def describe(params: Params):
    """(family, Hugging Face config or None for the embedded family)."""

    if not params.model.name_or_path:
        return "embedded", None
    config = model_config(params)
    return hf.family_of(config), config


def empty_model(params: Params, family: str, config, num_classes: int) -> nn.Module:
    """The PEFT-wrapped model on meta with a slot per distinct client rank, in
    ``runtime.dtype`` with float32 trained parts (``fedilora.devices``' policy)."""

    ranks = params.clients.client_ranks()
    r_max = max(ranks)
    with torch.device("meta"):
        if family == "embedded":
            from transformers import BertModel

            text = BertModel(encoders.text_config(params.model.name))
            wrapper = MultimodalClassifier(text, encoders.IMAGE_DIMS[params.model.name], num_classes, params.model.num_image_tokens)
            lora = {"target_modules": params.model.target_modules, "modules_to_save": list(TRAINED_MODULES)}
        else:
            base = hf.model_class(family)._from_config(config)
            wrapper = hf.wrap(family, base, num_classes, params.seed, _Tokenizer())
            spec = hf.lora_spec(params.model, family)
            lora = {"target_modules": spec.target_modules, "modules_to_save": spec.modules_to_save,
                    "exclude_modules": spec.exclude_modules}
        lora["modules_to_save"] = trained_modules(params.model, lora["modules_to_save"])
        model = adapters.wrap_with_lora(wrapper, r_max, params.lora.alpha_for(r_max), dropout=params.lora.dropout, **lora)
        for rank in sorted(set(ranks)):
            adapters.ensure_slot(model, rank, params.lora.alpha_for(rank), params.lora.dropout)
    devices.cast_frozen(model, devices.DTYPES[params.runtime.dtype])
    devices.keep_trained_float32(model)
    return model


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def in_slot(name: str) -> bool:
    """A parameter of an adapter slot (LoRA factors, trained-module copies), not of the base."""
    return "lora_" in name or ".modules_to_save." in name


def format_bytes(numel: int, rows: int, fmt: str) -> int:
    """Bytes of a linear weight of ``numel`` elements and ``rows`` output rows in ``fmt``."""
    if fmt == "4bit":
        return math.ceil(numel * NF4_BITS / 8)
    if fmt == "8bit":
        return numel + 4 * rows
    return numel * (4 if fmt == "float32" else 2)


def base_bytes(model: nn.Module, family: str, dtype: torch.dtype) -> dict[str, int]:
    """The frozen base in each format. Quantized formats (Hugging Face families only) quantize
    the linear layers that transformers would (all but ``hf.quantization_skips``) and keep the
    rest in ``dtype``; trained modules' originals stay float32 in every format."""

    formats = ("float32", "16bit") if family == "embedded" else ("float32", "16bit", "8bit", "4bit")
    skips = set(hf.quantization_skips(family) or ["lm_head"]) if family != "embedded" else set()
    linear = {f"{name}.weight" for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not skips & set(name.split("."))}
    out = {}
    for fmt in formats:
        rest = {"float32": 4, "16bit": 2}.get(fmt, dtype.itemsize)
        total = 0
        for name, p in model.named_parameters():
            if in_slot(name):
                continue
            if ".original_module." in name:
                total += 4 * p.numel()
            elif name in linear and fmt in ("8bit", "4bit"):
                total += format_bytes(p.numel(), p.shape[0], fmt)
            else:
                total += rest * p.numel()
        out[fmt] = total
    return out


def chosen_format(params: Params) -> str:
    q = params.runtime.quantization
    return q if q != "none" else ("float32" if params.runtime.dtype == "float32" else "16bit")


# ---- activations on meta ---------------------------------------------------------------------------


def _dense_loss(model: nn.Module, family: str, shapes: Shapes, dtype: torch.dtype) -> torch.Tensor:
    """The training loss of a full batch along the family's dense path (module doc), on meta."""
    wrapper = model.get_base_model()
    b, s = shapes.batch, shapes.text
    meta = torch.device("meta")
    ids = torch.zeros(b, s, dtype=torch.long, device=meta)
    labels = torch.zeros(b, dtype=torch.long, device=meta)
    if family == "embedded":
        n, hidden = wrapper.num_image_tokens, wrapper.text_model.config.hidden_size
        feats = torch.zeros(b, *shapes.image, device=meta).to(dtype)  # float32 in the table, cast as autocast does
        image = wrapper.image_projector(feats).view(b, n, hidden)
        text = wrapper.text_model.embeddings.word_embeddings(ids)
        out = wrapper.text_model(inputs_embeds=torch.cat([image.to(text.dtype), text], 1)).last_hidden_state
        logits = wrapper.classifier(torch.cat([out[:, :n].mean(1), out[:, n:].mean(1)], -1).float())
        return F.cross_entropy(logits, labels)
    pixels = torch.zeros(b, *shapes.image, device=meta).to(dtype)
    if family == "clip":
        image = wrapper.clip.get_image_features(pixel_values=pixels).pooler_output
        text = wrapper.clip.get_text_features(input_ids=ids).pooler_output
        logits = wrapper.classifier(torch.cat([F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)], -1))
        return F.cross_entropy(logits, labels)
    if family == "vilt":
        vilt, emb = wrapper.vilt, wrapper.vilt.embeddings
        # the wrapper's own inputs to ViLT: pixels with absent images zeroed, an all-ones pixel mask
        pixels = torch.where(torch.ones(b, 1, 1, 1, dtype=torch.bool, device=meta), pixels, torch.zeros_like(pixels))
        pixel_mask = torch.ones(b, *pixels.shape[2:], dtype=torch.long, device=meta)  # noqa: F841 (alive for the pass, as the wrapper's)
        text = emb.text_embeddings(input_ids=ids) + emb.token_type_embeddings(torch.zeros_like(ids))
        patches = emb.patch_embeddings(pixels).flatten(2).transpose(1, 2)
        image = torch.cat([emb.cls_token.expand(b, -1, -1), patches], 1)  # + position embeddings, as ViLT adds
        image = image + emb.position_embeddings[:, : image.shape[1]] + emb.token_type_embeddings(torch.ones_like(ids[:, :1]))
        out = vilt.layernorm(vilt.encoder(torch.cat([text, image], 1)).last_hidden_state)
        logits = wrapper.classifier(vilt.pooler(out).float())
        return F.cross_entropy(logits, labels)
    llava = wrapper.llava
    config = llava.config
    image = llava.model.get_image_features(
        pixel_values=pixels,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    ).pooler_output
    image = torch.stack(list(image)) if isinstance(image, (list, tuple)) else image
    text = llava.get_input_embeddings()(ids[:, : s - image.shape[1]])
    embeds = torch.cat([image.to(text.dtype), text], 1)
    causal = torch.ones(b, 1, s, s, dtype=torch.bool, device=meta).tril()  # a 2D mask would be inspected
    labels = torch.zeros(b, s, dtype=torch.long, device=meta)
    return llava(inputs_embeds=embeds, attention_mask=causal, labels=labels, use_cache=False).loss


class LiveBytes(TorchDispatchMode):
    """The peak of bytes held at once by tensor storages created inside the context (every
    op's new outputs, freed when their last reference goes). Works on meta tensors, which
    have sizes but no memory; what existed before (parameters) is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # held during the op, so their ids cannot be reused by a new storage
        inputs = {id(st): st for st in (t.untyped_storage() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._sizes:  # a view or an in-place result
                continue
            self._sizes[storage] = nbytes = storage.nbytes()
            self.live += nbytes
            weakref.finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def activation_bytes(model: nn.Module, family: str, shapes: Shapes, params: Params) -> int:
    """Peak bytes of activations and backward temporaries of one training step (module doc)."""
    runtime = params.runtime
    compute = devices.DTYPES[runtime.autocast_dtype() or runtime.dtype]
    slot = adapters.slot_name(max(params.clients.client_ranks()), params.lora.alpha_for(max(params.clients.client_ranks())))
    adapters.activate(model, slot)
    model.to(compute)  # no autocast on meta: every op in the compute dtype stands in for it
    if runtime.gradient_checkpointing:
        devices.enable_gradient_checkpointing(model)
    model.train()
    with LiveBytes() as tracker:
        _dense_loss(model, family, shapes, compute).backward()
    return tracker.peak


# ---- shapes --------------------------------------------------------------------------------------------


def default_shapes(params: Params, family: str, config, num_classes: int | None = None) -> Shapes:
    """From the prepared feature table when there is one (its longest sequence, its class
    count), else from the configuration (``data.max_text_length``, 10 classes)."""
    features = DataPaths.of(params).features
    batch = params.federation.batch_size
    if features.is_file():
        table = FeatureTable.load(features)
        text = int(table.text_mask.sum(1).max())
        if family == "llava":
            text += int(table.extra["answer_mask"].sum(1).max())
        return Shapes(batch, text, tuple(table.image_features.shape[1:]), num_classes or task_metrics.num_classes(table.labels))
    num_classes = num_classes or 10
    if family == "embedded":
        return Shapes(batch, params.data.max_text_length, (encoders.IMAGE_DIMS[params.model.name],), num_classes)
    vision = getattr(config, "vision_config", config)
    image = (3, vision.image_size, vision.image_size)
    if family == "llava":
        text = hf.num_image_tokens(config) + PROMPT_TOKENS + params.data.max_text_length + ANSWER_TOKENS
        return Shapes(batch, text, image, num_classes)
    return Shapes(batch, params.data.max_text_length, image, num_classes)


# ---- the plan ----------------------------------------------------------------------------------------------


def sent_bytes(params: Params, adapter: dict[int, int], lora_per_rank: dict[int, int], targets_bytes: int) -> dict[int, dict[str, int]]:
    """Per client rank: bytes received (down) and sent (up) in one round. FLoRA's clients get
    the stacked global factors (the sampled clients' ranks, expected) and, as the runner sends
    them, the merged base weights of the adapted layers."""
    out = {}
    ranks = params.clients.client_ranks()
    for rank, up in adapter.items():
        down = up
        if params.aggregation.method == "flora":
            m = max(1, round(params.federation.sample_fraction * len(ranks)))
            stacked = m * sum(ranks) / len(ranks)
            trained = up - lora_per_rank[rank]
            down = int(trained + lora_per_rank[rank] * stacked / rank + targets_bytes)
        out[rank] = {"down": int(down), "up": int(up)}
    return out


def make_plan(params: Params, *, shapes: Shapes | None = None, num_classes: int | None = None) -> Plan:
    """The plan of ``params`` (module doc); ``shapes`` overrides the batch read from the data."""
    from peft import get_peft_model_state_dict

    family, config = describe(params)
    shapes = shapes or default_shapes(params, family, config, num_classes)
    model = empty_model(params, family, config, shapes.num_classes)
    ranks = sorted(set(params.clients.client_ranks()))
    states = {r: get_peft_model_state_dict(model, adapter_name=adapters.slot_name(r, params.lora.alpha_for(r))) for r in ranks}
    trainable = {r: sum(t.numel() for t in s.values()) for r, s in states.items()}
    adapter = {r: 4 * n for r, n in trainable.items()}
    lora_bytes = {r: 4 * sum(t.numel() for k, t in s.items() if "lora_" in k) for r, s in states.items()}
    formats = base_bytes(model, family, devices.DTYPES[params.runtime.dtype])
    chosen = chosen_format(params)
    targets = adapters.target_base_weights(model).values()
    foundation = sum(format_bytes(w.numel(), w.shape[0], chosen) for w in targets)
    r_max = max(ranks)
    memory = {
        "base": formats[chosen],
        "rank_slots": _nbytes(p for n, p in model.named_parameters() if in_slot(n)),
        "foundation_copy": foundation,
        "gradients": adapter[r_max],
        "optimizer_state": 2 * adapter[r_max],
        "activations": activation_bytes(model, family, shapes, params),
    }
    memory["total"] = sum(memory.values())
    return Plan(
        model=str(params.model.name_or_path or params.model.name),
        family=family,
        runtime=params.runtime.model_dump(),
        ranks=params.clients.client_ranks(),
        shapes=asdict(shapes),
        frozen_params=sum(p.numel() for n, p in model.named_parameters() if not in_slot(n)),
        trainable_params=trainable,
        base_bytes=formats,
        adapter_bytes=adapter,
        sent_bytes=sent_bytes(params, adapter, lora_bytes, foundation),
        memory=memory,
        eval_kv_cache=_kv_cache(model, family, shapes, params),
    )


def _kv_cache(model: nn.Module, family: str, shapes: Shapes, params: Params) -> int:
    """LLaVA's generation cache for one evaluation batch (``runtime.eval_batch_size``): keys
    and values of every layer for the prompt and the answer, in the compute dtype."""
    if family != "llava":
        return 0
    text = model.get_base_model().llava.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = devices.DTYPES[params.runtime.autocast_dtype() or params.runtime.dtype].itemsize
    return int(2 * text.num_hidden_layers * params.runtime.eval_batch_size * shapes.text * heads * head_dim * element)


# ---- printing ------------------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_plan(plan: Plan) -> str:
    rt = plan.runtime
    chosen = rt["quantization"] if rt["quantization"] != "none" else rt["dtype"]
    lines = [
        f"model: {plan.model} ({plan.family}); base in {chosen}, autocast {rt['mixed_precision']}, "
        f"gradient checkpointing {'on' if rt['gradient_checkpointing'] else 'off'}",
        f"batch: {plan.shapes['batch']} samples x {plan.shapes['text']} tokens, image {tuple(plan.shapes['image'])}",
        f"frozen parameters: {plan.frozen_params:,}",
        "base weights: " + ", ".join(f"{k} {human(v)}" for k, v in plan.base_bytes.items()),
        "per client rank:  trainable params   adapter (float32)   sent per round (down + up)",
    ]
    for rank in sorted(plan.trainable_params):
        sent = plan.sent_bytes[rank]
        lines.append(f"  r={rank:<4}          {plan.trainable_params[rank]:>14,}   {human(plan.adapter_bytes[rank]):>17}   "
                     f"{human(sent['down'])} + {human(sent['up'])}")
    lines.append("peak training memory per worker (estimate): " + human(plan.memory["total"]))
    for part, value in plan.memory.items():
        if part != "total":
            lines.append(f"  {part:<16} {human(value):>12}")
    if plan.eval_kv_cache:
        lines.append(f"evaluation: generation KV cache of a {rt['eval_batch_size']}-sample batch (runtime.eval_batch_size) "
                     f"{human(plan.eval_kv_cache)}")
    lines.append("not included: the CUDA context and allocator slack (allow ~1 GiB)")
    return "\n".join(lines)


def write(plan: Plan, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.to_json() + "\n")
