"""The code's shape, read from the source: no import cycles, no upward imports, every module a DVC
stage runs declared in that stage's deps, and no reference to a file the repository lacks."""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedilora", "tasks", "flows")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every project module (tests beside the methods excluded), by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if not path.name.startswith("test_"):
                found[_module_name(path)] = path
    return found


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (``fedilora.lora.State`` -> ``fedilora.lora``)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


def _walk(node: ast.AST):
    """``ast.walk`` without ``if TYPE_CHECKING:`` blocks (they never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for c in child.orelse for n in [c, *_walk(c)])
            continue
        yield child
        yield from _walk(child)


def _imports(node: ast.AST, module: str) -> set[str]:
    """Project modules imported anywhere under ``node`` (module level and inside functions)."""
    out = set()
    package = module if modules()[module].name == "__init__.py" else module.rpartition(".")[0]
    for item in _walk(node):
        if isinstance(item, ast.Import):
            names = [a.name for a in item.names]
        elif isinstance(item, ast.ImportFrom):
            base = item.module or ""
            if item.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - item.level + 1] + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name``, the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in item.names]
        else:
            continue
        out.update(m for m in map(_resolve, names) if m and m != module)
    return out


@cache
def graph() -> dict[str, set[str]]:
    return {name: _imports(ast.parse(path.read_text()), name) for name, path in modules().items()}


def _parents(module: str) -> set[str]:
    """Packages whose ``__init__`` runs when ``module`` is imported."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(modules())


def test_no_import_cycles() -> None:
    """Explicit imports only (a package importing its own submodules is how packages work), and
    imports inside functions count: they must not be there to dodge a cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph()[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph()):
        if name not in state:
            visit(name)


def test_no_upward_imports() -> None:
    """The library knows nothing of the tasks and flows; the tasks nothing of the flows."""
    above = {"fedilora": ("tasks", "flows"), "tasks": ("flows",), "flows": ()}
    for name, imported in graph().items():
        for other in imported:
            assert not other.startswith(above[name.split(".")[0]]), f"{name} imports {other}, a layer above it"


def _closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph()[name] | _parents(name))
    return seen


def stage_modules(cmd: str) -> set[str]:
    """The project modules ``bin/fedilora <command>`` runs: the CLI's module-level imports and
    its command function's, then everything they import, transitively."""
    command = cmd.split()[1]
    cli = ast.parse(modules()["flows.cli"].read_text())
    function = next(n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == f"cmd_{command}")
    top = ast.Module(body=[n for n in cli.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    return _closure(_imports(top, "flows.cli") | _imports(function, "flows.cli") | _parents("flows.cli")) | {"flows.cli"}


def _covered(path: Path, deps: list[str], wdir: Path) -> bool:
    targets = [(wdir / d).resolve() for d in deps]
    return any(path == t or t in path.parents for t in targets)


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "study/dvc.yaml"])
def test_stage_deps_cover_the_modules_the_stage_runs(dvc_file: str) -> None:
    spec = yaml.safe_load((REPO / dvc_file).read_text())
    for name, stage in spec["stages"].items():
        wdir = (REPO / dvc_file).parent / stage.get("wdir", ".")
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        assert stage["cmd"].startswith("bin/fedilora "), f"{dvc_file}: stage {name} must run bin/fedilora (the project's interpreter)"
        assert _covered(REPO / "bin/fedilora", deps, wdir), f"{dvc_file}: stage {name} does not list bin/fedilora in deps"
        missing = sorted(str(modules()[m].relative_to(REPO)) for m in stage_modules(stage["cmd"])
                         if not _covered(modules()[m], deps, wdir))
        assert not missing, f"{dvc_file}: stage {name} runs {missing} but does not list them in deps"


def test_stage_modules_follow_function_level_imports() -> None:
    """The analysis sees what a command imports inside its function (the CLI imports lazily)."""
    assert {"fedilora.stages", "fedilora.data.splits"} <= stage_modules("bin/fedilora split")
    assert "fedilora.metrics" in stage_modules("bin/fedilora federate")
    assert "fedilora.report" in stage_modules("bin/fedilora report")


def test_no_reference_to_files_outside_the_repository() -> None:
    """The project documents itself (docs/method.md): every document it cites by an all-caps name
    (README.md, FINDINGS.md, ...) is one the repository ships, so nothing points at a design file
    that lives beside it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    shipped = {Path(f).name for f in tracked}
    cited = {(f, name) for f in tracked if f.endswith((".py", ".md", ".yaml", ".toml"))
             for name in re.findall(r"\b[A-Z][A-Z_]+\.md\b", (REPO / f).read_text(errors="ignore"))}
    offenders = sorted(f"{f} cites {name}" for f, name in cited if name not in shipped)
    assert not offenders, f"documents the repository does not contain: {offenders}"
