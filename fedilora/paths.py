"""Where a run's data lives: every path derives from ``data.root`` so DVC can declare them as
stage outputs and every stage finds them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedilora.config import Params


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

    @property
    def aligned(self) -> Path:
        """The alignment stage's output: the aligned trained modules."""
        return self.root / "aligned.safetensors"
