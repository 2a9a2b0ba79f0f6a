"""The emoji dataset: the pure build from source files, npm fetching safety, and the saved copy."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedilora.data import DatasetError, emoji, load_source_dataset
from fedilora.data.emoji import (
    CATEGORIES,
    build_emoji_dataset,
    build_from_sources,
    fetch_npm_package,
    sample_text,
    sha512_integrity,
)


def _build(src: dict[str, Path]) -> datasets.Dataset:
    return build_from_sources(src["emoji_json"], src["images_dir"], src["emojibase_json"])


def _build_record(ds: datasets.Dataset) -> dict:
    """What the build dropped and why, and its sources: kept in the dataset's description."""
    return json.loads(ds.info.description)


def _class_counts(ds: datasets.Dataset) -> dict[str, int]:
    return {name: ds["label"].count(i) for i, name in enumerate(ds.features["label"].names)}


# --------------------------------------------------------------------------- build_from_sources


def test_columns_and_types(emoji_sources):
    ds = _build(emoji_sources)
    assert ds.column_names == ["id", "image", "name", "keywords", "label"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == list(CATEGORIES) == sorted(CATEGORIES)
    assert len(CATEGORIES) == 9
    row = ds[0]
    assert isinstance(row["id"], str) and isinstance(row["name"], str) and isinstance(row["keywords"], str)
    assert row["image"].mode == "RGB" and row["image"].size == (4, 4)


def test_incomplete_entries_dropped_and_counted(emoji_sources):
    ds = _build(emoji_sources)
    assert len(ds) == 27
    assert not {"1F3FB", "1F9FF", "1F9FE", "1F9FD"} & set(ds["id"])
    build = _build_record(ds)["build"]
    assert build == {"dropped_component": 1, "dropped_no_google_image": 1, "dropped_missing_png": 1, "dropped_no_text": 1}


def test_fe0f_stripped_on_both_sides_for_the_join(emoji_sources):
    ds = _build(emoji_sources)
    by_id = {r["id"]: r for r in ds.select_columns(["id", "name", "keywords"])}
    assert by_id["2764"]["name"] == "red heart"  # FE0F only in emoji.json
    assert by_id["1F636-200D-1F32B"]["name"] == "face in clouds"  # FE0F only in data.json, lower case in emoji.json


def test_rgba_composited_on_white(emoji_sources):
    ds = _build(emoji_sources)
    row = next(r for r in ds if r["label"] == CATEGORIES.index("Flags"))
    pixels = np.asarray(row["image"])
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # fully transparent -> white, not black
    assert tuple(pixels[0, 1]) == pytest.approx((255, 127, 127), abs=1)  # half red over white
    assert tuple(pixels[3, 3]) == (120, 110, 100)  # opaque pixel keeps its colour


def test_keywords_joined_and_empty_when_absent(emoji_sources):
    ds = _build(emoji_sources)
    by_id = dict(zip(ds["id"], ds["keywords"]))
    assert by_id["2764"] == "love, heart"
    assert by_id["1F636-200D-1F32B"] == ""


def test_labels_follow_categories(emoji_sources):
    ds = _build(emoji_sources)
    counts = _class_counts(ds)
    assert counts["Smileys & Emotion"] == 7 and counts["Flags"] == 5 and counts["Objects"] == 0
    assert sum(counts.values()) == len(ds)


def test_deterministic_order_independent_of_input_order(emoji_sources, tmp_path):
    first = _build(emoji_sources)
    assert first["id"] == sorted(first["id"])
    entries = json.loads(emoji_sources["emoji_json"].read_text())
    random.Random(1).shuffle(entries)
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(entries))
    second = build_from_sources(shuffled, emoji_sources["images_dir"], emoji_sources["emojibase_json"])
    assert first.to_pandas().equals(second.to_pandas())


def test_unknown_category_is_an_error_not_a_silent_drop(emoji_sources):
    entries = json.loads(emoji_sources["emoji_json"].read_text())
    next(e for e in entries if e["unified"] == "2764-FE0F")["category"] = "Brand New"
    emoji_sources["emoji_json"].write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match="Brand New"):
        _build(emoji_sources)


def test_missing_source_file_named(emoji_sources, tmp_path):
    with pytest.raises(DatasetError, match="nope.json"):
        build_from_sources(tmp_path / "nope.json", emoji_sources["images_dir"], emoji_sources["emojibase_json"])


# --------------------------------------------------------------------------- sample_text


@pytest.mark.parametrize(
    ("field", "keywords", "expected"),
    [
        ("name", "love, heart", "red heart"),
        ("keywords", "love, heart", "love, heart"),
        ("both", "love, heart", "red heart: love, heart"),
        ("keywords", "", "red heart"),
        ("both", "", "red heart"),
    ],
)
def test_sample_text(field, keywords, expected):
    assert sample_text("red heart", keywords, field) == expected


def test_sample_text_rejects_unknown_field():
    with pytest.raises(ValueError, match="text_field"):
        sample_text("a", "b", "label")


# --------------------------------------------------------------------------- the saved copy


def test_saved_copy_loads_as_the_hf_layout_with_its_build_record(emoji_sources, tmp_path):
    ds = _build(emoji_sources)
    ds.save_to_disk(str(tmp_path / "ds"))
    loaded = load_source_dataset(str(tmp_path / "ds"))
    assert loaded["id"] == ds["id"]
    assert _build_record(loaded) == _build_record(ds)  # the build record survives the disk
    assert _build_record(ds)["sources"][0]["package"] == "emoji-datasource-google"


# --------------------------------------------------------------------------- fetch_npm_package


def _tgz(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sha512_integrity(path)


def _forbid_npm(spec: str, dest: Path) -> None:
    raise AssertionError(f"npm must not run for {spec}")


def test_cached_tarball_with_good_integrity_is_reused_and_filtered(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "_npm_pack", _forbid_npm)
    integrity = _tgz(tmp_path / "pkg-1.0.0.tgz", {"package/a.json": b"[]", "package/img/x.png": b"x", "package/big.bin": b"b"})
    out = fetch_npm_package("pkg", "1.0.0", f"sha512-{integrity}", tmp_path, include=("package/a.json", "package/img/"))
    assert (out / "package/a.json").read_bytes() == b"[]"
    assert (out / "package/img/x.png").exists()
    assert not (out / "package/big.bin").exists()


def test_integrity_mismatch_raises_names_file_and_deletes_it(tmp_path, monkeypatch):
    tarball = tmp_path / "pkg-1.0.0.tgz"
    _tgz(tarball, {"package/a.json": b"[]"})
    tampered = tarball.read_bytes()

    def registry_serving_the_same_bad_file(spec: str, dest: Path) -> None:
        (dest / "pkg-1.0.0.tgz").write_bytes(tampered)

    monkeypatch.setattr(emoji, "_npm_pack", registry_serving_the_same_bad_file)
    wrong = "A" * 86 + "=="
    with pytest.raises(DatasetError, match=r"pkg-1\.0\.0\.tgz.*integrity mismatch"):
        fetch_npm_package("pkg", "1.0.0", wrong, tmp_path)
    assert not tarball.exists()


def test_corrupt_cached_tarball_is_fetched_again(tmp_path, monkeypatch):
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    integrity = _tgz(good_dir / "pkg-1.0.0.tgz", {"package/a.json": b"[1]"})
    (tmp_path / "pkg-1.0.0.tgz").write_bytes(b"truncated download")
    monkeypatch.setattr(emoji, "_npm_pack", lambda spec, dest: (dest / "pkg-1.0.0.tgz").write_bytes((good_dir / "pkg-1.0.0.tgz").read_bytes()))
    out = fetch_npm_package("pkg", "1.0.0", integrity, tmp_path)
    assert (out / "package/a.json").read_bytes() == b"[1]"


@pytest.mark.parametrize("evil", ["../evil.txt", "package/../../evil.txt", "/tmp/evil-fedilora.txt"])
def test_path_escaping_member_rejected(tmp_path, monkeypatch, evil):
    monkeypatch.setattr(emoji, "_npm_pack", _forbid_npm)
    cache = tmp_path / "cache"
    cache.mkdir()
    integrity = _tgz(cache / "pkg-1.0.0.tgz", {"package/ok.json": b"{}", evil: b"pwned"})
    with pytest.raises(DatasetError, match="escapes"):
        fetch_npm_package("pkg", "1.0.0", integrity, cache)
    assert not (tmp_path / "evil.txt").exists()
    assert not (cache / "pkg-1.0.0").exists()  # nothing half-extracted left behind


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda _name: None)
    with pytest.raises(DatasetError, match="npm is not installed"):
        fetch_npm_package("pkg", "1.0.0", "x", tmp_path)


# --------------------------------------------------------------------------- the real thing


@pytest.mark.slow
def test_real_emoji_dataset_from_npm(tmp_path):
    ds = build_emoji_dataset(tmp_path / "cache")
    assert 1700 <= len(ds) <= 2000
    assert ds.features["label"].num_classes == 9 and all(n > 0 for n in _class_counts(ds).values())
    assert _build_record(ds)["build"].get("dropped_component", 0) > 0
    for i in (0, len(ds) // 2, len(ds) - 1):
        image = ds[i]["image"]
        assert image.mode == "RGB" and image.size == (64, 64)
    texts = [sample_text(n, k, "keywords") for n, k in zip(ds["name"], ds["keywords"])]
    assert all(texts)
    assert sum(bool(k) for k in ds["keywords"]) > 0.9 * len(ds)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [  # tarballs and their extraction, no temp dirs
        "emoji-datasource-google-16.0.0", "emoji-datasource-google-16.0.0.tgz", "emojibase-data-17.0.0", "emojibase-data-17.0.0.tgz"]
