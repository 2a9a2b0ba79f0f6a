"""Users' own data: the generic layouts, the three benchmark adapters, bad inputs, and the task
types (multiclass, binary, multi-label) with their metrics, through to a CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from fedilora import metrics
from fedilora.config import Params, load_params
from fedilora.data import DatasetError, make_splits
from fedilora.data.records import is_multilabel
from fedilora.data.sources import detect_format, load_source_dataset
from fedilora.data.splits import representative_labels
from fedilora.federation import ClientUpdate, RoundResult
from fedilora.outputs import rounds_frame
from prepared_sets import rewrite_arrow_rows
from tiny_project import call_cli, seed_mlflow_store, tiny_params

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
WORDS = {"red": "apple cherry", "green": "leaf frog", "blue": "sea sky"}


def _image(path: Path, colour: tuple[int, int, int], shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), tuple(min(255, c + shade) for c in colour)).save(path)


# --------------------------------------------------------------------------- fixtures in each layout


def write_imagefolder(root: Path, n: int = 6) -> Path:
    lines = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        _image(root / "images" / f"{i}.png", COLOURS[name], i)
        lines.append({"file_name": f"images/{i}.png", "text": WORDS[name], "label": name})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def write_table(root: Path, suffix: str = ".csv", n: int = 6) -> Path:
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        _image(root / "pics" / f"{i}.jpg", COLOURS[name])
        rows.append({"image": f"pics/{i}.jpg", "text": WORDS[name], "label": name, "split": "test" if i == 0 else "train"})
    frame = pd.DataFrame(rows)
    path = root / f"data{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    return root


def write_food101(root: Path, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        lines = []
        for name in ("apple_pie", "sushi"):
            for i in range(per_class):
                file = f"{name}_{split}{i}.jpg"
                _image(root / "images" / split / name / file, COLOURS["red" if name == "apple_pie" else "blue"], i)
                lines.append(f'{file},"How to make {name.replace("_", " ")}, step {i}",{name}\n')
        (root / "texts").mkdir(parents=True, exist_ok=True)
        (root / "texts" / f"{split}_titles.csv").write_text("".join(lines))
    return root


GENRES = [["Drama"], ["Comedy"], ["Drama", "Romance"], ["Comedy", "Romance"]]


def write_mmimdb(root: Path, n_train: int = 40, n_test: int = 12, n_dev: int = 2) -> Path:
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    ids = [f"{i:07d}" for i in range(n_train + n_test + n_dev)]
    for i, movie in enumerate(ids):
        genres = GENRES[i % 4]
        colour = COLOURS["red"] if "Drama" in genres else COLOURS["blue"]
        _image(root / "dataset" / f"{movie}.jpeg", colour, (i * 3) % 20)
        plot = ("a sad story" if "Drama" in genres else "a funny story") + (" of love" if "Romance" in genres else "")
        (root / "dataset" / f"{movie}.json").write_text(json.dumps({"plot": [plot, "second plot"], "genres": genres, "title": movie}))
    split = {"train": ids[:n_train], "dev": ids[n_train + n_test :], "test": ids[n_train : n_train + n_test]}
    (root / "split.json").write_text(json.dumps(split))
    return root


def write_hateful_memes(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    def lines(start: int, n: int) -> str:
        out = []
        for i in range(start, start + n):
            label = i % 2
            _image(root / "img" / f"{i:05d}.png", COLOURS["red" if label else "green"], (i * 3) % 20)
            out.append(json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": label, "text": "hate words" if label else "kind words"}))
        return "\n".join(out) + "\n"

    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text(lines(0, n_train))
    (root / "dev_seen.jsonl").write_text(lines(n_train, 4))
    (root / "test_seen.jsonl").write_text(lines(n_train + 4, n_test))
    return root


# --------------------------------------------------------------------------- layouts


def test_imagefolder_layout(tmp_path: Path) -> None:
    ds = load_source_dataset(str(write_imagefolder(tmp_path / "folder")))
    assert detect_format(tmp_path / "folder") == "imagefolder"
    assert ds.column_names == ["image", "text", "label"]
    assert ds.features["label"].names == ["blue", "green", "red"]
    assert ds[0]["text"] == "apple cherry" and ds.features["label"].int2str(ds[0]["label"]) == "red"
    assert ds[0]["image"].size == (8, 8)


def test_imagefolder_classes_file_fixes_the_order(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "folder")
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    assert load_source_dataset(str(root)).features["label"].names == ["red", "green", "blue"]


def test_imagefolder_split_directories(tmp_path: Path) -> None:
    for split in ("train", "test"):
        write_imagefolder(tmp_path / "folder" / split, n=3)
    ds = load_source_dataset(str(tmp_path / "folder"), "imagefolder")
    assert ds["split"] == ["train"] * 3 + ["test"] * 3


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_layout(tmp_path: Path, suffix: str) -> None:
    root = write_table(tmp_path / "t", suffix)
    assert detect_format(root) == "table"
    ds = load_source_dataset(str(root / f"data{suffix}"))  # the file itself works too
    assert len(ds) == 6 and ds["split"][:2] == ["test", "train"]
    assert ds.features["label"].names == ["blue", "green", "red"]


def test_parquet_list_labels_are_multilabel(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", COLOURS["red"])
    pd.DataFrame({"image": ["a.png", "a.png"], "text": ["x", "y"], "label": [["b", "a"], ["c"]]}).to_parquet(tmp_path / "t.parquet")
    ds = load_source_dataset(str(tmp_path))
    assert is_multilabel(ds.features["label"])
    assert ds["label"] == [[1, 0], [2]]


def test_saved_dataset_and_datasetdict(tmp_path: Path) -> None:
    ds = load_source_dataset(str(write_imagefolder(tmp_path / "folder")))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert detect_format(tmp_path / "saved") == "hf"
    assert len(load_source_dataset(str(tmp_path / "saved"))) == 6
    datasets.DatasetDict({"train": ds.select(range(4)), "validation": ds.select([4]), "test": ds.select([5])}).save_to_disk(str(tmp_path / "dd"))
    flat = load_source_dataset(str(tmp_path / "dd"))
    assert flat["split"] == ["train"] * 4 + ["test"]  # validation is not used


def test_hub_name_goes_to_load_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    local = load_source_dataset(str(write_imagefolder(tmp_path / "folder")))
    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return datasets.DatasetDict({"train": local, "test": local.select([0])})

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_source_dataset("someone/memes")
    assert calls == ["someone/memes"] and len(ds) == 7 and ds["split"][-1] == "test"


def test_food101_layout(tmp_path: Path) -> None:
    root = write_food101(tmp_path / "food")
    assert detect_format(root) == "food101"
    ds = load_source_dataset(str(root))
    assert ds.features["label"].names == ["apple_pie", "sushi"]
    assert ds["split"] == ["train"] * 4 + ["test"] * 4
    assert ds[0]["text"] == "How to make apple pie, step 0"  # quoted commas survive


def test_mmimdb_layout(tmp_path: Path) -> None:
    root = write_mmimdb(tmp_path / "mmimdb", n_train=4, n_test=2, n_dev=1)
    assert detect_format(root) == "mmimdb"
    ds = load_source_dataset(str(root))
    assert len(ds) == 6  # dev is not used
    assert ds.features["label"].feature.names == ["Comedy", "Drama", "Romance"]
    assert ds["label"][2] == [1, 2] and ds["text"][2] == "a sad story of love"
    assert ds["split"] == ["train"] * 4 + ["test"] * 2


def test_hateful_memes_layout(tmp_path: Path) -> None:
    root = write_hateful_memes(tmp_path / "hm", n_train=4, n_test=2)
    assert detect_format(root) == "hateful_memes"
    ds = load_source_dataset(str(root))
    assert ds.features["label"].names == ["not_hateful", "hateful"]
    assert len(ds) == 6 and ds["split"][-2:] == ["test", "test"]  # test_seen, not dev_seen
    assert ds["label"][:2] == [0, 1]


# --------------------------------------------------------------------------- bad inputs


def _jsonl(root: Path, *lines: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _image(root / "a.png", COLOURS["red"])
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


GOOD = '{"file_name": "a.png", "text": "x", "label": "red"}'


@pytest.mark.parametrize(
    "lines, expected",
    [
        ((GOOD, '{"file_name": "a.png", "text": "x"'), r"metadata.jsonl:2: not valid JSON"),
        ((GOOD, '["a.png"]'), r"metadata.jsonl:2: expected a JSON object"),
        (('{"file_name": "/etc/passwd", "label": "red"}',), r"metadata.jsonl:1: image path '/etc/passwd' is absolute"),
        (('{"file_name": "../a.png", "label": "red"}',), r"metadata.jsonl:1: image path '../a.png' escapes the dataset directory"),
        (('{"file_name": "b.png", "label": "red"}',), r"metadata.jsonl:1: image file 'b.png' not found"),
        (('{"file_name": "a.png", "text": "x"}',), r"metadata.jsonl:1: missing field\(s\) \['label'\]"),
        (('{"file_name": "a.png", "text": 3, "label": "red"}',), r"metadata.jsonl:1: field 'text' must be a string"),
        (("",), r"metadata.jsonl: no records \(the file is empty\)"),
    ],
)
def test_bad_metadata_is_named(tmp_path: Path, lines: tuple[str, ...], expected: str) -> None:
    root = _jsonl(tmp_path / "d", *lines)
    with pytest.raises(DatasetError, match=expected):
        load_source_dataset(str(root))


def test_missing_metadata_and_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"metadata.jsonl not found"):
        load_source_dataset(str(tmp_path / "empty"), "imagefolder")
    with pytest.raises(DatasetError, match=r"cannot tell the dataset layout"):
        load_source_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match=r"dataset directory not found"):
        load_source_dataset(str(tmp_path / "nowhere"))


def test_unknown_label_in_a_multilabel_list(tmp_path: Path) -> None:
    root = _jsonl(tmp_path / "d", '{"file_name": "a.png", "label": ["red", "green"]}', '{"file_name": "b.png", "label": ["red", "pink"]}')
    _image(root / "b.png", COLOURS["blue"])
    (root / "classes.txt").write_text("red\ngreen\n")
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: unknown label\(s\) \['pink'\]"):
        load_source_dataset(str(root))


def test_table_errors(tmp_path: Path) -> None:
    root = write_table(tmp_path / "t")
    frame = pd.read_csv(root / "data.csv")
    frame.drop(columns="label").to_csv(root / "data.csv", index=False)
    with pytest.raises(DatasetError, match=r"data.csv: missing column\(s\) \['label'\]"):
        load_source_dataset(str(root))
    frame.loc[2, "image"] = "../../outside.jpg"
    frame.to_csv(root / "data.csv", index=False)
    with pytest.raises(DatasetError, match=r"data.csv:4: image path '../../outside.jpg' escapes"):
        load_source_dataset(str(root))


def test_benchmark_errors(tmp_path: Path) -> None:
    food = write_food101(tmp_path / "food")
    with open(food / "texts" / "test_titles.csv", "a") as fh:
        fh.write("x.jpg,no class\n")
    with pytest.raises(DatasetError, match=r"test_titles.csv:5: expected 3 fields"):
        load_source_dataset(str(food))
    mm = write_mmimdb(tmp_path / "mm", 2, 1, 0)
    (mm / "dataset" / "0000001.json").write_text(json.dumps({"plot": ["p"]}))
    with pytest.raises(DatasetError, match=r"0000001.json: missing field\(s\) \['genres'\]"):
        load_source_dataset(str(mm))
    hm = write_hateful_memes(tmp_path / "hm", 2, 1)
    (hm / "train.jsonl").write_text('{"id": 1, "img": "img/00000.png", "label": 2, "text": "x"}\n')
    with pytest.raises(DatasetError, match=r"train.jsonl:1: field 'label' must be 0"):
        load_source_dataset(str(hm))


def _save(path: Path, columns: dict, features: dict) -> Path:
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(path))
    return path



def test_hf_layout_errors(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", COLOURS["red"])
    png = {"bytes": (tmp_path / "a.png").read_bytes(), "path": None}
    image, text, classes = datasets.Image(), datasets.Value("string"), datasets.ClassLabel(names=["a", "b"])
    with pytest.raises(DatasetError, match=r"a.png: is a file; data.format=hf expects a directory"):
        load_source_dataset(str(tmp_path / "a.png"), "hf")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset_info.json").write_text('{\n  "features": {not json')
    with pytest.raises(DatasetError, match=r"broken/dataset_info.json:2: not valid JSON"):
        load_source_dataset(str(tmp_path / "broken"))
    path = _save(tmp_path / "no_text", {"image": [png], "label": [0]}, {"image": image, "label": classes})
    with pytest.raises(DatasetError, match=r"no_text: missing column\(s\) \['text \(or name/keywords\)'\]"):
        load_source_dataset(str(path))
    path = _save(tmp_path / "plain", {"image": [png], "text": ["t"], "label": [0]}, {"image": image, "text": text, "label": datasets.Value("int64")})
    with pytest.raises(DatasetError, match=r"plain: column 'label' must be a datasets.ClassLabel"):
        load_source_dataset(str(path))
    # datasets accepts -1 ("no label") in a ClassLabel column; training cannot.
    path = _save(tmp_path / "unlabelled", {"image": [png, png], "text": ["t", "u"], "label": [1, -1]}, {"image": image, "text": text, "label": classes})
    with pytest.raises(DatasetError, match=r"unlabelled: row 1: label -1 is outside 0\.\.1"):
        load_source_dataset(str(path))
    path = _save(tmp_path / "mute", {"image": [png, png], "text": ["", " "], "label": [0, 1]}, {"image": image, "text": text, "label": classes})
    with pytest.raises(DatasetError, match=r"mute: every text \(text\) is empty"):
        load_source_dataset(str(path))
    # a crafted copy whose second image is only a path outside the dataset: that file is never read
    path = _save(tmp_path / "path_only", {"image": [png, png], "text": ["t", "u"], "label": [0, 1]}, {"image": image, "text": text, "label": classes})
    rewrite_arrow_rows(path, lambda rows: rows[1].update(image={"bytes": None, "path": "/etc/hostname"}))
    with pytest.raises(DatasetError, match=r"path_only: row 1: the image is not stored in the dataset \(only the path '/etc/hostname'\)"):
        load_source_dataset(str(path))
    path = _save(tmp_path / "torn", {"image": [png] * 50, "text": ["t"] * 50, "label": [0, 1] * 25}, {"image": image, "text": text, "label": classes})
    arrow = next(path.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"torn/data-00000-of-00001.arrow: cannot be read as Arrow data"):
        load_source_dataset(str(path))


def test_bad_encoding_and_csv_are_named_by_line(tmp_path: Path) -> None:
    root = _jsonl(tmp_path / "d", GOOD, '{"file_name": "b.png", "text": "caf\u00e9", "label": "blue"}')
    _image(root / "b.png", COLOURS["blue"])
    data = (root / "metadata.jsonl").read_bytes().replace("café".encode(), b"caf\xff")
    (root / "metadata.jsonl").write_bytes(data)
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: not valid UTF-8 \(byte 0xff at column 36\)"):
        load_source_dataset(str(root))
    table = write_table(tmp_path / "t")
    lines = (table / "data.csv").read_text().splitlines()
    (table / "data.csv").write_text("\n".join(lines[:3] + ['pics/2.jpg,"a ""quoted""\nline",red,train,extra'] + lines[3:]) + "\n")
    with pytest.raises(DatasetError, match=r"data.csv:4: expected 4 fields \(image,text,label,split\), got 5"):
        load_source_dataset(str(table))
    (table / "data.csv").write_text("image,text,label,label\npics/0.jpg,x,red,red\n")
    with pytest.raises(DatasetError, match=r"data.csv:1: column\(s\) \['label'\] appear more than once"):
        load_source_dataset(str(table))
    (table / "data.csv").write_text("")
    with pytest.raises(DatasetError, match=r"data.csv: the file is empty"):
        load_source_dataset(str(table))


def test_duplicated_file_name_in_metadata(tmp_path: Path) -> None:
    root = _jsonl(tmp_path / "d", GOOD, '{"file_name": "./a.png", "text": "y", "label": "blue"}')
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2: file_name './a.png' is already listed at .*metadata.jsonl:1"):
        load_source_dataset(str(root))


# --------------------------------------------------------------------------- tasks and metrics


def test_task_inference() -> None:
    assert metrics.task_of(torch.tensor([0, 2, 1])) == "multiclass"
    assert metrics.task_of(torch.tensor([0, 1, 1])) == "binary"
    assert metrics.task_of(torch.tensor([[1.0, 0.0], [1.0, 1.0]])) == "multilabel"
    assert metrics.num_classes(torch.zeros(3, 5)) == 5


def test_multilabel_metrics_match_sklearn() -> None:
    truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    logits = np.array([[2.0, -1.0, 0.5], [-1.0, 3.0, 1.0], [1.0, 1.0, -2.0], [-1.0, -1.0, -1.0]])
    pred = (logits > 0).astype(int)
    out = metrics.compute("multilabel", truth, logits)
    assert out["accuracy"] == pytest.approx(0.5)  # rows 0 and 2 exactly right
    assert out["micro_f1"] == pytest.approx(f1_score(truth, pred, average="micro")) == pytest.approx(5 / 6)  # tp 5, fp 1, fn 1
    assert out["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro")) == pytest.approx((1 + 1 + 0.5) / 3)


def test_binary_auroc() -> None:
    truth = np.array([0, 0, 1, 1])
    logits = np.array([[0.0, -1.0], [0.0, 0.5], [0.0, 0.2], [0.0, 2.0]])  # p(1) ranks: 0.27, 0.62, 0.55, 0.88
    out = metrics.compute("binary", truth, logits)
    assert out["auroc"] == pytest.approx(0.75) == pytest.approx(roc_auc_score(truth, [0.27, 0.62, 0.55, 0.88]))
    assert out["accuracy"] == pytest.approx(0.75)
    assert np.isnan(metrics.compute("binary", np.array([1, 1]), logits[:2])["auroc"])


def test_multilabel_loss_is_bce() -> None:
    logits = torch.tensor([[0.3, -0.2]])
    labels = torch.tensor([[1.0, 0.0]])
    assert metrics.loss(logits, labels) == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item())


def test_extra_metrics_reach_the_summary_and_rounds() -> None:
    update = ClientUpdate(0, 2, 5, {}, 0.1, {"accuracy": 0.5, "macro_f1": 0.4, "auroc": 0.9})
    result = RoundResult(1, [0], {"accuracy": 0.6, "macro_f1": 0.5, "auroc": 0.7, "missing_image/auroc": 0.6}, [update])
    summary = result.summary()
    assert summary["personalized/auroc"] == 0.9 and summary["global/auroc"] == 0.7
    frame = rounds_frame([result], "x")
    assert {"global_auroc", "personalized_auroc", "global_missing_image_auroc", "global_accuracy"} <= set(frame.columns)


def test_multiclass_summary_columns_unchanged() -> None:
    update = ClientUpdate(0, 2, 5, {}, 0.1, {"accuracy": 0.5, "macro_f1": 0.4})
    result = RoundResult(1, [0], {"accuracy": 0.6, "macro_f1": 0.5, "missing_image/accuracy": 0.1, "missing_image/macro_f1": 0.1,
                                  "missing_text/accuracy": 0.2, "missing_text/macro_f1": 0.2}, [update])
    assert list(rounds_frame([result], "x").columns) == [
        "variant", "round", "global_accuracy", "global_macro_f1", "global_missing_image_accuracy",
        "global_missing_text_accuracy", "personalized_accuracy", "personalized_macro_f1",
    ]


def test_splits_official_test_and_multilabel() -> None:
    params = Params.model_validate(tiny_params())
    hot = np.zeros((40, 3))
    hot[np.arange(40), np.arange(40) % 3] = 1
    hot[::5, 2] = 1
    assert representative_labels(np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])).tolist() == [1, 3, 0]
    test_rows = np.arange(40) >= 32
    splits = make_splits(hot, params, test_rows=test_rows)
    assert sorted(splits[splits.client == -1]["row"]) == list(range(32, 40))
    assert sorted(splits["row"]) == list(range(40))
    one_d = np.arange(40) % 3
    pd.testing.assert_frame_equal(make_splits(one_d, params), make_splits(one_d, params, test_rows=np.zeros(40, bool)))


# --------------------------------------------------------------------------- examples


DATA_EXAMPLES = {"imagefolder": "imagefolder", "table": "table", "food101": "food101", "mmimdb": "mmimdb", "hateful_memes": "hateful_memes"}


@pytest.mark.parametrize("name", sorted(DATA_EXAMPLES))
def test_example_params_are_valid(name: str) -> None:
    params = load_params(REPO / "examples" / f"{name}.yaml")
    assert params.data.format == DATA_EXAMPLES[name] and params.data.source != "emoji"


# --------------------------------------------------------------------------- the CLI's stages


def _project(root: Path, source: str, writer, mlflow_template: Path) -> Path:
    """prepare, split and federate as the CLI runs them (in this process: tiny_project.call_cli)."""
    root.mkdir(parents=True, exist_ok=True)
    writer(root / source)
    full = Params.model_validate(tiny_params(data={"source": source})).model_dump(mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    seed_mlflow_store(root, mlflow_template)
    for command in ("prepare", "split", "federate"):
        call_cli(root, command)
    return root


@pytest.mark.slow  # a Prefect flow
def test_cli_multilabel_mmimdb(tmp_path: Path, mlflow_template: Path) -> None:
    project = _project(tmp_path / "p", "mmimdb", write_mmimdb, mlflow_template)
    stats = json.loads((project / "data/split_stats.json").read_text())
    assert stats["global_test"]["n"] == 12  # the official test split
    m = json.loads((project / "outputs/federate/metrics.json").read_text())
    for key in ("global_accuracy", "global_micro_f1", "global_macro_f1", "personalized_micro_f1"):
        assert 0.0 <= m[key] <= 1.0, key
    rounds = pd.read_csv(project / "outputs/federate/rounds.csv")
    assert "global_missing_text_micro_f1" in rounds.columns


def test_binary_hateful_memes_run(tmp_path: Path) -> None:
    """The same stages through the library (the CLI's flow is covered above)."""
    from fedilora import federation, outputs, stages

    write_hateful_memes(tmp_path / "hm")
    params = Params.model_validate(tiny_params(data={"source": str(tmp_path / "hm"), "root": str(tmp_path / "data")}))
    table = stages.prepare(params)
    assert table.labels.dtype == torch.long and metrics.task_of(table.labels) == "binary"
    splits = stages.split(params)
    assert sorted(splits[splits.client == -1]["row"]) == list(range(40, 52))  # test_seen
    _, results = federation.run(federation.Federation(params, table, splits))
    outputs.write_run_outputs(tmp_path / "out", results, "fedilora")
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    assert 0.0 <= m["global_auroc"] <= 1.0 and 0.0 <= m["global_accuracy"] <= 1.0
    assert "global_missing_image_auroc" in m and "personalized_auroc" in m and "global_micro_f1" not in m
