"""Property-based: broken datasets in the imagefolder, table and hf layouts, each fed to `fedilora
prepare` after a good set was prepared. Every one must exit 2 with one error line that names the
file (and the line or row, where there is one), without a traceback, and leave the prepared set
byte-identical.

Each kind of damage below is a function ``(root, draw) -> (source, format, expected)``: it writes
a small good dataset (9 samples, 3 classes) under ``root``, breaks it in a way hypothesis varies
(which row, which byte, which value, where a file is cut), and says what the error line must
contain. Every kind runs ``EXAMPLES`` generated datasets through the CLI's ``main`` in this
process (a new interpreter per example would cost seconds); one runs through the real
``fedilora`` executable too.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from prepared_sets import cli, error_line, rewrite_arrow_rows, snapshot
from tiny_project import run_cli

CLASSES = ("red", "green", "blue")
ROWS = 9
EXAMPLES = 6  # per kind: 37 kinds, 222 broken datasets
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# Bytes that are never valid UTF-8 between ASCII characters.
INVALID_UTF8 = [*range(0x80, 0xC2), *range(0xF5, 0x100)]

Draw = Callable
Broken = tuple[Path, str, str]  # data.source, data.format, what the error line must contain


def label(i: int) -> str:
    return CLASSES[i % len(CLASSES)]


def png(i: int, size: int = 8) -> bytes:
    """A small noisy PNG (a real compressed stream, so a cut lands inside image data)."""
    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB")
        return True
    except Exception:
        return False


def broken_image(draw: Draw, i: int) -> bytes:
    """Cut inside the compressed pixels, random bytes, or nothing at all."""
    data = png(i)
    how = draw(st.sampled_from(["cut", "garbage", "empty"]))
    if how == "cut":
        start = data.index(b"IDAT")
        end = start + 4 + int.from_bytes(data[start - 4 : start], "big")
        broken = data[: draw(st.integers(1, end - 5))]  # PIL ignores a missing zlib checksum (the last 4 bytes)
    elif how == "garbage":
        broken = b"not an image: " + draw(st.binary(max_size=64))
    else:
        broken = b""
    assume(not decodes(broken))
    return broken


def insert_invalid_byte(draw: Draw, line: bytes) -> bytes:
    at = draw(st.integers(0, len(line)))
    return line[:at] + bytes([draw(st.sampled_from(INVALID_UTF8))]) + line[at:]


def outside_file(root: Path) -> Path:
    """A real image beside the dataset, so refusing a path to it is about escaping, not absence."""
    path = root.parent / "outside.png"
    path.write_bytes(png(99))
    return path


WRONG_TEXT = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
WRONG_LABEL = st.one_of(st.floats(allow_nan=False), st.booleans(), st.none(), st.just(""), st.just("  "),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                        st.lists(st.one_of(st.none(), st.floats(allow_nan=False), st.booleans(), st.just("")), min_size=1, max_size=3))
WRONG_FILE_NAME = st.one_of(st.integers(), st.none(), st.booleans(), st.just(""), st.just("   "), st.lists(st.text(max_size=3), max_size=2))
BAD_PATHS = ["../outside.png", "images/../../outside.png", "/etc/hostname", "./../outside.png", "LINK"]


# --------------------------------------------------------------------------- imagefolder


def _image_rows(root: Path, folder: str, path_key: str) -> list[dict]:
    """ROWS good images under root/folder and their rows (path under ``path_key``, text, label)."""
    (root / folder).mkdir(parents=True)
    rows = []
    for i in range(ROWS):
        (root / folder / f"{i}.png").write_bytes(png(i))
        rows.append({path_key: f"{folder}/{i}.png", "text": f"a {label(i)} thing", "label": label(i)})
    return rows


def _folder(root: Path) -> list[dict]:
    return _image_rows(root, "images", "file_name")


def _write_meta(root: Path, lines: list[bytes | dict]) -> Path:
    meta = root / "metadata.jsonl"
    meta.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return meta


def folder_truncated_image(root: Path, draw: Draw) -> Broken:
    _write_meta(root, _folder(root))
    k = draw(st.integers(0, ROWS - 1))
    (root / "images" / f"{k}.png").write_bytes(broken_image(draw, k))
    return root, "imagefolder", f"the image of row {k} ({(root / 'images' / f'{k}.png').resolve()}) does not decode"


def folder_invalid_json(root: Path, draw: Draw) -> Broken:
    objs, k = _folder(root), draw(st.integers(0, ROWS - 1))
    line = json.dumps(objs[k]).encode()
    meta = _write_meta(root, [*objs[:k], line[: draw(st.integers(1, len(line) - 1))], *objs[k + 1 :]])
    return root, "imagefolder", f"{meta}:{k + 1}: not valid JSON"


def folder_not_an_object(root: Path, draw: Draw) -> Broken:
    objs, k = _folder(root), draw(st.integers(0, ROWS - 1))
    value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5), st.booleans(), st.none(), st.floats(allow_nan=False)))
    meta = _write_meta(root, [*objs[:k], json.dumps(value).encode(), *objs[k + 1 :]])
    return root, "imagefolder", f"{meta}:{k + 1}: expected a JSON object"


def folder_wrong_type(root: Path, draw: Draw) -> Broken:
    objs, k = _folder(root), draw(st.integers(0, ROWS - 1))
    field = draw(st.sampled_from(["file_name", "text", "label"]))
    objs[k][field] = draw({"file_name": WRONG_FILE_NAME, "text": WRONG_TEXT, "label": WRONG_LABEL}[field])
    meta = _write_meta(root, objs)
    return root, "imagefolder", f"{meta}:{k + 1}: " + ("image path must be" if field == "file_name" else f"field '{field}'")


def folder_missing_field(root: Path, draw: Draw) -> Broken:
    objs, k = _folder(root), draw(st.integers(0, ROWS - 1))
    field = draw(st.sampled_from(["file_name", "label"]))
    del objs[k][field]
    meta = _write_meta(root, objs)
    return root, "imagefolder", f"{meta}:{k + 1}: missing field(s) ['{field}']"


def folder_bad_encoding(root: Path, draw: Draw) -> Broken:
    objs, k = _folder(root), draw(st.integers(0, ROWS - 1))
    meta = _write_meta(root, [*objs[:k], insert_invalid_byte(draw, json.dumps(objs[k]).encode()), *objs[k + 1 :]])
    return root, "imagefolder", f"{meta}:{k + 1}: not valid UTF-8"


def folder_escaping_path(root: Path, draw: Draw) -> Broken:
    objs, k = _folder(root), draw(st.integers(0, ROWS - 1))
    bad = draw(st.sampled_from(BAD_PATHS))
    if bad == "LINK":  # a link inside the dataset pointing out of it
        (root / "images" / "link.png").symlink_to(outside_file(root))
        bad = "images/link.png"
    else:
        outside_file(root)
    objs[k]["file_name"] = bad
    meta = _write_meta(root, objs)
    return root, "imagefolder", f"{meta}:{k + 1}: image path {bad!r}"


def folder_missing_image(root: Path, draw: Draw) -> Broken:
    objs, k = _folder(root), draw(st.integers(0, ROWS - 1))
    (root / objs[k]["file_name"]).unlink()
    meta = _write_meta(root, objs)
    return root, "imagefolder", f"{meta}:{k + 1}: image file {objs[k]['file_name']!r} not found"


def folder_empty_metadata(root: Path, draw: Draw) -> Broken:
    _folder(root)
    (root / "metadata.jsonl").write_bytes(draw(st.sampled_from([b"", b"\n", b"  \n\n", b"\r\n", b"\t"])) * draw(st.integers(1, 3)))
    return root, "imagefolder", f"{root / 'metadata.jsonl'}: no records (the file is empty)"


def folder_single_class(root: Path, draw: Draw) -> Broken:
    objs, only = _folder(root), draw(st.sampled_from(CLASSES))
    keep = draw(st.integers(1, ROWS))
    _write_meta(root, [{**o, "label": only} for o in objs[:keep]])
    return root, "imagefolder", f"{root}: 1 class with samples ('{only}': {keep} samples)"


def folder_duplicated_file_name(root: Path, draw: Draw) -> Broken:
    objs = _folder(root)
    j, k = draw(st.lists(st.integers(0, ROWS - 1), min_size=2, max_size=2, unique=True).map(sorted))
    objs[k]["file_name"] = draw(st.sampled_from(["", "./", "images/../"])) + objs[j]["file_name"]
    meta = _write_meta(root, objs)
    return root, "imagefolder", f"{meta}:{k + 1}: file_name {objs[k]['file_name']!r} is already listed at {meta}:{j + 1}"


def folder_unknown_label(root: Path, draw: Draw) -> Broken:
    objs, k = _folder(root), draw(st.integers(0, ROWS - 1))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    objs[k]["label"] = draw(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=8).filter(lambda s: s not in CLASSES))
    meta = _write_meta(root, objs)
    return root, "imagefolder", f"{meta}:{k + 1}: unknown label(s)"


def folder_bad_classes_file(root: Path, draw: Draw) -> Broken:
    _write_meta(root, _folder(root))
    how = draw(st.sampled_from(["duplicate", "empty", "encoding"]))
    classes = root / "classes.txt"
    if how == "encoding":
        classes.write_bytes(insert_invalid_byte(draw, "\n".join(CLASSES).encode()))
        return root, "imagefolder", f"{classes}:"
    names = [*CLASSES, draw(st.sampled_from(CLASSES))] if how == "duplicate" else []
    classes.write_text("\n".join(names) + draw(st.sampled_from(["", "\n", "\n\n"])))
    return root, "imagefolder", f"{classes}: expected one distinct class name per line"


def folder_test_split_missing_a_class(root: Path, draw: Draw) -> Broken:
    objs, missing = _folder(root), draw(st.sampled_from(CLASSES))
    for c in CLASSES:
        if c != missing:
            objs[CLASSES.index(c) + 3 * draw(st.integers(0, 2))]["split"] = "test"
    _write_meta(root, objs)
    return root, "imagefolder", f"{root}: the official test split holds no sample of class(es) ['{missing}'] seen in training"


# --------------------------------------------------------------------------- table (CSV or parquet)


def _rows(root: Path) -> list[dict]:
    return _image_rows(root, "pics", "image")


def _write_table(root: Path, rows: list[dict], suffix: str) -> Path:
    path = root / f"samples{suffix}"
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    return path


def _csv_lines(rows: list[dict]) -> list[bytes]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(rows[0].keys())
    writer.writerows(r.values() for r in rows)
    return out.getvalue().encode().splitlines()


def _where(table: Path, k: int) -> str:
    return f"{table}:{k + 2}" if table.suffix == ".csv" else f"{table}: row {k}"


def table_truncated_image(root: Path, draw: Draw) -> Broken:
    table = _write_table(root, _rows(root), draw(st.sampled_from([".csv", ".parquet"])))
    k = draw(st.integers(0, ROWS - 1))
    (root / "pics" / f"{k}.png").write_bytes(broken_image(draw, k))
    return table, "table", f"the image of row {k} ({(root / 'pics' / f'{k}.png').resolve()}) does not decode"


def table_missing_column(root: Path, draw: Draw) -> Broken:
    column = draw(st.sampled_from(["image", "text", "label"]))
    rows = [{c: v for c, v in r.items() if c != column} for r in _rows(root)]
    table = _write_table(root, rows, draw(st.sampled_from([".csv", ".parquet"])))
    return root, "table", f"{table}: missing column(s) ['{column}']"


def table_csv_bad_encoding(root: Path, draw: Draw) -> Broken:
    lines, k = _csv_lines(_rows(root)), draw(st.integers(0, ROWS - 1))
    lines[k + 1] = insert_invalid_byte(draw, lines[k + 1])
    (root / "samples.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root, "table", f"{root / 'samples.csv'}:{k + 2}: not valid UTF-8"


def table_csv_field_count(root: Path, draw: Draw) -> Broken:
    lines, k = _csv_lines(_rows(root)), draw(st.integers(0, ROWS - 1))
    extra = draw(st.integers(-2, 3).filter(bool))
    fields = lines[k + 1].split(b",")
    fields = fields[:extra] if extra < 0 else fields + [b"x"] * extra
    lines[k + 1] = b",".join(fields)
    (root / "samples.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root, "table", f"{root / 'samples.csv'}:{k + 2}: expected 3 fields (image,text,label), got {3 + extra}"


def table_csv_bad_quoting(root: Path, draw: Draw) -> Broken:
    lines, k = _csv_lines(_rows(root)), draw(st.integers(0, ROWS - 1))
    image, text, name = lines[k + 1].split(b",")
    text = draw(st.sampled_from([b'"' + text, b'"' + text + b'"x', b'"' + text + b'""']))  # never closed, or junk after the quote
    lines[k + 1] = b",".join([image, text, name])
    (root / "samples.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root, "table", f"{root / 'samples.csv'}:"  # the line where the csv module gives up


def table_empty(root: Path, draw: Draw) -> Broken:
    rows = _rows(root)
    if draw(st.booleans()):
        (root / "samples.csv").write_bytes(draw(st.sampled_from([b"", b"\n", b"\n\n\n", b"\r\n"])))
        return root, "table", f"{root / 'samples.csv'}: the file is empty"
    header = draw(st.permutations(list(rows[0])))
    (root / "samples.csv").write_text(",".join(header) + "\n" * draw(st.integers(0, 2)))
    return root, "table", f"{root / 'samples.csv'}: the table has no rows"


def table_duplicate_column(root: Path, draw: Draw) -> Broken:
    lines = _csv_lines(_rows(root))
    column = draw(st.sampled_from([b"image", b"text", b"label"]))
    lines = [lines[0] + b"," + column] + [line + b"," + draw(st.sampled_from([b"x", b"red", b"pics/0.png"])) for line in lines[1:]]
    (root / "samples.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root, "table", f"{root / 'samples.csv'}:1: column(s) ['{column.decode()}'] appear more than once"


def table_escaping_path(root: Path, draw: Draw) -> Broken:
    rows, k = _rows(root), draw(st.integers(0, ROWS - 1))
    bad = draw(st.sampled_from(BAD_PATHS))
    if bad == "LINK":
        (root / "pics" / "link.png").symlink_to(outside_file(root))
        bad = "pics/link.png"
    else:
        outside_file(root)
    rows[k]["image"] = bad
    table = _write_table(root, rows, draw(st.sampled_from([".csv", ".parquet"])))
    return root, "table", f"{_where(table, k)}: image path {bad!r}"


def table_missing_image(root: Path, draw: Draw) -> Broken:
    rows, k = _rows(root), draw(st.integers(0, ROWS - 1))
    (root / rows[k]["image"]).unlink()
    table = _write_table(root, rows, draw(st.sampled_from([".csv", ".parquet"])))
    return root, "table", f"{_where(table, k)}: image file {rows[k]['image']!r} not found"


def table_single_class(root: Path, draw: Draw) -> Broken:
    only = draw(st.sampled_from(CLASSES))
    rows = [{**r, "label": only} for r in _rows(root)][: draw(st.integers(1, ROWS))]
    table = _write_table(root, rows, draw(st.sampled_from([".csv", ".parquet"])))
    return root, "table", f"{table}: 1 class with samples ('{only}': {len(rows)} samples)"


def table_bad_split(root: Path, draw: Draw) -> Broken:
    rows, k = [{**r, "split": "train"} for r in _rows(root)], draw(st.integers(0, ROWS - 1))
    rows[k]["split"] = draw(st.sampled_from(["validation", "dev", "TEST", "Train", "tests", "1"]))
    table = _write_table(root, rows, draw(st.sampled_from([".csv", ".parquet"])))
    return root, "table", f"{_where(table, k)}: field 'split' must be one of ['train', 'test']"


def table_parquet_wrong_type(root: Path, draw: Draw) -> Broken:
    rows = _rows(root)
    column = draw(st.sampled_from(["image", "text", "label"]))
    values = {
        "image": st.sampled_from([np.arange(ROWS), np.arange(ROWS) * 0.5, np.ones(ROWS, bool), [None] * ROWS]),
        "text": st.sampled_from([np.arange(ROWS), np.arange(ROWS) * 0.5, np.ones(ROWS, bool), [[1, 2]] * ROWS]),
        "label": st.sampled_from([np.arange(ROWS) * 0.5, np.ones(ROWS, bool), [None] * ROWS, [{"a": 1}] * ROWS]),
    }[column]
    frame = pd.DataFrame(rows)
    frame[column] = list(draw(values))
    table = root / "samples.parquet"
    frame.to_parquet(table)
    return root, "table", f"{table}: row 0: " + ("image path must be" if column == "image" else f"field '{column}'")


def table_parquet_damaged(root: Path, draw: Draw) -> Broken:
    table = _write_table(root, _rows(root), ".parquet")
    data = table.read_bytes()
    how = draw(st.sampled_from(["cut", "garbage"]))
    table.write_bytes(data[: draw(st.integers(0, len(data) - 1))] if how == "cut" else b"garbage" + draw(st.binary(max_size=64)))
    return root, "table", f"{table}: not a readable parquet table"


# --------------------------------------------------------------------------- hf (save_to_disk)

FEATURES = {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(CLASSES))}


def _columns(n: int = ROWS) -> dict[str, list]:
    return {
        "image": [{"bytes": png(i), "path": None} for i in range(n)],
        "text": [f"a {label(i)} thing" for i in range(n)],
        "label": [i % len(CLASSES) for i in range(n)],
    }


def _saved(root: Path, columns: dict | None = None, features: dict | None = None) -> Path:
    columns = _columns() if columns is None else columns
    features = {k: v for k, v in (features or FEATURES).items() if k in columns}
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(root))
    return root



def hf_damaged_arrow(root: Path, draw: Draw) -> Broken:
    arrow = next(_saved(root).glob("*.arrow"))
    data = arrow.read_bytes()
    how = draw(st.sampled_from(["cut", "garbage"]))
    # a cut before the end-of-stream marker (8 bytes) loses rows: an error, or an empty dataset
    arrow.write_bytes(data[: draw(st.integers(0, len(data) - 9))] if how == "cut" else b"garbage" + draw(st.binary(max_size=64)))
    return root, "hf", f"{root}"


def hf_bad_json(root: Path, draw: Draw) -> Broken:
    file = _saved(root) / draw(st.sampled_from(["dataset_info.json", "state.json"]))
    text = file.read_bytes()
    how = draw(st.sampled_from(["cut", "encoding"]))
    if how == "cut":
        file.write_bytes(text[: draw(st.integers(0, len(text) - 1))])
        return root, "hf", f"{file}:"
    file.write_bytes(insert_invalid_byte(draw, text))
    return root, "hf", f"{file}:"


def hf_bad_state(root: Path, draw: Draw) -> Broken:
    state = _saved(root) / "state.json"
    content = json.loads(state.read_text())
    bad = st.sampled_from(["../outside.arrow", "/etc/hostname", "missing.arrow", "state.json", "dataset_info.json"])
    content["_data_files"] = [{"filename": name} for name in draw(st.lists(bad, min_size=1, max_size=3))]
    state.write_text(json.dumps(content))
    return root, "hf", f"{root}"


def hf_missing_column(root: Path, draw: Draw) -> Broken:
    column = draw(st.sampled_from(["image", "text", "label"]))
    _saved(root, {k: v for k, v in _columns(draw(st.integers(3, ROWS))).items() if k != column})
    return root, "hf", f"{root}: missing column(s) ['{column if column != 'text' else 'text (or name/keywords)'}']"


def hf_wrong_type(root: Path, draw: Draw) -> Broken:
    column, n = draw(st.sampled_from(["image", "text", "label"])), draw(st.integers(3, ROWS))
    columns = _columns(n)
    if column == "image":
        feature = draw(st.sampled_from([datasets.Value("string"), datasets.Value("binary")]))
        columns["image"] = [f"pics/{i}.png" if feature.dtype == "string" else png(i) for i in range(n)]
    elif column == "text":
        feature = draw(st.sampled_from([datasets.Value("int64"), datasets.Value("float32"), datasets.Value("bool")]))
        columns["text"] = [i % 2 for i in range(n)]
    else:
        feature = draw(st.sampled_from([datasets.Value("int64"), datasets.Value("string"), datasets.Value("float32")]))
        columns["label"] = [str(v) if feature.dtype == "string" else v for v in columns["label"]]
    _saved(root, columns, {**FEATURES, column: feature})
    return root, "hf", f"{root}: column '{column}' must"


def hf_undecodable_image(root: Path, draw: Draw) -> Broken:
    columns, k = _columns(), draw(st.integers(0, ROWS - 1))
    columns["image"][k] = {"bytes": broken_image(draw, k) or b"\0", "path": None}  # b"": datasets would store it as absent
    _saved(root, columns)
    return root, "hf", f"{root}: the image of row {k}"


def hf_image_only_a_path(root: Path, draw: Draw) -> Broken:
    k, path = draw(st.integers(0, ROWS - 1)), draw(st.sampled_from(["/etc/hostname", "../outside.png", "0.png", None]))
    outside_file(root)
    _saved(root)
    rewrite_arrow_rows(root, lambda rows: rows[k].update(image={"bytes": None, "path": path} if path else None))
    return root, "hf", f"{root}: row {k}: the image is not stored in the dataset"


def hf_label_out_of_range(root: Path, draw: Draw) -> Broken:
    k, value = draw(st.integers(0, ROWS - 1)), draw(st.one_of(st.integers(-(2**40), -1), st.integers(len(CLASSES), 2**40)))
    _saved(root)
    rewrite_arrow_rows(root, lambda rows: rows[k].update(label=value))
    return root, "hf", f"{root}: row {k}: label {value} is outside 0..2"


def hf_empty(root: Path, draw: Draw) -> Broken:
    how = draw(st.sampled_from(["no rows", "no text", "one class"]))
    n = draw(st.integers(1, ROWS))
    columns = _columns(0 if how == "no rows" else n)
    if how == "no text":
        columns["text"] = [draw(st.sampled_from(["", " ", "\n", "\t "])) for _ in range(n)]
        expected = f"{root}: every text (text) is empty"
    elif how == "one class":
        only = draw(st.integers(0, 2))
        columns["label"] = [only] * n
        expected = f"{root}: 1 class with samples ('{CLASSES[only]}': {n} samples)"
    else:
        expected = f"{root}: the dataset is empty"
    _saved(root, columns)
    return root, "hf", expected


def hf_bad_splits(root: Path, draw: Draw) -> Broken:
    ds = datasets.Dataset.from_dict(_columns(), features=datasets.Features(FEATURES))
    how = draw(st.sampled_from(["no train", "unlabelled test", "other classes"]))
    if how == "no train":
        names = draw(st.lists(st.sampled_from(["test", "validation", "dev"]), min_size=1, max_size=3, unique=True))
        datasets.DatasetDict({n: ds for n in names}).save_to_disk(str(root))
        return root, "hf", f"{root}: has splits"
    if how == "unlabelled test":  # joined, the test rows have no label
        datasets.DatasetDict({"train": ds, "test": ds.remove_columns("label")}).save_to_disk(str(root))
        return root, "hf", f"{root}: row {ROWS}: the label is missing"
    other = datasets.ClassLabel(names=draw(st.permutations(["red", "green", "blue", "pink"]))[: draw(st.integers(2, 4))])
    assume(other.names != list(CLASSES))
    datasets.DatasetDict({"train": ds, "test": ds.cast_column("label", other)}).save_to_disk(str(root))
    return root, "hf", f"{root}: its splits cannot be joined"


KINDS: dict[str, Callable[[Path, Draw], Broken]] = {
    f.__name__: f
    for f in (
        folder_truncated_image, folder_invalid_json, folder_not_an_object, folder_wrong_type, folder_missing_field,
        folder_bad_encoding, folder_escaping_path, folder_missing_image, folder_empty_metadata, folder_single_class,
        folder_duplicated_file_name, folder_unknown_label, folder_bad_classes_file, folder_test_split_missing_a_class,
        table_truncated_image, table_missing_column, table_csv_bad_encoding, table_csv_field_count, table_csv_bad_quoting,
        table_empty, table_duplicate_column, table_escaping_path, table_missing_image, table_single_class, table_bad_split,
        table_parquet_wrong_type, table_parquet_damaged,
        hf_damaged_arrow, hf_bad_json, hf_bad_state, hf_missing_column, hf_wrong_type, hf_undecodable_image,
        hf_image_only_a_path, hf_label_out_of_range, hf_empty, hf_bad_splits,
    )
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_broken_dataset_is_refused_and_the_prepared_set_kept(kind: str, prepared_project: Path, tmp_path: Path) -> None:
    params = prepared_project / "params.yaml"
    before = snapshot(prepared_project / "data")
    ran, numbers = [], itertools.count()

    @SETTINGS
    @given(st.data())
    def check(data: st.DataObject) -> None:
        root = tmp_path / f"example{next(numbers)}" / "dataset"
        root.parent.mkdir()
        try:
            source, fmt, expected = KINDS[kind](root, data.draw)
            ran.append(kind)
            code, stderr = cli("prepare", "--params", str(params), "-S", f"data.source={source}", "-S", f"data.format={fmt}")
            line = error_line(code, stderr)
            assert expected in line, line
            assert snapshot(prepared_project / "data") == before
        finally:
            shutil.rmtree(root.parent, ignore_errors=True)

    check()
    assert len(ran) >= EXAMPLES  # every generated dataset was a broken one that ran (none given up on)


def _first_example(kind: str, root: Path) -> Broken:
    """One dataset of ``kind``, as hypothesis generates it first (deterministic)."""
    found = []

    @settings(max_examples=1, derandomize=True, database=None, deadline=None)
    @given(st.data())
    def make(data: st.DataObject) -> None:
        if not found:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            found.append(KINDS[kind](root / "dataset", data.draw))

    make()
    return found[0]


@pytest.mark.slow
def test_through_the_real_command_line(prepared_project: Path, tmp_path: Path) -> None:
    """A new `fedilora` process: exit code 2, one line naming the file, no traceback, no change.
    One kind is enough here: the process adds the same to every kind's error (run in-process above)."""
    source, fmt, expected = _first_example("folder_truncated_image", tmp_path / "example")
    before = snapshot(prepared_project / "data")
    proc = run_cli(prepared_project, "prepare", "-S", f"data.source={source}", "-S", f"data.format={fmt}", check=False)
    assert expected in error_line(proc.returncode, proc.stderr)
    assert snapshot(prepared_project / "data") == before
