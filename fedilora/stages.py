"""The data stages as library functions: build the dataset and its feature cache, then the
client splits. Paths all derive from ``data.root`` so DVC can declare them as outputs."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import PIL.Image

from fedilora.atomic import atomic_path
from fedilora.config import Params
from fedilora.data import (
    DatasetError,
    build_emoji_dataset,
    load_dataset_dir,
    make_splits,
    sample_text,
    save_dataset,
    save_splits,
    split_statistics,
)
from fedilora.inputs import FeatureTable, encode
from fedilora.models.encoders import load_image_encoder, load_tokenizer


@dataclass(frozen=True)
class DataPaths:
    root: Path
    source: str

    @classmethod
    def of(cls, params: Params) -> "DataPaths":
        return cls(Path(params.data.root), params.data.source)

    @property
    def dataset(self) -> Path:
        """The prepared copy every later stage reads (a DVC output, whatever the source)."""
        return self.root / "dataset"

    @property
    def npm_cache(self) -> Path:
        return self.root / "npm"

    @property
    def features(self) -> Path:
        return self.root / "features.safetensors"

    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    @property
    def split_stats(self) -> Path:
        return self.root / "split_stats.json"

    @property
    def dataset_stats(self) -> Path:
        return self.root / "dataset_stats.json"


def load_source(params: Params, paths: DataPaths):
    """Build the embedded emoji dataset (npm tarballs are cached) or validate a user's saved
    dataset, and write the prepared copy that later stages read."""
    if paths.source == "emoji":
        return build_emoji_dataset(paths.npm_cache, paths.dataset)
    ds = load_dataset_dir(Path(paths.source))
    save_dataset(ds, paths.dataset)
    return ds


def texts_of(ds, text_field: str) -> list[str]:
    if "text" in ds.column_names:
        return [t or "" for t in ds["text"]]
    return [sample_text(n, k, text_field) for n, k in zip(ds["name"], ds["keywords"])]


def decoded_images(ds, source: str) -> list:
    """Every image decoded up front, so a broken one is reported by its row, not deep in torch."""
    column = ds.cast_column("image", datasets.Image(decode=False))["image"]
    images = []
    for row, item in enumerate(column):
        try:
            with PIL.Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as img:
                images.append(img.convert("RGB"))
        except (OSError, ValueError, TypeError) as err:
            raise DatasetError(f"{source}: the image of row {row} does not decode ({err})") from None
    return images


def prepare(params: Params) -> FeatureTable:
    """Dataset → tokens + frozen image features, cached as one safetensors file."""
    paths = DataPaths.of(params)
    ds = load_source(params, paths)
    table = encode(
        texts_of(ds, params.data.text_field),
        decoded_images(ds, paths.source),
        list(ds["label"]),
        load_tokenizer(),
        load_image_encoder(params.model.name, params.data.image_size),
        params.data.max_text_length,
    )
    table.save(paths.features)
    names = ds.features["label"].names
    counts = table.labels.bincount(minlength=len(names)).tolist()
    write_json(paths.dataset_stats, {"num_samples": len(table), "num_classes": len(names), "classes": dict(zip(names, counts))})
    return table


def split(params: Params):
    """Clients, partition and missing modalities from the cached labels; saved with statistics."""
    paths = DataPaths.of(params)
    table = FeatureTable.load(paths.features)
    labels = table.labels.numpy()
    splits = make_splits(labels, params)
    save_splits(splits, paths.splits)
    write_json(paths.split_stats, split_statistics(splits, labels, int(labels.max()) + 1))
    return splits


def write_json(path: Path, data: dict) -> None:
    """Atomic: a crash leaves the previous file, never half of a new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
