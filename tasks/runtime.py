"""Per-process cache of what is expensive to build: the base model and the feature table.

Tasks receive only small arguments (params, a client id, adapter states); each worker process
builds its ``Federation`` once and every later task of that run reuses it. Runs whose models
would be built alike (the same :class:`~fedilora.models.shared.ModelSpec`) share one model.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd

from fedilora.config import Params
from fedilora.data.splits import for_seed, load_splits
from fedilora.federation import Federation, aligned_path, model_spec
from fedilora.inputs import FeatureTable
from fedilora.models.shared import SharedModel, build
from fedilora.paths import DataPaths

_lock = threading.RLock()
_models: dict[str, SharedModel] = {}
_tables: dict[str, FeatureTable] = {}
_splits: dict[str, pd.DataFrame] = {}
_federations: dict[str, Federation] = {}


def _load_once(cache: dict, path, load):
    """``load(path)``, read once per process and resolved path."""
    key = str(path.resolve())
    with _lock:
        if key not in cache:
            cache[key] = load(path)
        return cache[key]


def federation(params: Params) -> Federation:
    """The runtime for these params in this process, built on first use."""
    key = params.model_dump_json()
    with _lock:
        if key not in _federations:
            table = feature_table(params)
            path = DataPaths.of(params).splits
            splits = for_seed(_load_once(_splits, path, load_splits), params.seed, path)
            _federations[key] = Federation(params, table, splits, model=shared_model(params, table))
        return _federations[key]


def feature_table(params: Params) -> FeatureTable:
    """The prepared feature table of ``data.root``, loaded once per process."""
    return _load_once(_tables, DataPaths.of(params).features, FeatureTable.load)


def shared_model(params: Params, table: FeatureTable, aligned: Path | None = None) -> SharedModel:
    """The one base model of this process for these model settings (runs swap adapters on it);
    ``aligned``: the aligned modules to load (default: the alignment stage's for the seed)."""
    spec = model_spec(params, table, aligned or aligned_path(params))
    with _lock:
        if spec.key() not in _models:
            _models[spec.key()] = build(spec)
        return _models[spec.key()]


def clear() -> None:
    """Forget cached runtimes (tests; or after the data on disk changed)."""
    with _lock:
        _models.clear()
        _tables.clear()
        _splits.clear()
        _federations.clear()
