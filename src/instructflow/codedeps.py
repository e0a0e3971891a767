"""The package's source files a stage's command runs, found by reading imports (``ast``), not listed by hand.

The workflow declares them as each rule's ``code`` input, so editing a module reruns exactly the
stages whose command imports it, directly or through other modules, and what follows them. Every
``import``/``from ... import`` counts wherever it stands (top level, inside a function, under
``if TYPE_CHECKING:``), relative or absolute, as long as it names a module of this package; the
``__init__.py`` of every package on a module's dotted path counts too (Python runs it first).

A stage is a subcommand of ``instructflow`` (cli.py): its files are ``__main__.py``, ``cli.py`` with
what cli.py imports at its top level, and what the subcommand's function ``cmd_<stage>`` imports.
Nothing here imports the modules it reads, so asking costs no torch import.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "instructflow"
ROOT = Path(__file__).resolve().parent  # the package folder these files come from
TOP_LEVEL = "<module>"


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of module ``name`` (``instructflow.x.y``) under ``root``, or None if it is not one."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imported_names(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names of the modules (or module attributes) the import statements under ``node`` name."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            names.update(alias.name for alias in sub.names)
        elif isinstance(sub, ast.ImportFrom):
            if sub.level:
                base = package.split(".")
                base = base[: len(base) - (sub.level - 1)] if sub.level > 1 else base
                prefix = ".".join(base + ([sub.module] if sub.module else []))
            else:
                prefix = sub.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in sub.names if alias.name != "*")
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def _files_for(name: str, root: Path) -> set[Path]:
    """The module's file if ``name`` is one (else its longest module prefix: ``from x import attr``),
    plus the ``__init__.py`` of every package on the way."""
    parts = name.split(".")
    files = set()
    for i in range(1, len(parts) + 1):
        found = module_file(".".join(parts[:i]), root)
        if found is None:
            break
        files.add(found)
    return files


def _direct(path: Path, root: Path, function: str | None = None) -> frozenset[Path]:
    """The package files the imports in ``path`` name: all of them, or those of one function
    (``function``), or those that importing the module runs (``TOP_LEVEL``). Not followed further."""
    return _direct_cached(path, path.stat().st_mtime_ns, root, function)


@functools.lru_cache(maxsize=None)
def _direct_cached(path: Path, mtime_ns: int, root: Path, function: str | None) -> frozenset[Path]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    if function == TOP_LEVEL:  # what importing the module runs: not what its functions import when called
        nodes: list[ast.AST] = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    elif function is not None:
        found = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == function]
        if not found:
            raise LookupError(f"{path.name} has no function {function!r}")
        nodes = found
    else:
        nodes = [tree]
    module = _module_name(path, root)
    names = set().union(*(_imported_names(n, module, _is_package(path)) for n in nodes))
    return frozenset(set().union(*(_files_for(n, root) for n in names)) if names else set())


def closure(start: set[Path], root: Path = ROOT, opaque: frozenset[Path] = frozenset()) -> set[Path]:
    """``start`` and every package file they import, transitively (with their packages' __init__.py).
    Files in ``opaque`` are included but not followed (cli.py: a stage runs one of its functions)."""
    root = root.resolve()
    seen: set[Path] = set()
    todo = [p.resolve() for p in start]
    for p in list(todo):
        todo.extend(_files_for(_module_name(p, root), root))
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path not in opaque:
            todo.extend(_direct(path, root) - seen)
    return seen


def module_files(module: str, root: Path = ROOT) -> set[Path]:
    """Files that importing ``module`` (``instructflow.x``) runs, transitively."""
    found = module_file(module, root)
    if found is None:
        raise LookupError(f"{module}: no such module under {root}")
    return closure({found}, root)


def stage_files(stage: str, root: Path = ROOT) -> set[Path]:
    """Files that ``instructflow <stage>`` runs: the entry points, cli.py's own imports, and the
    imports of its ``cmd_<stage>`` function, each transitively."""
    root = root.resolve()
    cli = root / "cli.py"
    entry = {root / "__main__.py", cli, root / "__init__.py"}
    function = "cmd_" + stage.replace("-", "_")
    return closure(entry | _direct(cli, root, TOP_LEVEL) | _direct(cli, root, function), root, frozenset({cli}))


def code_inputs(stage: str, root: Path = ROOT) -> list[str]:
    """``stage_files`` as sorted strings: a rule's ``code`` input."""
    return sorted(str(p) for p in stage_files(stage, root.resolve()))
