"""The data stages as library functions: build the dataset and its feature cache, then the
client splits. Paths all derive from ``data.root`` so DVC can declare them as outputs."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pandas as pd
import PIL.Image
import torch

from fedilora import metrics as task_metrics
from fedilora.atomic import write_json
from fedilora.config import Params
from fedilora.data import (
    DatasetError,
    build_emoji_dataset,
    load_source_dataset,
    make_splits,
    sample_text,
    save_dataset,
    save_splits,
    split_statistics,
)
from fedilora.data.sources import is_multilabel, label_names
from fedilora.inputs import FeatureTable
from fedilora.models.families import family_of
from fedilora.paths import DataPaths


def load_source(params: Params, paths: DataPaths):
    """Build the embedded emoji dataset (npm tarballs are cached) or read a user's dataset in
    ``data.format`` (fedilora.data.sources), and write the prepared copy that later stages read.
    Everything is validated before anything is written."""
    if paths.source == "emoji":
        return build_emoji_dataset(paths.npm_cache, paths.dataset)
    ds = load_source_dataset(paths.source, params.data.format)
    save_dataset(ds, paths.dataset)
    return datasets.load_from_disk(str(paths.dataset))


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
            name = f" ({item['path']})" if item.get("path") else ""
            raise DatasetError(f"{source}: the image of row {row}{name} does not decode ({err})") from None
    return images


def label_tensor(ds) -> torch.Tensor:
    """Class ids (N,) int64, or for a list-of-ClassLabel column multi-hot rows (N, C) float32:
    the label tensor's shape is what tells training and evaluation the task (fedilora.metrics)."""
    feature = ds.features["label"]
    if not is_multilabel(feature):
        return torch.tensor(list(ds["label"]), dtype=torch.long)
    hot = torch.zeros(len(ds), len(label_names(feature)), dtype=torch.float32)
    for row, ids in enumerate(ds["label"]):
        hot[row, list(ids)] = 1.0
    return hot


def prepare(params: Params) -> FeatureTable:
    """Dataset → tokens + frozen image features, cached as one safetensors file."""
    paths = DataPaths.of(params)
    ds = load_source(params, paths)
    labels = label_tensor(ds)
    texts, images, names = texts_of(ds, params.data.text_field), decoded_images(ds, paths.source), label_names(ds.features["label"])
    table = family_of(params.model).encode(texts, images, labels, names, params.model, params.data)
    table.save(paths.features)
    counts = labels.sum(0).long().tolist() if labels.ndim == 2 else labels.bincount(minlength=len(names)).tolist()
    write_json(paths.dataset_stats, {"num_samples": len(table), "num_classes": len(names), "classes": dict(zip(names, counts))})
    return table


def official_test_rows(paths: DataPaths) -> np.ndarray | None:
    """The prepared dataset's official test split (its ``split`` column), if it has one."""
    if not (paths.dataset / "dataset_info.json").is_file():
        return None
    ds = datasets.load_from_disk(str(paths.dataset))
    if "split" not in ds.column_names:
        return None
    return np.asarray(ds["split"]) == "test"


def split(params: Params):
    """Clients, partition and missing modalities from the cached labels, for ``seed`` and every
    seed of ``compare.seeds``; saved with the statistics of ``seed``'s, which it returns."""
    paths = DataPaths.of(params)
    table = FeatureTable.load(paths.features)
    labels = table.labels.numpy()
    test_rows = official_test_rows(paths)
    if test_rows is not None and len(test_rows) != len(labels):
        raise DatasetError(f"{paths.dataset} has {len(test_rows)} rows but {paths.features} {len(labels)}; rerun `fedilora prepare`")
    seeds = sorted({params.seed, *params.compare.seeds})
    frames = {s: make_splits(labels, params.model_copy(update={"seed": s}), test_rows=test_rows) for s in seeds}
    save_splits(pd.concat(frames.values(), ignore_index=True), paths.splits)
    splits = frames[params.seed]
    write_json(paths.split_stats, split_statistics(splits, labels, task_metrics.num_classes(table.labels)))
    return splits
