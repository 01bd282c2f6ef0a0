"""Code identity: which modules make a stage's result, and one hash of their code.

A stage's code is the import closure of its entry module (``components.autoencoder_training``
and every project module it reaches through ``import`` statements, at top level or inside
functions), found by reading the files with ``ast``, never by importing them: a hand-kept file
list misses the modules a stage really imports, and importing would load torch to compute a key.

The hash is of each module's syntax tree without docstrings, not of its bytes: comments and
docstrings never change a result, so editing them must not retrain anything. A module that
cannot change a result either (console output, error messages, tracking helpers) says so with a
top-level ``RESULT_NEUTRAL = True``; it is left out, and the closure is not followed through it.
That is safe because the values that reach results (parameters, data version) are in the run key
on their own. The hash follows the Python version's ``ast.dump``, so a new Python may change it.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "flows")  # the project's own top-level packages, under the root
NEUTRAL_MARKER = "RESULT_NEUTRAL"


@dataclass(frozen=True)
class _Import:
    """One ``import``/``from`` statement, unresolved: ``level`` > 0 for a relative import."""

    level: int
    module: str  # "" for ``from . import x``
    names: tuple[str, ...]  # empty for a plain ``import module``


@dataclass(frozen=True)
class _Parsed:
    canonical: str  # ast.dump of the tree without docstrings
    imports: tuple[_Import, ...]
    neutral: bool


# path -> ((st_mtime_ns, st_size), parsed): a sweep computes dozens of keys from the same files.
_CACHE: dict[Path, tuple[tuple[int, int], _Parsed]] = {}


def import_closure(entry: str, root: Path = REPO) -> list[str]:
    """Sorted dotted names of the project modules ``entry`` reaches through imports, ``entry``
    included; ``RESULT_NEUTRAL`` modules (other than ``entry``) are left out and not followed."""
    root = Path(root)
    if _module_file(entry, root) is None:
        raise ModuleNotFoundError(f"No project module {entry!r} under {root} (a .py file or package __init__.py).")
    found = {entry}
    pending = [entry]
    while pending:
        name = pending.pop()
        for imported in _imports_of(name, root):
            if imported in found or _parse(_module_file(imported, root), root).neutral:
                continue
            found.add(imported)
            pending.append(imported)
    return sorted(found)


def code_hash(*entries: str, root: Path = REPO) -> str:
    """sha256 of the union of the entries' closures: each module's dotted name and syntax tree
    (docstrings removed), in name order, so a renamed, added or removed module counts too."""
    if not entries:
        raise ValueError("code_hash needs at least one entry module.")
    root = Path(root)
    modules = sorted(set().union(*(import_closure(entry, root) for entry in entries)))
    digest = hashlib.sha256()
    for name in modules:
        canonical = _parse(_module_file(name, root), root).canonical.encode()
        digest.update(f"{name}\0{len(canonical)}\0".encode())
        digest.update(canonical)
    return digest.hexdigest()


# --- finding modules -----------------------------------------------------------------------------


def _module_file(name: str, root: Path) -> Path | None:
    """The file of a project module (``pkg/mod.py`` or ``pkg/__init__.py``), None if there is none."""
    parts = name.split(".")
    if parts[0] not in PACKAGES or not all(part.isidentifier() for part in parts):
        return None
    base = root.joinpath(*parts)
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def _imports_of(name: str, root: Path) -> set[str]:
    """The project modules that module ``name``'s import statements name."""
    file = _module_file(name, root)
    is_package = file is not None and file.name == "__init__.py"
    modules: set[str] = set()
    for statement in _parse(file, root).imports:
        if statement.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            if statement.level - 1 > len(package) - 1:
                continue  # beyond the top-level package: Python refuses it too
            package = package[: len(package) - (statement.level - 1)]
            base = ".".join([*package, statement.module] if statement.module else package)
        else:
            base = statement.module
        if not statement.names:  # import a.b.c
            modules.add(base)
            continue
        for imported in statement.names:  # from base import x: the submodule x, else base itself
            submodule = f"{base}.{imported}"
            modules.add(submodule if imported != "*" and _module_file(submodule, root) else base)
    return {module for module in modules if _module_file(module, root) is not None}


# --- reading one file ----------------------------------------------------------------------------


def _parse(file: Path | None, root: Path) -> _Parsed:
    """The canonical tree, imports and neutrality of one file, reparsed only when it changed."""
    assert file is not None  # callers resolve names that exist
    stat = file.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _CACHE.get(file)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    source = file.read_bytes()
    try:
        tree = ast.parse(source, filename=str(file))
    except SyntaxError as error:
        where = file.relative_to(root) if file.is_relative_to(root) else file
        raise SyntaxError(
            f"Cannot compute the code identity: {where} line {error.lineno} does not parse ({error.msg})."
        ) from error
    imports = tuple(_collect_imports(tree))
    neutral = _declares_neutral(tree)
    parsed = _Parsed(_canonical(tree), imports, neutral)
    _CACHE[file] = (stamp, parsed)
    return parsed


def _collect_imports(tree: ast.Module) -> list[_Import]:
    """Every import statement in the file, wherever it is (top level, functions, ``if`` blocks)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(_Import(0, alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            found.append(_Import(node.level, node.module or "", tuple(alias.name for alias in node.names)))
    return found


def _declares_neutral(tree: ast.Module) -> bool:
    """``RESULT_NEUTRAL = True`` (or ``RESULT_NEUTRAL: bool = True``) at the module's top level."""
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        named = any(isinstance(target, ast.Name) and target.id == NEUTRAL_MARKER for target in targets)
        if named and isinstance(value, ast.Constant) and value.value is True:
            return True
    return False


def _canonical(tree: ast.Module) -> str:
    """The tree without docstrings (an emptied body becomes ``pass``), positions left out."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and _is_docstring(
            node.body[0] if node.body else None
        ):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _is_docstring(statement: ast.stmt | None) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def git_state(cwd: str | Path = ".") -> tuple[str, bool]:
    """(commit, dirty) of the repository at ``cwd``; ("unknown", True) outside git."""
    try:
        commit = _git(cwd, "rev-parse", "HEAD")
        dirty = bool(_git(cwd, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, dirty


def _git(cwd: str | Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()
