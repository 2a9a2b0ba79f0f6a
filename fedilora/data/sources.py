"""Users' own data: ``data.source`` as a local directory in one of a few documented layouts, or
a Hugging Face Hub name, turned into one ``datasets.Dataset`` that every later stage reads.

Every loader returns the same schema: ``image`` (``datasets.Image``), ``text`` (string),
``label`` (``ClassLabel``, or a list of ``ClassLabel`` for multi-label data) and, when the data
comes with an official split, ``split`` ("train" | "test"; the test rows become the global test
set). Layouts (README, "Your own data"):

* ``hf``: a directory written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``);
* ``imagefolder``: images plus ``metadata.jsonl`` (``file_name``, ``text``, ``label``) as in the
  ``datasets`` ImageFolder convention; optionally ``train/`` and ``test/`` each with their own;
* ``table``: one CSV or parquet file whose ``image`` column holds paths relative to it;
* ``food101``, ``mmimdb``, ``hateful_memes``: the benchmarks' own layouts
  (:mod:`fedilora.data.benchmarks`).

The ImageFolder metadata is parsed here rather than with the ``imagefolder`` builder, because
the builder reports neither the line of a malformed record nor an image path that climbs out of
the directory; the layout is the builder's, so the same directory also loads with
``datasets.load_dataset("imagefolder", data_dir=...)``. Every bad input is a
:class:`DatasetError` naming the file, the line or row and what was expected, raised before
anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import datasets

from fedilora.data.emoji import DatasetError, load_dataset_dir

SPLITS = ("train", "test")
TABLE_SUFFIXES = (".csv", ".parquet")
IMAGE_COLUMNS = ("image", "file_name")  # a table's image path column: either name
CLASSES_FILE = "classes.txt"  # optional: fixes the class names and their order


@dataclass(frozen=True)
class Record:
    """One sample before it becomes a row: where it was read (for errors) and its fields."""

    where: str  # "file:line" or "file: row N"
    image: Path
    text: str
    label: str | list[str]
    split: str | None = None


# --------------------------------------------------------------------------- checks


def safe_image_path(base: Path, value: Any, where: str) -> Path:
    """The image file ``value`` names, relative to ``base``; absolute paths and paths that climb
    out of ``base`` (``..``, links) are refused, so a dataset cannot make us read other files."""
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: image path must be a non-empty string relative to {base}, got {value!r}")
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute():
        raise DatasetError(f"{where}: image path {value!r} is absolute; expected a path relative to {base}")
    path = (base / value).resolve()
    if not path.is_relative_to(base.resolve()):
        raise DatasetError(f"{where}: image path {value!r} escapes the dataset directory {base}; refusing")
    if not path.is_file():
        raise DatasetError(f"{where}: image file {value!r} not found (looked for {path})")
    return path


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    out = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            out.append((number, obj))
    return out


def require(obj: dict[str, Any], fields: Iterable[str], where: str) -> None:
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {missing}; has {sorted(obj)}")


def label_value(value: Any, where: str) -> str | list[str]:
    """A label as read: a class name (string or integer) or a list of them (multi-label)."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            raise DatasetError(f"{where}: field 'label' must be a class name or a list of class names, got {value!r}")
        return [str(v) for v in value]
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    raise DatasetError(f"{where}: field 'label' must be a class name or a list of class names, got {value!r}")


def text_value(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field 'text' must be a string, got {type(value).__name__}")
    return value


def split_value(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in SPLITS:
        raise DatasetError(f"{where}: field 'split' must be one of {list(SPLITS)}, got {value!r}")
    return value


# --------------------------------------------------------------------------- records -> Dataset


def read_classes(path: Path) -> list[str] | None:
    """Class names from an optional ``classes.txt`` (one per line), else None."""
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise DatasetError(f"{path}: expected one distinct class name per line")
    return names


def _sort_key(name: str) -> tuple[int, int | str]:
    """Numeric class names in numeric order ("2" before "10"), then the others alphabetically."""
    return (0, int(name)) if name.isdigit() else (1, name)


def to_dataset(records: list[Record], source: str, classes: list[str] | None = None) -> datasets.Dataset:
    """The common schema from validated records; class names are ``classes`` (in that order) or
    every label seen, sorted. Multi-label as soon as one record has a list of labels."""
    if not records:
        raise DatasetError(f"{source}: the dataset is empty (no samples)")
    multilabel = any(isinstance(r.label, list) for r in records)
    as_lists = [r.label if isinstance(r.label, list) else [r.label] for r in records]
    names = classes or sorted({n for labels in as_lists for n in labels}, key=_sort_key)
    index = {n: i for i, n in enumerate(names)}
    for r, labels in zip(records, as_lists):
        unknown = [n for n in labels if n not in index]
        if unknown:
            raise DatasetError(f"{r.where}: unknown label(s) {unknown}; expected one of {names}")
    class_label = datasets.ClassLabel(names=names)
    columns: dict[str, list] = {
        "image": [str(r.image) for r in records],
        "text": [r.text for r in records],
        "label": [[index[n] for n in labels] for labels in as_lists] if multilabel else [index[r.label] for r in records],
    }
    features = {
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "label": datasets.Sequence(class_label) if multilabel else class_label,
    }
    if any(r.split for r in records):
        columns["split"] = [r.split or "train" for r in records]
        features["split"] = datasets.Value("string")
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return check_dataset(ds, source)


def check_dataset(ds: datasets.Dataset, source: str) -> datasets.Dataset:
    """What every later stage relies on, whatever the loader: columns, label type, non-empty."""
    if len(ds) == 0:
        raise DatasetError(f"{source}: the dataset is empty (no samples)")
    cols = set(ds.column_names)
    missing = [c for c in ("image", "label") if c not in cols]
    if missing or not cols & {"text", "name", "keywords"}:
        need = missing + ([] if cols & {"text", "name", "keywords"} else ["text"])
        raise DatasetError(f"{source}: missing column(s) {need}; has {sorted(cols)}")
    if not isinstance(ds.features["image"], datasets.Image):
        raise DatasetError(f"{source}: column 'image' must be a datasets.Image, got {ds.features['image']}")
    if label_names(ds.features["label"]) is None:
        raise DatasetError(f"{source}: column 'label' must be a ClassLabel or a list of ClassLabel, got {ds.features['label']}")
    if "split" in cols and not set(ds["split"]) <= set(SPLITS):
        raise DatasetError(f"{source}: column 'split' must hold only {list(SPLITS)}, got {sorted(set(ds['split']) - set(SPLITS))}")
    return ds


def label_names(feature: Any) -> list[str] | None:
    """Class names of a ClassLabel or a list-of-ClassLabel feature, else None."""
    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    return None


def is_multilabel(feature: Any) -> bool:
    return not isinstance(feature, datasets.ClassLabel) and isinstance(getattr(feature, "feature", None), datasets.ClassLabel)


# --------------------------------------------------------------------------- layouts


def load_imagefolder(path: Path) -> datasets.Dataset:
    """Images + ``metadata.jsonl``; or ``train/`` and ``test/`` each with one (the split)."""
    top = path / "metadata.jsonl"
    per_split = {s: path / s / "metadata.jsonl" for s in SPLITS if (path / s / "metadata.jsonl").is_file()}
    if not top.is_file() and not per_split:
        raise DatasetError(
            f"{path}: metadata.jsonl not found; an imagefolder dataset needs {top} (or train/metadata.jsonl "
            "and test/metadata.jsonl) with one JSON object per line: file_name, text, label"
        )
    files = {None: top} if top.is_file() else per_split
    records = []
    for split, meta in files.items():
        for number, obj in read_jsonl(meta):
            where = f"{meta}:{number}"
            require(obj, ("file_name", "label"), where)
            records.append(
                Record(
                    where,
                    safe_image_path(meta.parent, obj["file_name"], where),
                    text_value(obj.get("text"), where),
                    label_value(obj["label"], where),
                    split or split_value(obj.get("split"), where),
                )
            )
    return to_dataset(records, str(path), read_classes(path / CLASSES_FILE))


def find_table(path: Path) -> Path:
    """The table file itself, or the one CSV/parquet file at the top of a directory."""
    if path.is_file():
        return path
    tables = sorted(p for p in path.iterdir() if p.suffix in TABLE_SUFFIXES and p.is_file())
    if len(tables) != 1:
        raise DatasetError(
            f"{path}: expected exactly one .csv or .parquet table at the top of the directory, found "
            f"{[p.name for p in tables] or 'none'}"
        )
    return tables[0]


def _read_table(table: Path):
    import pandas as pd

    try:
        if table.suffix == ".parquet":
            return pd.read_parquet(table)
        return pd.read_csv(table, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas/pyarrow raise many types for a damaged file
        raise DatasetError(f"{table}: not a readable {table.suffix[1:]} table ({err})") from None


def load_table(path: Path) -> datasets.Dataset:
    """A CSV or parquet table: ``image`` (or ``file_name``, relative to the table's directory),
    ``text``, ``label`` (a list of names in parquet for multi-label), optional ``split``."""
    table = find_table(path)
    frame = _read_table(table)
    image_col = next((c for c in IMAGE_COLUMNS if c in frame.columns), None)
    missing = ([] if image_col else ["image"]) + [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise DatasetError(f"{table}: missing column(s) {missing}; has {list(frame.columns)}")
    line = (lambda i: f"{table}:{i + 2}") if table.suffix == ".csv" else (lambda i: f"{table}: row {i}")
    records = []
    for i, row in enumerate(frame.to_dict("records")):
        where = line(i)
        label = row["label"]
        label = label.tolist() if hasattr(label, "tolist") else label  # numpy arrays/scalars from parquet
        records.append(
            Record(
                where,
                safe_image_path(table.parent, row[image_col], where),
                text_value(row["text"], where),
                label_value(label, where),
                split_value(row.get("split") or None, where),
            )
        )
    return to_dataset(records, str(table), read_classes(table.parent / CLASSES_FILE))


def flatten_splits(dd: datasets.DatasetDict, source: str) -> datasets.Dataset:
    """A DatasetDict as one Dataset with a ``split`` column: ``train`` rows go to the clients,
    ``test`` rows are the global test set; other splits (validation, dev) are not used."""
    if "train" not in dd:
        raise DatasetError(f"{source}: has splits {list(dd)}; expected at least a 'train' split")
    parts = [dd[name].add_column("split", [name] * len(dd[name])) for name in SPLITS if name in dd]
    return datasets.concatenate_datasets(parts)


def load_hf(path: Path) -> datasets.Dataset:
    """A ``save_to_disk`` directory: a Dataset (checked as before) or a DatasetDict of splits."""
    if (path / "dataset_dict.json").is_file():
        try:
            dd = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises several unrelated types for a broken directory
            raise DatasetError(f"{path}: cannot be loaded as a DatasetDict ({err})") from None
        return check_dataset(flatten_splits(dd, str(path)), str(path))
    return check_dataset(load_dataset_dir(path), str(path))


def load_hub(name: str) -> datasets.Dataset:
    """A Hub dataset by name (needs a network connection, unless it is in the local cache)."""
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # offline, unknown name, gated: many types
        raise DatasetError(
            f"data.source={name!r}: not a local path, and loading it from the Hugging Face Hub failed ({err})"
        ) from None
    ds = flatten_splits(loaded, name) if isinstance(loaded, datasets.DatasetDict) else loaded
    return check_dataset(ds, name)


# --------------------------------------------------------------------------- dispatch


def _loaders() -> dict[str, Callable[[Path], datasets.Dataset]]:
    from fedilora.data import benchmarks

    return {
        "hf": load_hf,
        "imagefolder": load_imagefolder,
        "table": load_table,
        "food101": benchmarks.load_food101,
        "mmimdb": benchmarks.load_mmimdb,
        "hateful_memes": benchmarks.load_hateful_memes,
    }


def detect_format(path: Path) -> str:
    """The layout of a local dataset from the files it has (benchmarks first: most specific)."""
    if path.is_file():
        if path.suffix in TABLE_SUFFIXES:
            return "table"
        raise DatasetError(f"{path}: a file given as data.source must be a .csv or .parquet table")
    from fedilora.data import benchmarks

    for fmt, marker in benchmarks.MARKERS.items():
        if all((path / m).exists() for m in marker):
            return fmt
    if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return "hf"
    if (path / "metadata.jsonl").is_file() or any((path / s / "metadata.jsonl").is_file() for s in SPLITS):
        return "imagefolder"
    if any(p.suffix in TABLE_SUFFIXES for p in path.iterdir()):
        return "table"
    raise DatasetError(
        f"{path}: cannot tell the dataset layout; expected a save_to_disk directory, metadata.jsonl "
        "(imagefolder), one .csv/.parquet table, or a Food-101 / MM-IMDb / Hateful Memes layout "
        "(README, 'Your own data'); or set data.format"
    )


def looks_like_hub_name(source: str) -> bool:
    """``owner/name`` or ``name`` without path syntax: what the Hub accepts."""
    parts = source.split("/")
    return 1 <= len(parts) <= 2 and all(p and p not in (".", "..") and not p.startswith("~") for p in parts) and "\\" not in source


def load_source_dataset(source: str, fmt: str = "auto") -> datasets.Dataset:
    """``data.source`` in ``data.format`` as a Dataset in the common schema (module docstring)."""
    path = Path(source).expanduser()
    if not path.exists():
        if fmt in ("auto", "hf") and looks_like_hub_name(source):
            return load_hub(source)
        raise DatasetError(f"{path}: dataset directory not found (data.source)")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if path.is_file() and fmt != "table":
        raise DatasetError(f"{path}: is a file; data.format={fmt} expects a directory")
    return _loaders()[fmt](path)
