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

from collections.abc import Callable
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedilora.data import benchmarks
from fedilora.data.records import (
    SPLITS,
    DatasetError,
    Record,
    check_dataset,
    label_value,
    read_classes,
    read_csv,
    read_json,
    read_jsonl,
    require,
    safe_image_path,
    split_value,
    text_value,
    to_dataset,
)

TABLE_SUFFIXES = (".csv", ".parquet")
IMAGE_COLUMNS = ("image", "file_name")  # a table's image path column: either name
CLASSES_FILE = "classes.txt"  # optional: fixes the class names and their order
SAVED_JSON = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


# --------------------------------------------------------------------------- layouts


def load_imagefolder(path: Path) -> datasets.Dataset:
    """Images + ``metadata.jsonl``; or ``train/`` and ``test/`` each with one (the split). One
    line per image, as in the ImageFolder convention: a second line for the same file is refused
    (the builder would silently keep one of them)."""
    top = path / "metadata.jsonl"
    per_split = {s: path / s / "metadata.jsonl" for s in SPLITS if (path / s / "metadata.jsonl").is_file()}
    if not top.is_file() and not per_split:
        raise DatasetError(
            f"{path}: metadata.jsonl not found; an imagefolder dataset needs {top} (or train/metadata.jsonl "
            "and test/metadata.jsonl) with one JSON object per line: file_name, text, label"
        )
    files = {None: top} if top.is_file() else per_split
    records: list[Record] = []
    seen: dict[Path, str] = {}
    for split, meta in files.items():
        lines = read_jsonl(meta)
        if not lines:
            raise DatasetError(f"{meta}: no records (the file is empty); expected one JSON object per line: file_name, text, label")
        for number, obj in lines:
            where = f"{meta}:{number}"
            require(obj, ("file_name", "label"), where)
            image = safe_image_path(meta.parent, obj["file_name"], where)
            if image in seen:
                raise DatasetError(f"{where}: file_name {obj['file_name']!r} is already listed at {seen[image]}; one line per image")
            seen[image] = where
            records.append(
                Record(
                    where,
                    image,
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


def _table_rows(table: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """(columns, [(where, row)]). CSV is read with the csv module, so a row is named by the line
    it starts on (quoted fields may span lines); parquet rows are named by their index."""
    if table.suffix == ".csv":
        names, rows = read_csv(table)
        return names, [(f"{table}:{line}", dict(zip(names, fields))) for line, fields in rows]
    try:
        frame = pd.read_parquet(table)
    except Exception as err:  # pyarrow raises many types for a damaged file
        raise DatasetError(f"{table}: not a readable parquet table ({err})") from None
    names = [str(c) for c in frame.columns]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DatasetError(f"{table}: column(s) {twice} appear more than once")
    return names, [(f"{table}: row {i}", row) for i, row in enumerate(frame.to_dict("records"))]


def _cell(value):
    """A parquet cell as a plain Python value (numpy arrays and scalars become lists and numbers)."""
    return value.tolist() if hasattr(value, "tolist") else value


def load_table(path: Path) -> datasets.Dataset:
    """A CSV or parquet table: ``image`` (or ``file_name``, relative to the table's directory),
    ``text``, ``label`` (a list of names in parquet for multi-label), optional ``split``."""
    table = find_table(path)
    columns, rows = _table_rows(table)
    image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    missing = ([] if image_col else ["image"]) + [c for c in ("text", "label") if c not in columns]
    if missing:
        raise DatasetError(f"{table}: missing column(s) {missing}; has {columns}")
    if not rows:
        raise DatasetError(f"{table}: the table has no rows (no samples)")
    records = []
    for where, row in rows:
        split = _cell(row.get("split"))
        records.append(
            Record(
                where,
                safe_image_path(table.parent, _cell(row[image_col]), where),
                text_value(_cell(row["text"]), where),
                label_value(_cell(row["label"]), where),
                split_value(split if split != "" else None, where),
            )
        )
    return to_dataset(records, str(table), read_classes(table.parent / CLASSES_FILE))


def flatten_splits(dd: datasets.DatasetDict, source: str) -> datasets.Dataset:
    """A DatasetDict as one Dataset with a ``split`` column: ``train`` rows go to the clients,
    ``test`` rows are the global test set; other splits (validation, dev) are not used."""
    if "train" not in dd:
        raise DatasetError(f"{source}: has splits {list(dd)}; expected at least a 'train' split")
    parts = [dd[name].add_column("split", [name] * len(dd[name])) for name in SPLITS if name in dd]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:  # the splits' columns or features differ
        raise DatasetError(f"{source}: its splits cannot be joined ({err})") from None


def _diagnose_arrow(path: Path, err: Exception) -> str:
    """Why ``load_from_disk`` failed, as precisely as the Arrow files tell: the first one pyarrow
    cannot read through, or no rows at all (datasets cannot load an empty saved dataset)."""
    rows = 0
    for file in sorted(path.rglob("*.arrow")):
        try:
            with pa.memory_map(str(file)) as source:
                rows += pa.ipc.open_stream(source).read_all().num_rows
        except (OSError, pa.ArrowException) as arrow_err:
            return f"{file}: cannot be read as Arrow data ({arrow_err})"
    if rows == 0:
        return f"{path}: the dataset is empty (no samples)"
    return f"{path}: cannot be loaded as a dataset ({err})"


def load_saved(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    """What ``save_to_disk`` wrote, with errors naming the file: its JSON files are read first
    (so a bad byte or a syntax error gets a line), a damaged Arrow file is named."""
    expected = "a directory written by datasets.Dataset.save_to_disk (or DatasetDict.save_to_disk)"
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset directory not found; expected {expected}")
    for name in SAVED_JSON:
        for file in sorted(path.rglob(name)):
            read_json(file)
    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # datasets and pyarrow raise several unrelated types for a broken directory
        raise DatasetError(f"{_diagnose_arrow(path, err)}; expected {expected}") from None


def check_embedded_images(ds: datasets.Dataset, source: str) -> None:
    """A saved dataset stores its images; a row holding only a path would make us read whatever
    file it names (save_to_disk embeds it), so such rows are refused."""
    column = ds.cast_column("image", datasets.Image(decode=False)).with_format("arrow")["image"]
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    fields = dict(zip((f.name for f in column.type), column.flatten()))  # flatten: a null row nulls its fields
    unstored = pc.is_null(fields["bytes"]).to_pylist()
    if True in unstored:
        row = unstored.index(True)
        path = fields["path"][row].as_py()
        what = f"only the path {path!r}" if path else "no image at all"
        raise DatasetError(f"{source}: row {row}: the image is not stored in the dataset ({what}); save the dataset with its images embedded")


def load_hf(path: Path) -> datasets.Dataset:
    """A ``save_to_disk`` directory: a Dataset, or a DatasetDict of splits."""
    loaded = load_saved(path)
    ds = flatten_splits(loaded, str(path)) if isinstance(loaded, datasets.DatasetDict) else loaded
    check_dataset(ds, str(path))
    check_embedded_images(ds, str(path))
    return ds


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


LOADERS: dict[str, Callable[[Path], datasets.Dataset]] = {
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
    for fmt, marker in benchmarks.MARKERS.items():
        if all((path / m).exists() for m in marker):
            return fmt
    if any((path / f).is_file() for f in SAVED_JSON):
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
    return LOADERS[fmt](path)
