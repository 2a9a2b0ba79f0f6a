"""The data stages as library functions: build the dataset and its feature cache, then the
client splits. Paths all derive from ``data.root`` so DVC can declare them as outputs.

Each stage writes its outputs as one set (:func:`fedilora.atomic.staged_set`): all of them are
built in a staging folder and replace the previous ones only when every part succeeded, with a
manifest (``prepare.manifest.json``, ``split.manifest.json``) recording their hashes. Readers
call :func:`check_prepared` to refuse a data root whose parts do not belong together
(docs/data.md, "What prepare guarantees").
"""

from __future__ import annotations

import io

import datasets
import numpy as np
import pandas as pd
import PIL.Image
import torch

from fedilora import metrics as task_metrics
from fedilora.atomic import staged_set, write_json
from fedilora.config import Params
from fedilora.data import (
    DatasetError,
    build_emoji_dataset,
    load_source_dataset,
    make_splits,
    sample_text,
    save_splits,
    split_statistics,
)
from fedilora.data.records import is_multilabel, label_names
from fedilora.data.splits import check_official_test
from fedilora.inputs import FeatureTable
from fedilora.models.families import family_of
from fedilora.paths import DataPaths
from fedilora.prepared import PREPARE, SPLIT, check_prepared



def load_source(params: Params, paths: DataPaths) -> datasets.Dataset:
    """Build the embedded emoji dataset (npm tarballs are cached) or read a user's dataset in
    ``data.format`` (fedilora.data.sources), validated, in memory: nothing is written here
    (but the npm cache)."""
    if paths.source == "emoji":
        return build_emoji_dataset(paths.npm_cache)
    return load_source_dataset(paths.source, params.data.format)


def texts_of(ds, text_field: str) -> list[str]:
    if "text" in ds.column_names:
        return [t or "" for t in ds["text"]]
    return [sample_text(n, k, text_field) for n, k in zip(ds["name"], ds["keywords"])]


def decoded_images(ds: datasets.Dataset, source: str) -> list:
    """Every image decoded up front, so a broken one is reported by its row and file, not deep
    in torch."""
    column = ds.cast_column("image", datasets.Image(decode=False))["image"]
    images = []
    for row, item in enumerate(column):
        name = f" ({item['path']})" if item.get("path") else ""
        try:
            with PIL.Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as img:
                images.append(img.convert("RGB"))
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
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


def encode_dataset(ds: datasets.Dataset, labels: torch.Tensor, params: Params, source: str) -> FeatureTable:
    """Tokens and frozen image features of every row: the embedded/tiny encoders, or a Hugging
    Face model's own tokenizer and image processor (``model.name_or_path``)."""
    texts, images = texts_of(ds, params.data.text_field), decoded_images(ds, source)
    return family_of(params.model).encode(texts, images, labels, label_names(ds.features["label"]), params.model, params.data)


def check_official_split(ds: datasets.Dataset, labels: torch.Tensor, source: str) -> None:
    """A dataset's own test split must test every class trained on: refused before anything
    costly. (The loaders refuse fewer than 2 classes; rules that depend on the split params are
    make_splits'.)"""
    if "split" in ds.column_names:
        test = np.asarray(ds["split"]) == "test"
        if test.any():
            try:
                check_official_test(labels.numpy(), test, label_names(ds.features["label"]))
            except DatasetError as err:
                raise DatasetError(f"{source}: {err}") from None


def prepare(params: Params) -> FeatureTable:
    """Dataset → tokens + frozen image features, cached as one safetensors file; the prepared
    copy, the cache and the statistics are replaced together or not at all."""
    paths = DataPaths.of(params)
    ds = load_source(params, paths)
    labels = label_tensor(ds)
    check_official_split(ds, labels, paths.source)
    with staged_set(paths.root, PREPARE) as staging:
        ds.save_to_disk(str(staging / paths.dataset.name))
        table = encode_dataset(ds, labels, params, paths.source)
        table.save(staging / paths.features.name)
        names = label_names(ds.features["label"])
        counts = labels.sum(0).long().tolist() if labels.ndim == 2 else labels.bincount(minlength=len(names)).tolist()
        stats = {"num_samples": len(table), "num_classes": len(names), "classes": dict(zip(names, counts))}
        write_json(staging / paths.dataset_stats.name, stats)
    return table


def official_test_rows(paths: DataPaths) -> tuple[np.ndarray | None, list[str]]:
    """The prepared dataset's official test split (its ``split`` column; None without one) and
    its class names."""
    ds = datasets.load_from_disk(str(paths.dataset))
    test_rows = np.asarray(ds["split"]) == "test" if "split" in ds.column_names else None
    return test_rows, label_names(ds.features["label"])


def split(params: Params) -> pd.DataFrame:
    """Clients, partition and missing modalities from the cached labels, for ``seed`` and every
    seed of ``compare.seeds``; the splits and the statistics of ``seed``'s (which it returns) are
    replaced together, recording which prepared set they were made from."""
    paths = DataPaths.of(params)
    prepared = check_prepared(paths, splits=False)
    table = FeatureTable.load(paths.features)
    labels = table.labels.numpy()
    test_rows, class_names = official_test_rows(paths)
    frames = {}
    for seed in sorted({params.seed, *params.compare.seeds}):
        try:
            frames[seed] = make_splits(labels, params.model_copy(update={"seed": seed}), test_rows=test_rows, class_names=class_names)
        except ValueError as err:
            raise DatasetError(f"{paths.dataset}: {err}") from None
    splits = frames[params.seed]
    with staged_set(paths.root, SPLIT, meta={PREPARE: prepared["id"]}) as staging:
        save_splits(pd.concat(frames.values(), ignore_index=True), staging / paths.splits.name)
        write_json(staging / paths.split_stats.name, split_statistics(splits, labels, task_metrics.num_classes(table.labels)))
    return splits
