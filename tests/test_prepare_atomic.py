"""`prepare` and `split` are all-or-nothing: the staged commit itself, the failures of issue 14
(a truncated image, a non-UTF-8 byte, a single class), readers refusing a data root whose parts
do not belong together, the rules a dataset must meet to train, and a `kill -9` mid-prepare."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedilora import atomic, prepared, stages
from fedilora.config import Params, load_params
from fedilora.data import DatasetError, make_splits
from prepared_sets import cli, error_line, snapshot
from tiny_project import BIN, project_env, tiny_params, write_project

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_imagefolder(root: Path, n: int, classes: tuple[str, ...] = ("red", "green", "blue"), size: int = 8) -> Path:
    """``n`` images cycling through ``classes``, each a shade of its class colour."""
    lines = []
    for i in range(n):
        name = classes[i % len(classes)]
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), tuple(min(255, c + i % 20) for c in COLOURS[name])).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"images/{i}.png", "text": f"a {name} thing", "label": name}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def paths_of(project: Path) -> stages.DataPaths:
    return stages.DataPaths.of(load_params(project / "params.yaml"))


# --------------------------------------------------------------------------- the staged commit


def _commit(root: Path, files: dict[str, bytes], folder: dict[str, bytes] | None = None, meta: dict | None = None) -> None:
    with atomic.staged_set(root, "demo", meta) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if folder is not None:
            (staging / "folder").mkdir()
            for name, data in folder.items():
                (staging / "folder" / name).write_bytes(data)


def test_a_committed_set_replaces_every_part_and_records_them(tmp_path: Path) -> None:
    _commit(tmp_path, {"a.bin": b"old a", "b.json": b"{}"}, {"x": b"old x", "y": b"old y"})
    _commit(tmp_path, {"a.bin": b"new a", "b.json": b"[]"}, {"x": b"new x"}, meta={"from": "test"})
    assert (tmp_path / "a.bin").read_bytes() == b"new a" and (tmp_path / "b.json").read_bytes() == b"[]"
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["x"]  # the folder is replaced, not merged
    manifest = atomic.read_manifest(tmp_path, "demo")
    assert manifest["meta"] == {"from": "test"} and sorted(manifest["parts"]) == ["a.bin", "b.json", "folder"]
    assert manifest["parts"]["folder"]["files"]["x"]["size"] == 5
    assert atomic.changed_parts(tmp_path, manifest) == []
    assert not atomic.staging_dir(tmp_path, "demo").exists()


@pytest.mark.parametrize("error", [ValueError("bad row"), KeyboardInterrupt()])
def test_a_failure_before_the_commit_leaves_the_root_byte_identical(tmp_path: Path, error: BaseException) -> None:
    _commit(tmp_path, {"a.bin": b"old a"}, {"x": b"old x"})
    before = snapshot(tmp_path)
    with pytest.raises(type(error)):
        with atomic.staged_set(tmp_path, "demo") as staging:
            (staging / "a.bin").write_bytes(b"new a")
            raise error
    assert snapshot(tmp_path) == before


def test_a_crash_after_the_commit_point_is_rolled_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _commit(tmp_path, {"a.bin": b"old a", "b.bin": b"old b"}, {"x": b"old x"})
    real_replace, calls = os.replace, []

    def crash_on_the_second_part(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "b.bin" and Path(src).parent.name.endswith(".staging"):
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_the_second_part)
    with pytest.raises(OSError, match="power cut"):
        _commit(tmp_path, {"a.bin": b"new a", "b.bin": b"new b"}, {"x": b"new x"})
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert (tmp_path / "a.bin").read_bytes() == b"new a" and (tmp_path / "b.bin").read_bytes() == b"old b"  # half moved
    manifest = atomic.read_manifest(tmp_path, "demo")  # the next reader finishes the commit
    assert (tmp_path / "b.bin").read_bytes() == b"new b" and (tmp_path / "folder" / "x").read_bytes() == b"new x"
    assert atomic.changed_parts(tmp_path, manifest) == [] and not atomic.staging_dir(tmp_path, "demo").exists()


def test_a_staging_folder_without_manifest_is_discarded(tmp_path: Path) -> None:
    _commit(tmp_path, {"a.bin": b"old a"})
    staging = atomic.staging_dir(tmp_path, "demo")
    staging.mkdir()
    (staging / "a.bin").write_bytes(b"half written")  # what a kill -9 before the commit leaves
    manifest = atomic.read_manifest(tmp_path, "demo")
    assert not staging.exists() and (tmp_path / "a.bin").read_bytes() == b"old a"
    assert atomic.changed_parts(tmp_path, manifest) == []


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with atomic.staged_set(tmp_path, "demo"):
        with pytest.raises(atomic.SetLocked, match="another fedilora process is writing here"):
            with atomic.staged_set(tmp_path, "other"):
                pass


def test_changed_parts_sees_edits_additions_and_removals(tmp_path: Path) -> None:
    _commit(tmp_path, {"a.bin": b"a", "b.bin": b"b"}, {"x": b"x"})
    manifest = atomic.read_manifest(tmp_path, "demo")
    (tmp_path / "a.bin").write_bytes(b"A")
    (tmp_path / "folder" / "extra").write_bytes(b"")
    assert atomic.changed_parts(tmp_path, manifest) == ["a.bin", "folder"]
    (tmp_path / "b.bin").unlink()
    assert atomic.changed_parts(tmp_path, manifest) == ["a.bin", "b.bin", "folder"]


# --------------------------------------------------------------------------- issue 14's three failures


def _prepare(project: Path, source: Path, fmt: str = "auto") -> tuple[int, str]:
    return cli("prepare", "--params", str(project / "params.yaml"), "-S", f"data.source={source}", "-S", f"data.format={fmt}")


def test_a_truncated_image_among_120_keeps_the_previous_set(prepared_project: Path, tmp_path: Path) -> None:
    source = write_imagefolder(tmp_path / "imgs", 120)
    image = source / "images" / "5.png"
    image.write_bytes(image.read_bytes()[:40])
    before = snapshot(prepared_project / "data")
    line = error_line(*_prepare(prepared_project, source, "imagefolder"))
    assert f"the image of row 5 ({image.resolve()}) does not decode" in line
    assert snapshot(prepared_project / "data") == before  # dataset, features and statistics: all the old ones
    prepared.check_prepared(paths_of(prepared_project), splits=False)


def test_a_non_utf8_byte_names_the_file_and_line(prepared_project: Path, tmp_path: Path) -> None:
    source = write_imagefolder(tmp_path / "imgs", 12)
    meta = source / "metadata.jsonl"
    lines = meta.read_bytes().split(b"\n")
    lines[7] = lines[7].replace(b"a green thing", b"a gr\xffen thing")
    meta.write_bytes(b"\n".join(lines))
    before = snapshot(prepared_project / "data")
    column = lines[7].index(b"\xff") + 1
    line = error_line(*_prepare(prepared_project, source))
    assert f"{meta}:8: not valid UTF-8 (byte 0xff at column {column})" in line
    assert snapshot(prepared_project / "data") == before


def test_a_single_class_is_refused(prepared_project: Path, tmp_path: Path) -> None:
    source = write_imagefolder(tmp_path / "imgs", 12, classes=("red",))
    before = snapshot(prepared_project / "data")
    line = error_line(*_prepare(prepared_project, source))
    assert f"{source}: 1 class with samples ('red': 12 samples); a classifier needs at least 2 classes" in line
    assert snapshot(prepared_project / "data") == before


# --------------------------------------------------------------------------- parts that belong together


@pytest.fixture
def project(tmp_path: Path, prepared_project: Path) -> Path:
    """A private copy of the prepared project, split too."""
    root = tmp_path / "p"
    shutil.copytree(prepared_project, root)
    params = load_params(root / "params.yaml").model_dump(mode="json")
    params["data"].update(source=str(root / "dataset"), root=str(root / "data"))
    (root / "params.yaml").write_text(json.dumps(params))
    assert cli("split", "--params", str(root / "params.yaml"))[0] == 0
    return root


@pytest.mark.parametrize(
    "tamper, part",
    [
        (lambda d: (d / "features.safetensors").write_bytes(b"x"), "features.safetensors"),
        (lambda d: (d / "dataset_stats.json").write_text("{}"), "dataset_stats.json"),
        (lambda d: next((d / "dataset").glob("*.arrow")).unlink(), "dataset"),
        (lambda d: (d / "dataset" / "stray.txt").write_text(""), "dataset"),
    ],
)
def test_split_refuses_parts_changed_since_prepare(project: Path, tamper, part: str) -> None:
    tamper(project / "data")
    line = error_line(*cli("split", "--params", str(project / "params.yaml")), "split")
    assert f"{project / 'data' / part}: changed since `fedilora prepare` wrote them" in line


def test_splits_of_an_older_prepared_set_are_refused(project: Path, tmp_path: Path) -> None:
    paths = paths_of(project)
    prepared.check_prepared(paths)
    assert _prepare(project, write_imagefolder(tmp_path / "other", 30))[0] == 0
    with pytest.raises(DatasetError, match=r"splits.parquet: made from another prepared set.*rerun `fedilora split`"):
        prepared.check_prepared(paths)
    assert cli("split", "--params", str(project / "params.yaml"))[0] == 0
    prepared.check_prepared(paths)
    (project / "data" / "split.manifest.json").unlink()
    with pytest.raises(DatasetError, match=r"split.manifest.json: not found.*run `fedilora split`"):
        prepared.check_prepared(paths)


def test_a_split_that_fails_keeps_the_previous_splits(project: Path) -> None:
    before = snapshot(project / "data")
    line = error_line(*cli("split", "--params", str(project / "params.yaml"), "-S", "data.test_fraction=0.02"), "split")
    assert "3 classes, but data.test_fraction=0.02 holds out 2 of 90 samples" in line
    assert snapshot(project / "data") == before


# --------------------------------------------------------------------------- datasets that cannot train


def test_a_test_set_too_small_for_the_classes_is_refused() -> None:
    params = Params.model_validate(tiny_params(data={"test_fraction": 0.2}))
    with pytest.raises(DatasetError, match=r"5 classes, but data.test_fraction=0.2 holds out 2 of 10 samples; .*at least one sample of every class"):
        make_splits(np.arange(10) % 5, params)


def test_a_class_without_test_sample_is_named() -> None:
    params = Params.model_validate(tiny_params(data={"test_fraction": 0.1}))
    labels = np.array([0] * 20 + [1] * 20 + [2])  # 'blue' has one sample: the holdout keeps none of it
    with pytest.raises(DatasetError, match=r"holds out no sample of class\(es\) \['blue'\] \(with \[1\] samples\)"):
        make_splits(labels, params, class_names=["red", "green", "blue"])


def test_an_official_test_split_missing_a_class_is_refused_at_prepare(prepared_project: Path, tmp_path: Path) -> None:
    source = tmp_path / "split_dirs"
    write_imagefolder(source / "train", 12)
    write_imagefolder(source / "test", 4, classes=("red", "green"))
    before = snapshot(prepared_project / "data")
    line = error_line(*_prepare(prepared_project, source))
    assert "the official test split holds no sample of class(es) ['blue'] seen in training" in line
    assert snapshot(prepared_project / "data") == before


def test_more_clients_than_samples_is_refused_by_split(project: Path) -> None:
    line = error_line(*cli("split", "--params", str(project / "params.yaml"), "-S", "clients.num_clients=80",
                           "-S", f"clients.ranks={[2] * 80}"), "split")
    assert "clients.num_clients=80 is too many for 72 client samples" in line and "at least 1 per client" in line


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_during_feature_extraction_keeps_the_previous_set(tmp_path: Path) -> None:
    """The killed prepare uses the real image encoder on 300 images, so feature extraction lasts
    seconds; it is killed once the staged dataset is written and the encoder's progress bar has
    started, and must have left no manifest (the commit point) behind."""
    project, data = tmp_path / "p", tmp_path / "p" / "data"
    write_project(project, data={"source": str(project / "dataset"), "root": str(data)})
    assert cli("prepare", "--params", str(project / "params.yaml"))[0] == 0
    before = snapshot(data)
    source = write_imagefolder(tmp_path / "new", 300, size=32)
    staging = atomic.staging_dir(data, prepared.PREPARE)
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [str(BIN / "fedilora"), "prepare", "-S", f"data.source={source}", "-S", "model.name=embedded"],
            cwd=project, env=project_env(project), stdout=subprocess.DEVNULL, stderr=err,
        )
        deadline = time.monotonic() + 300
        while not ((staging / "dataset" / "state.json").is_file() and "image features" in log.read_text()):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "feature extraction never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (staging / "prepare.manifest.json").exists() and not (staging / "features.safetensors").exists()
    left = {k: v for k, v in snapshot(data).items() if not k.startswith(staging.name)}
    assert left == before  # the previous set, byte for byte; only the uncommitted staging folder is new
    assert _prepare(project, source)[0] == 0  # the next prepare (in-process: the same code as the CLI's)
    assert not staging.exists()
    manifest = prepared.check_prepared(paths_of(project), splits=False)
    assert json.loads((data / "dataset_stats.json").read_text())["num_samples"] == 300
    assert manifest["parts"]["features.safetensors"]["sha256"] == atomic.sha256(data / "features.safetensors")
