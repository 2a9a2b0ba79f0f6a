"""Per-process cache of what is expensive to build: the base model and the feature table.

Tasks receive only small arguments (a run key, a client id, adapter states); each worker
process builds its ``Federation`` once and every later task of that run reuses it.
"""

from __future__ import annotations

import threading

import pandas as pd

from fedilora import metrics as task_metrics
from fedilora.config import Params
from fedilora.data import load_splits
from fedilora.federation import Federation, build_model
from fedilora.inputs import FeatureTable
from fedilora.stages import DataPaths

_lock = threading.RLock()
_models: dict[str, object] = {}
_tables: dict[str, FeatureTable] = {}
_splits: dict[str, pd.DataFrame] = {}
_federations: dict[str, Federation] = {}


def _model_key(params: Params, image_dim: int, num_classes: int) -> str:
    m = params.model
    return f"{m.name}|{m.num_image_tokens}|{','.join(m.target_modules)}|{params.seed}|{image_dim}|{num_classes}|{max(params.clients.client_ranks())}|{params.lora.alpha_for(max(params.clients.client_ranks()))}|{params.lora.dropout}|{m.name_or_path}"


def run_key(params: Params) -> str:
    return params.model_dump_json()


def _load_once(cache: dict, path, load):
    """``load(path)``, read once per process and resolved path."""
    key = str(path.resolve())
    with _lock:
        if key not in cache:
            cache[key] = load(path)
        return cache[key]


def federation(params: Params) -> Federation:
    """The runtime for these params in this process, built on first use."""
    key = run_key(params)
    with _lock:
        if key not in _federations:
            table = feature_table(params)
            splits = _load_once(_splits, DataPaths.of(params).splits, load_splits)
            _federations[key] = Federation(params, table, splits, model=shared_model(params, table))
        return _federations[key]


def feature_table(params: Params) -> FeatureTable:
    """The prepared feature table of ``data.root``, loaded once per process."""
    return _load_once(_tables, DataPaths.of(params).features, FeatureTable.load)


def shared_model(params: Params, table: FeatureTable):
    """The one base model of this process for these model settings (runs swap adapters on it)."""
    with _lock:
        num_classes = task_metrics.num_classes(table.labels)
        mkey = _model_key(params, table.image_features.shape[1], num_classes)
        if mkey not in _models:
            _models[mkey] = build_model(params, table.image_features.shape[1], num_classes)
        return _models[mkey]


def clear() -> None:
    """Forget cached runtimes (tests; or after the data on disk changed)."""
    with _lock:
        _models.clear()
        _tables.clear()
        _splits.clear()
        _federations.clear()
