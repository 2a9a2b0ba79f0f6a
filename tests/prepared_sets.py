"""Helpers for tests that feed `prepare` broken data after a good prepared set: run the CLI
in-process, and fingerprint every byte of a data root."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from tiny_project import call_cli


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, hidden ones included, plus every folder (so a
    left-over empty staging folder shows too)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def cli(*args: str) -> tuple[int, str]:
    """``fedilora ARGS`` in this process (tiny_project.call_cli): (exit code, stderr)."""
    proc = call_cli(None, *args, check=False)
    return proc.returncode, proc.stderr


def error_line(code: int, stderr: str, command: str = "prepare") -> str:
    """The one error line a failed command prints; fails the test on a traceback, a zero exit
    code or more than one error line."""
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"fedilora {command}: error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def rewrite_arrow_rows(root: Path, change: Callable[[list[dict]], None]) -> None:
    """Edit a saved dataset's rows below `datasets` (what a crafted or damaged copy looks like)."""
    arrow = next(root.glob("*.arrow"))
    with pa.memory_map(str(arrow)) as source:
        table = pa.ipc.open_stream(source).read_all()
    rows = table.to_pylist()
    change(rows)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows, schema=table.schema))
