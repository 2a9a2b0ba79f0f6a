"""Data: dataset layouts and their validation, the embedded emoji dataset, client partitions and
missing-modality simulation. Module graph (no cycle): records <- emoji, benchmarks <- sources;
splits <- records."""

from fedilora.data.emoji import build_emoji_dataset, sample_text
from fedilora.data.records import DatasetError
from fedilora.data.sources import load_source_dataset
from fedilora.data.splits import SplitsError, load_splits, make_splits, save_splits, split_statistics

__all__ = [
    "DatasetError",
    "SplitsError",
    "build_emoji_dataset",
    "load_source_dataset",
    "load_splits",
    "make_splits",
    "sample_text",
    "save_splits",
    "split_statistics",
]
