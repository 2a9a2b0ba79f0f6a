"""The installed packages are exactly the locked ones (requirements.lock), so a test run and the
committed results were produced with the same versions; drift fails here first."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, str]:
    pins = {}
    for number, line in enumerate((ROOT / "requirements.lock").read_text().splitlines(), start=1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"requirements.lock:{number}: expected NAME==VERSION, got {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_installed_versions_match_the_lock():
    drift = []
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drift.append(f"{name}: locked {version}, not installed")
            continue
        if not SpecifierSet(f"=={version}").contains(installed, prereleases=True):  # 2.13.0 matches 2.13.0+cpu
            drift.append(f"{name}: locked {version}, installed {installed}")
    assert not drift, "installed packages differ from requirements.lock (README: Contributing): " + "; ".join(drift)


def test_every_declared_dependency_is_locked_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = locked()
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml: {req.name} is not in requirements.lock; run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {req.specifier}"
        )
