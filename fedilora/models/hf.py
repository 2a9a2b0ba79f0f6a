"""Hugging Face model families behind ``model.name_or_path``: CLIP, ViLT and LLaVA.

The family comes from the checkpoint's ``config.model_type``. Each family is wrapped so that the
rest of the project (PEFT adapter slots, aggregation, the training loop) sees the same shape of
model as with the embedded one:

* ``clip`` (dual encoder): a classifier on the concatenated, L2-normalised image and text
  embeddings; an absent modality's embedding is zero (its tower is not even run for that sample).
* ``vilt`` (single stream): the pooled output (text [CLS]) into a classifier. An absent text is
  masked out of attention; an absent image is masked out of attention too, by zeroing the image
  part of the mask ViLT's embedding layer returns (a forward hook). ViLT cannot take an all-zero
  ``pixel_mask`` (its patch sampling and position interpolation fail on an empty image), so its
  pixels are zeros and its ``pixel_mask`` ones, and the hook removes those tokens from attention.
* ``llava`` (generative): an instruction prompt and the class name as the answer. Training is the
  LM loss on the answer tokens only; evaluation is greedy generation, a decoded answer that matches
  a class name (``match_answer``) is that class, anything else is wrong. An absent image means no
  image token and no pixels for that sample; an absent text, the prompt without the text.

Inputs come from the checkpoint's own tokenizer and image processor (``encode``): token ids,
masks and pixel values (N, 3, H, W) are cached in the ``FeatureTable`` by ``prepare``.
Weights are read with ``local_files_only`` when ``name_or_path`` is a directory or the machine is
offline (``HF_HUB_OFFLINE=1``, the project's default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fedilora import devices
from fedilora.config import RuntimeConfig
from fedilora.inputs import PLACEHOLDER_TEXT, FeatureTable

FAMILIES = ("clip", "vilt", "llava")
EMBEDDED_TARGETS = ["query", "value"]  # ModelConfig's default: the embedded BERT's layer names
DEFAULT_TARGETS = {"clip": ["q_proj", "v_proj"], "vilt": ["query", "value"], "llava": ["q_proj", "v_proj"]}
# LLaVA: LoRA on the language model only (the CLIP vision tower has q_proj/v_proj too)
EXCLUDE = {"llava": r".*\.(vision_tower|multi_modal_projector)\..*"}
TRAINED = {"clip": ["classifier"], "vilt": ["classifier"], "llava": ["multi_modal_projector"]}
PROMPT_QUESTION = "Which category? Answer:"
PROMPT_VARIANTS = ("no_image", "no_text")  # besides the full prompt, which is table.input_ids


@dataclass(frozen=True)
class LoraSpec:
    target_modules: list[str]
    exclude_modules: str | None
    modules_to_save: list[str]


def local_only(name_or_path: str) -> bool:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
    return offline or Path(name_or_path).is_dir()


def _load(loader, name_or_path: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(name_or_path, local_files_only=local_only(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        hint = "" if Path(name_or_path).is_dir() else (
            "; offline (HF_HUB_OFFLINE=1) it must be a local directory or already in the Hugging Face cache"
        )
        raise ValueError(f"model.name_or_path: cannot load the {what} of {name_or_path!r}{hint} ({err})") from None


def load_config(name_or_path: str):
    from transformers import AutoConfig

    return _load(AutoConfig, name_or_path, "config")


def family_of(config) -> str:
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"model.name_or_path: model_type {family!r} is not supported; expected one of {list(FAMILIES)}")
    return family


def lora_spec(model_cfg, family: str) -> LoraSpec:
    """LoRA targets: ``model.target_modules``, where its default (the embedded model's names)
    stands for the family's default."""
    targets = list(model_cfg.target_modules)
    if targets == EMBEDDED_TARGETS:
        targets = list(DEFAULT_TARGETS[family])
    return LoraSpec(targets, EXCLUDE.get(family), list(TRAINED[family]))


class Processor:
    """The checkpoint's tokenizer and image processor (``AutoProcessor``, or the two Auto
    classes when the checkpoint has no processor config)."""

    def __init__(self, name_or_path: str):
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        try:
            proc = AutoProcessor.from_pretrained(name_or_path, local_files_only=local_only(name_or_path))
        except (OSError, ValueError, TypeError):
            proc = None
        if proc is not None and hasattr(proc, "tokenizer") and hasattr(proc, "image_processor"):
            self.tokenizer, self.image_processor = proc.tokenizer, proc.image_processor
            self.chat_template = getattr(proc, "chat_template", None)
            self._proc = proc
        else:
            self.tokenizer = _load(AutoTokenizer, name_or_path, "tokenizer")
            self.image_processor = _load(AutoImageProcessor, name_or_path, "image processor")
            self.chat_template, self._proc = None, None

    def apply_chat_template(self, conversation: list[dict]) -> str:
        return self._proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def pixels(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        out = [
            self.image_processor(images[s : s + batch_size], return_tensors="pt")["pixel_values"].float()
            for s in range(0, len(images), batch_size)
        ]
        return torch.cat(out)


# ---- models ------------------------------------------------------------------------------------


class ClipClassifier(nn.Module):
    """Head on [image embedding, text embedding]; an absent one is zeros, its tower not run."""

    def __init__(self, clip, num_classes: int):
        super().__init__()
        self.clip = clip
        self.dim = clip.config.projection_dim
        self.classifier = nn.Linear(2 * self.dim, num_classes)

    def forward(self, input_ids, text_mask, image_features, has_image, has_text):
        batch = input_ids.shape[0]
        image = torch.zeros(batch, self.dim, device=image_features.device)
        text = torch.zeros(batch, self.dim, device=image_features.device)
        rows = has_image.nonzero().flatten()
        if len(rows):
            emb = self.clip.get_image_features(pixel_values=image_features[rows]).pooler_output
            image = image.index_copy(0, rows, F.normalize(emb.float(), dim=-1))
        rows = (has_text & text_mask.any(1)).nonzero().flatten() if input_ids.shape[1] else rows[:0]
        if len(rows):
            emb = self.clip.get_text_features(input_ids=input_ids[rows], attention_mask=text_mask[rows].long()).pooler_output
            text = text.index_copy(0, rows, F.normalize(emb.float(), dim=-1))
        return self.classifier(torch.cat([image, text], dim=-1))


class ViltClassifier(nn.Module):
    """Pooled output (the text [CLS] position) into a head; absent modalities masked (module doc)."""

    def __init__(self, vilt, num_classes: int, cls_token_id: int):
        super().__init__()
        self.vilt = vilt
        self.cls_token_id = int(cls_token_id)
        self.classifier = nn.Linear(vilt.config.hidden_size, num_classes)
        self._image_absent: tuple[torch.Tensor, int] | None = None
        vilt.embeddings.register_forward_hook(self._mask_absent_images)

    def _mask_absent_images(self, module, args, output):
        if self._image_absent is None:
            return output
        embeddings, masks = output
        absent, text_len = self._image_absent
        keep = torch.ones_like(masks)
        keep[:, text_len:] = (~absent).to(masks.dtype)[:, None]
        return embeddings, masks * keep

    def forward(self, input_ids, text_mask, image_features, has_image, has_text):
        batch = input_ids.shape[0]
        mask = text_mask.bool() & has_text[:, None]
        if input_ids.shape[1] == 0:  # no text in the batch: keep the [CLS] slot the pooler reads, masked
            input_ids = torch.full((batch, 1), self.cls_token_id, dtype=torch.long, device=input_ids.device)
            mask = torch.zeros(batch, 1, dtype=torch.bool, device=input_ids.device)
        # an absent text is [CLS] only: position 0 is still the pooler's query, so no token of it may remain
        input_ids = torch.where(has_text[:, None], input_ids, torch.full_like(input_ids, self.cls_token_id))
        pixels = torch.where(has_image.view(-1, 1, 1, 1), image_features, torch.zeros_like(image_features))
        pixel_mask = torch.ones(batch, *pixels.shape[2:], dtype=torch.long, device=pixels.device)
        self._image_absent = (~has_image, input_ids.shape[1])
        try:
            out = self.vilt(input_ids=input_ids, attention_mask=mask.long(), pixel_values=pixels, pixel_mask=pixel_mask)
        finally:
            self._image_absent = None
        return self.classifier(out.pooler_output.float())


def match_answer(generated: str, class_names: list[str]) -> int:
    """The class whose name the generated answer is (first line, whitespace and case ignored); -1 if none."""
    lines = generated.strip().splitlines()
    answer = lines[0].strip().casefold() if lines else ""
    for index, name in enumerate(class_names):
        if answer == name.strip().casefold():
            return index
    return -1


class LlavaClassifier(nn.Module):
    """Generative: ``forward`` returns the LM loss on the answer tokens in training mode and, in
    eval mode, greedy generation as one-hot scores (B, C + 1), the last column meaning "no class
    name matched" (always wrong), so the usual argmax metrics apply."""

    def __init__(self, llava, tokenizer):
        super().__init__()
        self.llava = llava
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def forward(self, input_ids, attention_mask, lm_labels, prompt_ids, prompt_mask, answer_ids, answer_mask, pixel_values=None):
        if self.training:
            return self.llava(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=lm_labels).loss
        return self.answer_scores(prompt_ids, prompt_mask, answer_ids, answer_mask, pixel_values)

    def class_names(self, answer_ids, answer_mask) -> list[str]:
        return [self.tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in zip(answer_ids, answer_mask.bool())]

    @torch.no_grad()
    def answer_scores(self, prompt_ids, prompt_mask, answer_ids, answer_mask, pixel_values=None) -> torch.Tensor:
        images = {} if pixel_values is None else {"pixel_values": pixel_values}  # None trips generate
        out = self.llava.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask.long(),
            **images,
            max_new_tokens=int(answer_mask.sum(1).max()),
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        texts = self.tokenizer.batch_decode(out[:, prompt_ids.shape[1] :], skip_special_tokens=True)
        names = self.class_names(answer_ids, answer_mask)
        scores = torch.zeros(len(texts), len(names) + 1)
        for row, text in enumerate(texts):
            index = match_answer(text, names)
            scores[row, index if index >= 0 else len(names)] = 1.0
        return scores


MODEL_CLASSES = {"clip": "CLIPModel", "vilt": "ViltModel", "llava": "LlavaForConditionalGeneration"}


def model_class(family: str):
    import transformers

    return getattr(transformers, MODEL_CLASSES[family])


def quantization_skips(family: str) -> list[str] | None:
    """Modules a 4/8-bit base keeps in ``runtime.dtype``: LLaVA's trained projector and its LM
    head (transformers skips only the head by default); CLIP's and ViLT's heads are ours, built
    after loading, so transformers' default applies."""
    return [*TRAINED[family], "lm_head"] if family == "llava" else None


def wrap(family: str, base: nn.Module, num_classes: int, seed: int, tokenizer) -> nn.Module:
    """The family's wrapper around a loaded (or empty, for ``fedilora.plan``) base model."""
    torch.manual_seed(seed)  # the head starts the same in every process
    if family == "clip":
        return ClipClassifier(base, num_classes)
    if family == "vilt":
        return ViltClassifier(base, num_classes, tokenizer.cls_token_id)
    return LlavaClassifier(base, tokenizer)


def build(model_cfg, num_classes: int, seed: int = 0, runtime=None) -> tuple[nn.Module, LoraSpec]:
    """The wrapped base model of ``model.name_or_path`` and where its LoRA goes. The base is
    read in ``runtime.dtype``, or quantized while it is read (``runtime.quantization``, straight
    onto the CUDA device); ``fedilora.devices.place`` does the rest once LoRA is on."""
    runtime = runtime or RuntimeConfig()
    name = str(model_cfg.name_or_path)
    family = family_of(load_config(name))
    kwargs: dict = {"dtype": devices.DTYPES[runtime.dtype]}
    quantization = devices.quantization_config(runtime, quantization_skips(family))
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": devices.check(runtime)})
    base = _load(model_class(family), name, "model", **kwargs)
    for module_name, module in base.named_modules():  # trained modules (LLaVA's projector) in float32
        if module_name.split(".")[-1] in TRAINED[family]:  # before PEFT copies them into adapter slots
            module.float()
    tokenizer = Processor(name).tokenizer if family != "clip" else None
    return wrap(family, base, num_classes, seed, tokenizer), lora_spec(model_cfg, family)


# ---- inputs --------------------------------------------------------------------------------------


def encode(texts: list[str], images: list, labels, class_names: list[str], model_cfg, max_length: int):
    """``FeatureTable`` of the checkpoint's own inputs: token ids and masks, pixel values
    (N, 3, H, W) in ``image_features``, the processed neutral grey image as ``fill_image``."""
    name = str(model_cfg.name_or_path)
    config = load_config(name)
    family = family_of(config)
    proc = Processor(name)
    labels = torch.as_tensor(labels, dtype=torch.long) if not isinstance(labels, torch.Tensor) else labels
    if family == "vilt":  # square inputs of the processor's size: equal shapes, pixel_mask all ones
        side = proc.image_processor.size.get("shortest_edge") or proc.image_processor.size.get("height")
        images = [img.convert("RGB").resize((side, side), Image.BILINEAR) for img in images]
    pixels = proc.pixels(images)
    neutral = Image.new("RGB", images[0].size if images else (224, 224), (127, 127, 127))
    fill_image = proc.pixels([neutral])[0]
    if family == "llava":
        return _encode_prompts(texts, pixels, fill_image, labels, class_names, config, proc, max_length)
    text_cfg = config.get_text_config()
    max_length = min(max_length, getattr(text_cfg, "max_position_embeddings", max_length))
    tok = proc.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    fill = proc.tokenizer([PLACEHOLDER_TEXT], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return FeatureTable(
        input_ids=tok["input_ids"].long(),
        text_mask=tok["attention_mask"].bool(),
        image_features=pixels,
        labels=labels,
        fill_input_ids=fill["input_ids"][0].long(),
        fill_text_mask=fill["attention_mask"][0].bool(),
        fill_image=fill_image,
    )


def num_image_tokens(config) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def build_prompt(text: str, image: bool, proc: Processor, image_token: str) -> str:
    """The instruction prompt (the chat template's when the processor has one)."""
    question = f"{text}\n{PROMPT_QUESTION}" if text else PROMPT_QUESTION
    if proc.chat_template:
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
        return proc.apply_chat_template([{"role": "user", "content": content}])
    return f"{image_token}\n{question}" if image else question


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def _encode_prompts(texts, pixels, fill_image, labels, class_names, config, proc, max_length):
    if labels.ndim != 1:
        raise ValueError("model.name_or_path: a LLaVA model answers with one class name; multi-label data needs a classifier family (clip, vilt)")
    tok = proc.tokenizer
    if tok.eos_token_id is None:
        raise ValueError("model.name_or_path: the tokenizer has no eos token, so an answer cannot end")
    image_token = tok.convert_ids_to_tokens(config.image_token_id)
    expanded = image_token * num_image_tokens(config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def ids(prompt: str) -> list[int]:
        out = tok(prompt.replace(image_token, expanded), add_special_tokens=False)["input_ids"]
        bos = tok.bos_token_id
        return ([bos] if bos is not None and out[:1] != [bos] else []) + out

    short = []
    for text in texts:  # the sample's text cut to data.max_text_length tokens
        pieces = tok(text or "", add_special_tokens=False)["input_ids"]
        short.append(text or "" if len(pieces) <= max_length else tok.decode(pieces[:max_length]))
    both = _pad([ids(build_prompt(t, True, proc, image_token)) for t in short], pad)
    variants = {
        "no_image": _pad([ids(build_prompt(t, False, proc, image_token)) for t in short], pad),
        "no_text": _pad([ids(build_prompt("", True, proc, image_token))] * len(short), pad),
    }
    answers = _pad([tok(n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for n in class_names], pad)
    extra = {"answer_ids": answers[0], "answer_mask": answers[1]}
    for key, (v_ids, v_mask) in variants.items():
        extra[f"prompt_{key}_ids"], extra[f"prompt_{key}_mask"] = v_ids, v_mask
    return FeatureTable(
        input_ids=both[0],
        text_mask=both[1],
        image_features=pixels,
        labels=labels,
        fill_input_ids=torch.tensor([pad], dtype=torch.long),
        fill_text_mask=torch.zeros(1, dtype=torch.bool),
        fill_image=fill_image,
        extra=extra,
    )


def prompt_batch(table, rows: torch.Tensor, has_image: torch.Tensor, has_text: torch.Tensor, fill: str = "absent") -> dict:
    """LLaVA inputs for ``rows``: prompt + answer right-padded with LM labels on the answer only
    (training), the prompt alone left-padded (generation), pixels of the samples that show their
    image, in order. ``fill: placeholder`` shows the neutral image for an absent one; an absent
    text is the prompt without it in both modes (the placeholder text is empty)."""
    if fill not in ("absent", "placeholder"):
        raise ValueError(f"missing.fill: unknown value {fill!r}; expected 'absent' or 'placeholder'")
    use_image = has_image | (fill == "placeholder")
    if (~use_image & ~has_text).any():
        raise ValueError("a sample with neither modality cannot be prompted")
    sources = {
        "both": (table.input_ids, table.text_mask),
        "no_image": (table.extra["prompt_no_image_ids"], table.extra["prompt_no_image_mask"]),
        "no_text": (table.extra["prompt_no_text_ids"], table.extra["prompt_no_text_mask"]),
    }
    answer_ids, answer_mask = table.extra["answer_ids"], table.extra["answer_mask"]
    labels = table.labels[rows]
    pad = int(table.fill_input_ids[0])
    prompts, full, targets = [], [], []
    for i, row in enumerate(rows.tolist()):
        variant = "both" if use_image[i] and has_text[i] else ("no_text" if use_image[i] else "no_image")
        ids, mask = sources[variant]
        prompt = ids[row][mask[row]].tolist()
        answer = answer_ids[labels[i]][answer_mask[labels[i]]].tolist()
        prompts.append(prompt)
        full.append(prompt + answer)
        targets.append([-100] * len(prompt) + answer)
    input_ids, attention_mask = _pad(full, pad)
    lm_labels = torch.full_like(input_ids, -100)
    for i, t in enumerate(targets):
        lm_labels[i, : len(t)] = torch.tensor(t)
    right_ids, right_mask = _pad(prompts, pad)  # left-pad for generation
    shift = right_mask.shape[1] - right_mask.sum(1)
    index = (torch.arange(right_ids.shape[1])[None, :] - shift[:, None]) % right_ids.shape[1]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask.long(),
        "lm_labels": lm_labels,
        "prompt_ids": right_ids.gather(1, index),
        "prompt_mask": right_mask.gather(1, index),
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
        "labels": labels,
    }
    if use_image.any():
        pixels = table.image_features[rows]
        if fill == "placeholder":
            pixels = torch.where(has_image.view(-1, 1, 1, 1), pixels, table.fill_image)
        batch["pixel_values"] = pixels[use_image]
    return batch
