"""What every dataset layout shares: reading files with errors that name the file and line,
validating fields, and turning records into the one schema every later stage reads.

The emoji builder (:mod:`fedilora.data.emoji`), the generic layouts
(:mod:`fedilora.data.sources`) and the benchmark layouts (:mod:`fedilora.data.benchmarks`) all
build on this module and on nothing of each other's, so the data package has no import cycle.

Schema: ``image`` (``datasets.Image``), ``text`` (or the emoji set's ``name`` + ``keywords``),
``label`` (``ClassLabel``, or a list of ``ClassLabel`` for multi-label data) and, when the data
comes with an official split, ``split`` ("train" | "test").
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import datasets

SPLITS = ("train", "test")
TEXT_COLUMNS = ("text", "name", "keywords")


class DatasetError(ValueError):
    """A dataset that cannot be built or used; the message names the file (and line or row).
    Always one line, whatever a library's message it quotes (the CLI prints it as is)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))


@dataclass(frozen=True)
class Record:
    """One sample before it becomes a row: where it was read (for errors) and its fields."""

    where: str  # "file:line" or "file: row N"
    image: Path
    text: str
    label: str | list[str]
    split: str | None = None


# --------------------------------------------------------------------------- reading files


def decode_utf8(data: bytes, path: Path | str) -> str:
    """UTF-8 text (a leading byte-order mark dropped); a bad byte is reported with its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def read_text(path: Path) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror or err})") from None
    return decode_utf8(data, path)


def read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    out = []
    # split on "\n" only: str.splitlines would also split at U+2028, which JSON strings may hold
    for number, line in enumerate(read_text(path).split("\n"), start=1):
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


def read_csv(path: Path, header: bool = True) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line, fields)]); with ``header``, every row must have as many fields as the
    header. Blank lines are skipped; a row's line is the one it starts on."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if fields:
                rows.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as err:
        raise DatasetError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    if not rows:
        raise DatasetError(f"{path}: the file is empty; expected {'a header line and ' if header else ''}one row per sample")
    if not header:
        return [], rows
    (first, names), rows = rows[0], rows[1:]
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise DatasetError(f"{path}:{first}: column(s) {twice} appear more than once in the header")
    for line, fields in rows:
        if len(fields) != len(names):
            raise DatasetError(f"{path}:{line}: expected {len(names)} fields ({','.join(names)}), got {len(fields)}")
    return names, rows


# --------------------------------------------------------------------------- field checks


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


def require(obj: dict[str, Any], fields: Iterable[str], where: str) -> None:
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {missing}; has {sorted(obj)}")


def label_value(value: Any, where: str) -> str | list[str]:
    """A label as read: a class name (string or integer) or a list of them (multi-label)."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip() for v in value):
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


def read_classes(path: Path) -> list[str] | None:
    """Class names from an optional ``classes.txt`` (one per line), else None."""
    if not path.is_file():
        return None
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise DatasetError(f"{path}: expected one distinct class name per line")
    return names


# --------------------------------------------------------------------------- records -> Dataset


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


# --------------------------------------------------------------------------- dataset checks


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


def label_lists(ds: datasets.Dataset) -> list[list[int]]:
    """Every row's class ids as a list (one id per row for single-label data)."""
    return [list(v) for v in ds["label"]] if is_multilabel(ds.features["label"]) else [[v] for v in ds["label"]]


def check_dataset(ds: datasets.Dataset, source: str) -> datasets.Dataset:
    """What every later stage relies on, whatever the loader: columns and their types, labels in
    range, split values, at least one sample and one non-empty text, at least 2 classes."""
    if len(ds) == 0:
        raise DatasetError(f"{source}: the dataset is empty (no samples)")
    cols = set(ds.column_names)
    text_cols = [c for c in TEXT_COLUMNS if c in cols]
    missing = [c for c in ("image", "label") if c not in cols] + ([] if text_cols else ["text (or name/keywords)"])
    if missing:
        raise DatasetError(f"{source}: missing column(s) {missing}; has {sorted(cols)}")
    if not isinstance(ds.features["image"], datasets.Image):
        raise DatasetError(f"{source}: column 'image' must be a datasets.Image, got {ds.features['image']}")
    for col in text_cols:
        if getattr(ds.features[col], "dtype", None) not in ("string", "large_string"):
            raise DatasetError(f"{source}: column {col!r} must hold strings, got {ds.features[col]}")
    names = label_names(ds.features["label"])
    if names is None:
        raise DatasetError(
            f"{source}: column 'label' must be a datasets.ClassLabel (or a list of them for multi-label data), got {ds.features['label']}"
        )
    for row, labels in enumerate(label_lists(ds)):
        if None in labels:
            raise DatasetError(f"{source}: row {row}: the label is missing")
        bad = [v for v in labels if not 0 <= v < len(names)]
        if bad:
            raise DatasetError(f"{source}: row {row}: label {bad[0]} is outside 0..{len(names) - 1} ({len(names)} classes)")
    if "split" in cols:
        for row, value in enumerate(ds["split"]):
            if value not in SPLITS:
                raise DatasetError(f"{source}: row {row}: column 'split' must be one of {list(SPLITS)}, got {value!r}")
    if not any(str(t or "").strip() for col in text_cols for t in ds[col]):
        raise DatasetError(f"{source}: every text ({', '.join(text_cols)}) is empty")
    check_classes(ds, source)
    return ds


def check_classes(ds: datasets.Dataset, source: str) -> None:
    """A classifier needs at least two classes with samples; say which classes there are."""
    names = label_names(ds.features["label"])
    counts = Counter(v for labels in label_lists(ds) for v in labels)
    if len(counts) < 2:
        seen = ", ".join(f"{names[c]!r}: {n} samples" for c, n in sorted(counts.items())) or "no labelled sample"
        raise DatasetError(
            f"{source}: {len(counts)} class with samples ({seen}); a classifier needs at least 2 classes with samples"
        )
