"""Writing files, folders and sets of them so that a crash never leaves half of anything.

One file or one folder: write a temporary sibling, then rename it over the target (atomic on
POSIX); the previous one stays until the rename.

A *set* of paths that belong together (a stage's outputs: the prepared dataset, its feature
cache and its statistics) cannot be swapped by one rename, so :func:`staged_set` builds the
whole new set in a staging folder beside the targets, writes a manifest (every part's size and
SHA-256, written last: the commit point), then moves the parts into place. Whoever starts next
finishes or discards what a crash left (:func:`recover`): a staging folder without a manifest
is deleted (the previous set was never touched), one with a manifest is rolled forward (moving
a part is idempotent). A lock file keeps two processes from writing, or recovering, one root at
once. The manifest stays beside the parts, so readers can check that they still belong
together (:func:`changed_parts`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = "fedilora-set/1"
LOCK_FILE = ".fedilora.lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users of a shared dir
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` (the
    previous folder is moved aside, then deleted), on error it is removed and ``path`` is untouched.

    Two renames, so a crash between them leaves the previous folder as ``.<name>.old`` beside an
    absent ``path``; the next successful call cleans it up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the folder from other users of a shared dir
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: dict) -> None:
    """Atomic: a crash leaves the previous file, never half of a new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- sets of paths


class SetLocked(RuntimeError):
    """Another process holds the root's lock (it is writing a set there)."""


def staging_dir(root: Path, name: str) -> Path:
    return Path(root) / f".{name}.staging"


def manifest_path(root: Path, name: str) -> Path:
    return Path(root) / f"{name}.manifest.json"


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on ``root`` for the duration; fails at once if another process holds it
    (the kernel releases it when a process dies, even by ``kill -9``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SetLocked(f"{root}: another fedilora process is writing here ({root / LOCK_FILE}); wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def describe(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, or of every file under a folder (by relative path)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"files": {p.relative_to(path).as_posix(): describe(p) for p in files}}
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk: the manifest must never reach the disk
    before the parts it vouches for."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_file() or p.is_dir():
            _fsync(p)


def _set_id(parts: dict[str, Any], meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"parts": parts, "meta": meta}, sort_keys=True).encode()).hexdigest()


def _write_manifest(staging: Path, name: str, meta: dict[str, Any]) -> None:
    parts = {p.name: describe(p) for p in sorted(staging.iterdir())}
    _fsync_tree(staging)
    manifest = {"format": MANIFEST_FORMAT, "set": name, "id": _set_id(parts, meta), "meta": meta, "parts": parts}
    target = staging / manifest_path(staging, name).name
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync(tmp)
    _fsync(staging)  # the rename itself: from here on the new set is committed


def _roll_forward(root: Path, name: str) -> None:
    """Move every staged part over its target, then the manifest; safe to repeat after a crash
    at any point, since a part already moved is simply no longer in the staging folder."""
    staging = staging_dir(root, name)
    staged_manifest = staging / manifest_path(root, name).name
    manifest = json.loads(staged_manifest.read_text())
    replaced = staging / ".replaced"
    for part in manifest["parts"]:
        src, dst = staging / part, root / part
        if not src.exists():
            continue
        if dst.is_dir() or (dst.exists() and src.is_dir()):  # rename cannot replace a folder: move it aside
            replaced.mkdir(exist_ok=True)
            shutil.rmtree(replaced / part, ignore_errors=True)
            dst.rename(replaced / part)
        os.replace(src, dst)
    os.replace(staged_manifest, manifest_path(root, name))
    _fsync(root)
    shutil.rmtree(staging)


def recover(root: Path, name: str) -> None:
    """Finish (manifest written) or discard (no manifest) what an interrupted commit left.
    The caller holds the root's lock."""
    staging = staging_dir(root, name)
    if not staging.exists():
        return
    if (staging / manifest_path(root, name).name).is_file():
        _roll_forward(Path(root), name)
    else:
        shutil.rmtree(staging)


@contextlib.contextmanager
def staged_set(root: str | Path, name: str, meta: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder inside ``root``; write each part of the new set into it
    (a file or a folder, named as its target in ``root``). On success the set is committed
    (manifest ``<name>.manifest.json``, then every part moved into ``root``); on any error,
    Ctrl-C included, the staging folder is deleted and ``root`` is as it was."""
    root = Path(root)
    staging = staging_dir(root, name)
    with root_lock(root):
        recover(root, name)
        staging.mkdir()
        committed = False
        try:
            yield staging
            _write_manifest(staging, name, meta or {})
            committed = True
            _roll_forward(root, name)
        finally:
            if not committed:
                shutil.rmtree(staging, ignore_errors=True)


def read_manifest(root: Path, name: str) -> dict[str, Any] | None:
    """The committed manifest of set ``name`` in ``root``, after finishing an interrupted commit;
    None if there is none (or it is not one of ours)."""
    root = Path(root)
    if staging_dir(root, name).exists():  # only then: a read-only root needs no lock to be read
        with root_lock(root):
            recover(root, name)
    path = manifest_path(root, name)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("parts"), dict):
        return None
    return manifest


def changed_parts(root: Path, manifest: dict[str, Any]) -> list[str]:
    """The parts of a committed set whose files no longer match its manifest (changed, added,
    removed): a data root whose parts do not belong together."""
    root = Path(root)
    changed = []
    for part, recorded in manifest["parts"].items():
        path = root / part
        if not path.exists() or describe(path) != recorded:
            changed.append(part)
    return changed
