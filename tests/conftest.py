"""Shared pytest setup: markers, and a tiny emoji source set in the real npm file formats."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

# The CLI sets these in its entry point (flows/__init__.py); tests that call the library in
# process need them too: offline, no telemetry.
for _name, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                      "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)

# Categories of the tiny fixture; one entry per (category, index) below, plus edge cases.
_FIXTURE_CATEGORIES = ("Smileys & Emotion", "Animals & Nature", "Food & Drink", "Flags", "Symbols")
FIXTURE_COLOURS = {c: (40 * i, 200 - 30 * i, 100, 255) for i, c in enumerate(_FIXTURE_CATEGORIES)}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: needs the network or takes seconds; still runs by default")
    # Flows run in this process (tiny_project.call_cli) report to one Prefect server, started on
    # the first flow run, with a database of this session's own: never the user's ~/.prefect or
    # a server PREFECT_API_URL names. Set before Prefect is imported (it reads them then).
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_HOME"] = config.stash[_PREFECT_HOME] = tempfile.mkdtemp(prefix="fedilora-tests-prefect-")


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_PREFECT_HOME, None)
    if home is None:
        return
    server = _prefect_server()
    if server is not None:
        server.stop()
    shutil.rmtree(home, ignore_errors=True)


_PREFECT_HOME = pytest.StashKey[str]()


def _prefect_server():
    """This process's ephemeral Prefect server, if a flow started it."""
    import sys

    module = sys.modules.get("prefect.server.api.server")
    return None if module is None else module.SubprocessASGIServer._instances.get(None)


def _png(path: Path, colour: tuple[int, int, int, int]) -> None:
    """4x4 RGBA: pixel (0, 0) fully transparent, (1, 0) half-transparent red, the rest opaque."""
    img = Image.new("RGBA", (4, 4), colour)
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 128))
    img.save(path)


def _write_emoji_sources(root: Path) -> dict[str, Path]:
    images_dir = root / "img"
    images_dir.mkdir(parents=True)
    entries, texts = [], []
    for c, category in enumerate(_FIXTURE_CATEGORIES):
        for i in range(5):
            code = f"1F{c + 3}{i:02X}"
            entries.append({"unified": code, "name": f"EMOJI {c} {i}", "category": category,
                            "image": f"{code.lower()}.png", "has_img_google": True})
            texts.append({"hexcode": code, "label": f"emoji {c} {i}", "tags": [f"tag{c}", f"word{i}"]})
    # FE0F on the image side only, then on the text side only: both must join.
    entries.append({"unified": "2764-FE0F", "name": "HEAVY BLACK HEART", "category": "Smileys & Emotion",
                    "image": "2764-fe0f.png", "has_img_google": True})
    texts.append({"hexcode": "2764", "label": "red heart", "tags": ["love", "heart"]})
    entries.append({"unified": "1f636-200d-1f32b", "name": "FACE IN CLOUDS", "category": "Smileys & Emotion",
                    "image": "1f636-200d-1f32b.png", "has_img_google": True})
    texts.append({"hexcode": "1F636-200D-1F32B-FE0F", "label": "face in clouds"})  # no tags
    # Edge cases that must be dropped.
    entries.append({"unified": "1F3FB", "name": "SKIN TONE 1", "category": "Component",
                    "image": "1f3fb.png", "has_img_google": True})
    texts.append({"hexcode": "1F3FB", "label": "light skin tone", "tags": ["skin"]})
    entries.append({"unified": "1F9FF", "name": "NO GOOGLE", "category": "Objects",
                    "image": "1f9ff.png", "has_img_google": False})
    texts.append({"hexcode": "1F9FF", "label": "no google", "tags": ["x"]})
    entries.append({"unified": "1F9FE", "name": "PNG MISSING", "category": "Objects",
                    "image": "1f9fe.png", "has_img_google": True})
    texts.append({"hexcode": "1F9FE", "label": "png missing", "tags": ["x"]})
    entries.append({"unified": "1F9FD", "name": "NO TEXT", "category": "Objects",
                    "image": "1f9fd.png", "has_img_google": True})
    for e in entries:
        if e["image"] != "1f9fe.png":
            _png(images_dir / e["image"], FIXTURE_COLOURS.get(e["category"], (0, 0, 255, 255)))
    (root / "emoji.json").write_text(json.dumps(entries[::-1]))  # reversed: output order must not depend on input
    (root / "data.json").write_text(json.dumps(texts))
    return {"emoji_json": root / "emoji.json", "images_dir": images_dir, "emojibase_json": root / "data.json"}


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose data root (``data/``) holds a good prepared set of the tiny dataset and
    model, made once per session in-process. Tests that feed `prepare` broken data on top of it
    must leave it byte-identical (and check that they do)."""
    from prepared_sets import cli
    from tiny_project import write_project

    root = tmp_path_factory.mktemp("prepared")
    params = write_project(root, data={"source": str(root / "dataset"), "root": str(root / "data")})
    code, stderr = cli("prepare", "--params", str(params))
    assert code == 0, stderr
    return root


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store, made once: ``tiny_project.seed_mlflow_store`` copies it into projects."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


@pytest.fixture
def emoji_sources(tmp_path: Path) -> dict[str, Path]:
    """Paths (emoji_json, images_dir, emojibase_json) of a 31-emoji fixture for build_from_sources."""
    return _write_emoji_sources(tmp_path / "emoji_src")
