"""The standard missing-modality benchmarks, read from the layouts they are distributed in.

Each adapter returns the common schema of :mod:`fedilora.data.sources` with the benchmark's
official split in ``split``: its test rows become the global test set. Validation splits
(MM-IMDb ``dev``, Hateful Memes ``dev_seen``/``dev`` when ``test_seen`` exists) are not used:
the pipeline selects no model on them, and training on them would not match the benchmarks.

* UPMC Food-101: ``images/{train,test}/{class}/{file}`` and ``texts/{train,test}_titles.csv``
  with rows ``file_name,text,class`` (no header): multiclass, 101 classes.
* MM-IMDb: ``dataset/{id}.jpeg`` + ``dataset/{id}.json`` (``plot``: list of strings, the first
  is the text; ``genres``: list) and ``split.json`` (``train``/``dev``/``test`` id lists):
  multi-label over the genres seen.
* Hateful Memes: ``img/{id}.png``, ``train.jsonl`` and ``test_seen.jsonl`` (else
  ``dev_seen.jsonl``, else ``dev.jsonl``) as the test split, lines ``{"id", "img", "label",
  "text"}``: binary (0 not hateful, 1 hateful), AUROC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from fedilora.data.records import (
    DatasetError,
    Record,
    read_csv,
    read_json,
    read_jsonl,
    require,
    safe_image_path,
    text_value,
    to_dataset,
)

# Files whose presence identifies a layout (data.format: auto).
MARKERS: dict[str, tuple[str, ...]] = {
    "food101": ("texts/train_titles.csv", "images"),
    "mmimdb": ("split.json", "dataset"),
    "hateful_memes": ("train.jsonl", "img"),
}
HATEFUL_CLASSES = ["not_hateful", "hateful"]


# --------------------------------------------------------------------------- UPMC Food-101


def _food101_rows(path: Path, split: str) -> list[Record]:
    titles = path / "texts" / f"{split}_titles.csv"
    if not titles.is_file():
        raise DatasetError(f"{titles}: file not found; a Food-101 layout needs texts/train_titles.csv and texts/test_titles.csv")
    records = []
    for line, row in read_csv(titles, header=False)[1]:
        where = f"{titles}:{line}"
        if line == 1 and row[0] in ("file_name", "image", "filename"):
            continue  # a header some copies carry
        if len(row) != 3:
            raise DatasetError(f"{where}: expected 3 fields file_name,text,class; got {len(row)}")
        file_name, text, label = row
        if not label.strip():
            raise DatasetError(f"{where}: empty class")
        image = safe_image_path(path / "images" / split, f"{label}/{file_name}", where)
        records.append(Record(where, image, text, label, split))
    return records


def load_food101(path: Path) -> datasets.Dataset:
    """UPMC Food-101 (Wang et al. 2015): recipe web-page titles and photos, 101 classes."""
    records = _food101_rows(path, "train") + _food101_rows(path, "test")
    return to_dataset(records, str(path))


# --------------------------------------------------------------------------- MM-IMDb


def _movie(path: Path, movie_id: str, split: str) -> Record:
    meta_path = path / "dataset" / f"{movie_id}.json"
    meta = read_json(meta_path)
    where = str(meta_path)
    if not isinstance(meta, dict):
        raise DatasetError(f"{where}: expected a JSON object with 'plot' and 'genres'")
    require(meta, ("plot", "genres"), where)
    plot, genres = meta["plot"], meta["genres"]
    if isinstance(plot, str):
        plot = [plot]
    if not isinstance(plot, list) or not all(isinstance(p, str) for p in plot):
        raise DatasetError(f"{where}: field 'plot' must be a list of strings, got {type(plot).__name__}")
    if not isinstance(genres, list) or not genres or not all(isinstance(g, str) for g in genres):
        raise DatasetError(f"{where}: field 'genres' must be a non-empty list of strings, got {genres!r}")
    image = safe_image_path(path / "dataset", f"{movie_id}.jpeg", where)
    return Record(where, image, plot[0] if plot else "", list(genres), split)


def load_mmimdb(path: Path) -> datasets.Dataset:
    """MM-IMDb (Arevalo et al. 2017): movie plots and posters, multi-label genres."""
    split_path = path / "split.json"
    splits = read_json(split_path)
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), list) for s in ("train", "test")):
        raise DatasetError(f"{split_path}: expected an object with 'train' and 'test' lists of movie ids (and optionally 'dev')")
    records = []
    for split in ("train", "test"):
        for movie_id in splits[split]:
            if not isinstance(movie_id, (str, int)) or not str(movie_id).strip() or "/" in str(movie_id) or "\\" in str(movie_id):
                raise DatasetError(f"{split_path}: '{split}' holds an invalid movie id {movie_id!r}")
            records.append(_movie(path, str(movie_id), split))
    return to_dataset(records, str(path))


# --------------------------------------------------------------------------- Hateful Memes


def _hateful_test_file(path: Path) -> Path:
    for name in ("test_seen.jsonl", "dev_seen.jsonl", "dev.jsonl"):
        if (path / name).is_file():
            return path / name
    raise DatasetError(f"{path}: no labelled test file; expected test_seen.jsonl, dev_seen.jsonl or dev.jsonl beside train.jsonl")


def _meme(path: Path, file: Path, number: int, obj: dict[str, Any], split: str) -> Record:
    where = f"{file}:{number}"
    require(obj, ("img", "label", "text"), where)
    label = obj["label"]
    if label not in (0, 1) or isinstance(label, bool):
        raise DatasetError(f"{where}: field 'label' must be 0 (not hateful) or 1 (hateful), got {label!r}")
    image = safe_image_path(path, obj["img"], where)
    return Record(where, image, text_value(obj["text"], where), HATEFUL_CLASSES[label], split)


def load_hateful_memes(path: Path) -> datasets.Dataset:
    """Hateful Memes (Kiela et al. 2020): meme text and image, binary hateful / not hateful."""
    records = []
    for file, split in ((path / "train.jsonl", "train"), (_hateful_test_file(path), "test")):
        records.extend(_meme(path, file, number, obj, split) for number, obj in read_jsonl(file))
    return to_dataset(records, str(path), HATEFUL_CLASSES)
