"""A tiny, learnable project for pipeline tests: a saved `datasets` dataset (colour + words
give the label) and a params file for the tiny model, so a whole run takes seconds."""

from __future__ import annotations

from pathlib import Path

import datasets
import yaml
from PIL import Image

from fedilora.config import Params

CLASSES = ["red", "green", "blue"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
WORDS = ["apple cherry", "leaf frog", "sea sky"]


def write_dataset(path: Path, per_class: int = 30) -> Path:
    rows = {"image": [], "name": [], "keywords": [], "label": []}
    for label in range(len(CLASSES)):
        for i in range(per_class):
            shade = (i * 3) % 20
            rows["image"].append(Image.new("RGB", (8, 8), tuple(min(255, c + shade) for c in COLOURS[label])))
            rows["name"].append(f"{CLASSES[label]} thing {i}")
            rows["keywords"].append(WORDS[label])
            rows["label"].append(label)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "name": datasets.Value("string"),
            "keywords": datasets.Value("string"),
            "label": datasets.ClassLabel(names=CLASSES),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def tiny_params(**sections) -> dict:
    """Paths are relative to the project folder: run the CLI (or DVC) from there."""
    params = {
        "seed": 0,
        "data": {"source": "dataset", "root": "data", "max_text_length": 8},
        "clients": {"num_clients": 4, "ranks": [4, 4, 2, 2], "test_fraction": 0.25},
        "missing": {"rate": 0.4, "pattern": "both"},
        "model": {"name": "tiny"},
        "federation": {"rounds": 2, "sample_fraction": 0.5, "batch_size": 8, "lr": 0.01},
        "tracking": {"uri": "mlruns"},
        "runner": {"max_workers": 2},
        "compare": {"variants": ["fedilora+edit", "hetlora"]},
    }
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    return params


def write_project(root: Path, **sections) -> Path:
    """Dataset + params.yaml under ``root``; returns the params path."""
    root.mkdir(parents=True, exist_ok=True)
    write_dataset(root / "dataset")
    path = root / "params.yaml"
    full = Params.model_validate(tiny_params(**sections)).model_dump(mode="json")  # DVC wants every key
    path.write_text(yaml.safe_dump(full, sort_keys=False))
    return path
