"""Data: the embedded emoji dataset, client partitions and missing-modality simulation."""

from fedilora.data.emoji import (
    CATEGORIES,
    DatasetError,
    build_emoji_dataset,
    build_from_sources,
    dataset_statistics,
    fetch_npm_package,
    load_dataset_dir,
    save_dataset,
    sample_text,
)
from fedilora.data.splits import SplitsError, load_splits, make_splits, save_splits, split_statistics
from fedilora.data.sources import load_source_dataset

__all__ = [
    "CATEGORIES",
    "DatasetError",
    "SplitsError",
    "build_emoji_dataset",
    "build_from_sources",
    "dataset_statistics",
    "fetch_npm_package",
    "load_dataset_dir",
    "load_source_dataset",
    "save_dataset",
    "load_splits",
    "make_splits",
    "sample_text",
    "save_splits",
    "split_statistics",
]
