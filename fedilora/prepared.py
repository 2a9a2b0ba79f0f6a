"""Whether a data root's parts belong together: the prepared set (dataset, feature cache,
statistics) is the one ``prepare`` committed, and the splits the ones ``split`` made from it
(each set's manifest of content hashes; ``fedilora.atomic.staged_set``). Every stage that reads
the data root checks this first (docs/data.md, "What prepare guarantees")."""

from __future__ import annotations

from typing import Any

from fedilora.atomic import SetLocked, changed_parts, manifest_path, read_manifest
from fedilora.data.records import DatasetError
from fedilora.paths import DataPaths

PREPARE, SPLIT = "prepare", "split"  # the two sets of paths, by the command that writes them


def _checked_manifest(paths: DataPaths, name: str) -> dict[str, Any]:
    command = f"fedilora {name}"
    try:
        manifest = read_manifest(paths.root, name)
    except SetLocked as err:
        raise DatasetError(str(err)) from None
    if manifest is None:
        raise DatasetError(
            f"{manifest_path(paths.root, name)}: not found or unreadable, so {paths.root} holds no complete "
            f"`{command}` output; run `{command}`"
        )
    changed = changed_parts(paths.root, manifest)
    if changed:
        raise DatasetError(
            f"{', '.join(str(paths.root / part) for part in changed)}: changed since `{command}` wrote them "
            f"(they no longer match {manifest_path(paths.root, name)}), so the parts of {paths.root} do not "
            f"belong together; rerun `{command}`"
        )
    return manifest


def check_prepared(paths: DataPaths, splits: bool = True) -> dict[str, Any]:
    """Refuse a data root whose parts do not belong together: the prepared dataset, feature cache
    and statistics must be the set `prepare` committed, and (``splits``) the splits and their
    statistics the set `split` made from it. Finishes a commit a crash interrupted; returns the
    prepare manifest. Hashes every file of both sets (docs/data.md: its cost)."""
    prepared = _checked_manifest(paths, PREPARE)
    if splits:
        made = _checked_manifest(paths, SPLIT)
        if (made.get("meta") or {}).get(PREPARE) != prepared.get("id"):
            raise DatasetError(
                f"{paths.splits}: made from another prepared set than the one now in {paths.root} "
                f"(`fedilora prepare` ran since); rerun `fedilora split`"
            )
    return prepared
