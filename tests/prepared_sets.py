"""Helpers for tests that feed `prepare` broken data after a good prepared set: run the CLI
in-process, and fingerprint every byte of a data root."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, hidden ones included, plus every folder (so a
    left-over empty staging folder shows too)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def cli(*args: str) -> tuple[int, str]:
    """``fedilora ARGS`` in this process (the real argument parsing and error handling, without
    a new interpreter per call): (exit code, stderr)."""
    from flows import cli as fedilora_cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = fedilora_cli.main(list(args))
    return code, err.getvalue()


def error_line(code: int, stderr: str, command: str = "prepare") -> str:
    """The one error line a failed command prints; fails the test on a traceback, a zero exit
    code or more than one error line."""
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"fedilora {command}: error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]
