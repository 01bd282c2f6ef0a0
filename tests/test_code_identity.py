"""Code identity (components/code_identity.py): import closures read from the syntax tree, and a
hash that comments and docstrings never change, on a throwaway copy of ``components`` and ``flows``."""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path

import pytest

from components import code_identity
from components.code_identity import code_hash, import_closure

REPO = Path(__file__).resolve().parents[1]
ENTRIES = (
    "components.sources",
    "components.dataset",
    "components.autoencoder_training",
    "components.ldm_training",
    "components.evaluation",
    "components.features",
    "components.metrics",
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of the project's packages; tests edit it freely."""
    for package in ("components", "flows"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _file(root: Path, module: str) -> Path:
    base = root.joinpath(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"


def _write(path: Path, text: str) -> None:
    """Write ``text`` with an mtime safely later than before, as an editor saving it would."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    later = max(path.stat().st_mtime_ns, before + 5_000_000_000)
    os.utime(path, ns=(later, later))


def _edit(root: Path, module: str, old: str, new: str) -> None:
    path = _file(root, module)
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} in {module}"
    _write(path, text.replace(old, new))


def _hashes(root: Path) -> dict[str, str]:
    return {entry: code_hash(entry, root=root) for entry in ENTRIES}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {entry for entry in before if before[entry] != after[entry]}


def _reachers(root: Path, module: str) -> set[str]:
    return {entry for entry in ENTRIES if module in import_closure(entry, root)}


def _reword_docstrings(text: str) -> tuple[str, set[str]]:
    """``text`` with every docstring (module, class, function) in other words and over another
    number of lines, and the kinds of owner it had docstrings in."""
    tree = ast.parse(text)
    owners = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and ast.get_docstring(node, clean=False) is not None
    ]
    lines = text.splitlines(keepends=True)
    for owner in sorted(owners, key=lambda node: node.body[0].lineno, reverse=True):
        docstring = owner.body[0]
        indent = " " * docstring.col_offset
        lines[docstring.lineno - 1 : docstring.end_lineno] = [f'{indent}"""Reworded\n\n{indent}over three lines."""\n']
    return "".join(lines), {type(owner).__name__ for owner in owners}


def _project_imports_by_regex(root: Path, path: Path) -> set[str]:
    """A second reading of a file's absolute project imports, by regex (the real modules have no
    relative ones): ``from package import name`` is the submodule where there is one."""
    text = path.read_text()
    found = set(re.findall(r"^\s*import ((?:components|flows)[\w.]*)", text, re.MULTILINE))
    pattern = r"^\s*from ((?:components|flows)[\w.]*) import (?:\(([^)]*)\)|([\w ,]+?)\s*(?:#.*)?$)"
    for base, wrapped, plain in re.findall(pattern, text, re.MULTILINE):
        names = wrapped or plain
        for name in (part.split(" as ")[0].strip() for part in names.split(",") if part.strip()):
            submodule = root.joinpath(*base.split("."), name)
            is_module = submodule.with_suffix(".py").exists() or (submodule / "__init__.py").exists()
            found.add(f"{base}.{name}" if is_module else base)
    return found


def _neutral(root: Path) -> set[str]:
    """The project's modules that declare ``RESULT_NEUTRAL = True`` (never in a closure but as entry)."""
    files = (root / "components").rglob("*.py")
    return {
        ".".join(f.relative_to(root).with_suffix("").parts)
        for f in files
        if any(line.startswith("RESULT_NEUTRAL = True") for line in f.read_text().splitlines())
    }


# --- closures ------------------------------------------------------------------------------------


def test_the_autoencoder_closure_holds_what_it_imports_and_not_the_diffusion_model(root: Path) -> None:
    closure = import_closure("components.autoencoder_training", root)
    assert closure == sorted(closure)
    direct = {
        "components.distributed",  # from components import distributed
        "components.first_stage",
        "components.grids",
        "components.images",
        "components.losses",
        "components.metrics",
        "components.params",
        "components.training",
    }
    reached = {"components.features"}
    assert {"components.autoencoder_training"} | direct | reached <= set(closure)
    assert {"components.errors", "components.progress", "components.workspace"} <= _neutral(root)
    assert not _neutral(root) & set(closure)  # console, messages and paths shape no result
    for elsewhere in ("components.diffusion", "components.conditioning", "components.ldm_training", "components.runs"):
        assert elsewhere not in closure
    assert all(name.startswith("components.") for name in closure)  # torch, PIL, ... are not followed


def test_every_closure_holds_what_each_of_its_modules_imports(root: Path) -> None:
    for entry in ENTRIES:
        closure = set(import_closure(entry, root))
        for module in closure:
            imported = _project_imports_by_regex(root, _file(root, module)) - _neutral(root)
            assert imported <= closure, (entry, module)


def test_the_closure_of_a_module_that_imports_nothing_of_the_project_is_itself(root: Path) -> None:
    assert import_closure("components.images", root) == ["components.images"]
    assert import_closure("components.pyfunc", root) == ["components.pyfunc"]  # the package's __init__


def test_relative_aliased_and_from_package_imports_resolve_to_project_modules(root: Path) -> None:
    _write(
        root / "components" / "_probe_imports.py",
        "from __future__ import annotations\n"
        "import torch\n"
        "import components.images as im\n"
        "from components import pyfunc, errors as e, not_a_module\n"
        "from . import grids\n"
        "from .workspace import write_atomically\n",
    )
    _write(root / "components" / "pyfunc" / "_probe_sub.py", "from .. import params\nfrom . import autoencoder\n")
    assert import_closure("components._probe_imports", root) == [
        "components",  # from components import not_a_module: a name in the package's __init__
        "components._probe_imports",
        "components.grids",
        "components.images",
        "components.pyfunc",
    ]  # (errors and workspace are RESULT_NEUTRAL)
    sub = import_closure("components.pyfunc._probe_sub", root)
    assert {"components.params", "components.pyfunc.autoencoder", "components.first_stage"} <= set(sub)
    assert "components.pyfunc" not in sub  # from . import autoencoder names the submodule


def test_an_import_inside_a_function_body_counts(root: Path) -> None:
    # components.pyfunc.autoencoder imports the first stage only inside its load function
    assert "components.first_stage" in import_closure("components.pyfunc.autoencoder", root)

    _write(root / "components" / "_probe_lazy.py", "SCALE = 1\n")
    _edit(
        root,
        "components.features",
        "\n\nEXTRACTOR = ",
        "\n\ndef _probe():\n    from components import _probe_lazy\n\n\nEXTRACTOR = ",
    )
    assert "components._probe_lazy" in import_closure("components.metrics", root)
    before = _hashes(root)
    _edit(root, "components._probe_lazy", "SCALE = 1", "SCALE = 2")
    assert (
        _changed(before, _hashes(root))
        == _reachers(root, "components._probe_lazy")
        >= {
            "components.features",
            "components.metrics",
        }
    )


def test_an_unknown_entry_is_refused(root: Path) -> None:
    with pytest.raises(ModuleNotFoundError, match="components.nothing_here"):
        import_closure("components.nothing_here", root)


# --- what changes a hash -------------------------------------------------------------------------


def test_a_comment_or_docstring_edit_keeps_every_hash(root: Path) -> None:
    before = _hashes(root)
    kinds: set[str] = set()
    for module in ("components.first_stage", "components.sources", "components.features"):
        path = _file(root, module)
        text, found = _reword_docstrings(path.read_text())
        kinds |= found
        text = text.replace("\nimport torch\n", "\n# a comment of its own\nimport torch  # and one after code\n", 1)
        _write(path, "# a first line\n" + text + "# a last line\n")
    _edit(root, "components.images", "\nimport torch\n", "\nimport torch  # comment\n")
    assert kinds == {"Module", "ClassDef", "FunctionDef"}
    assert _hashes(root) == before


def test_a_docstring_added_to_a_function_or_emptied_body_keeps_every_hash(root: Path) -> None:
    _write(root / "components" / "_probe_doc.py", "def f():\n    pass\n\n\nclass C:\n    pass\n")
    _edit(root, "components.grids", "\nfrom PIL import", "\nfrom components import _probe_doc\nfrom PIL import")
    before = code_hash("components.grids", root=root)
    _write(
        root / "components" / "_probe_doc.py",
        '"""Now documented."""\n\ndef f():\n    """Only a docstring."""\n\n\nclass C:\n    """Same."""\n',
    )
    assert code_hash("components.grids", root=root) == before


def test_a_changed_constant_changes_exactly_the_hashes_whose_closure_holds_it(root: Path) -> None:
    reachers = _reachers(root, "components.dataset")
    assert {"components.dataset", "components.sources", "components.evaluation"} <= reachers
    assert not reachers & {"components.autoencoder_training", "components.features", "components.metrics"}
    before = _hashes(root)
    _edit(root, "components.dataset", "FORMAT_VERSION = 1", "FORMAT_VERSION = 2")
    assert _changed(before, _hashes(root)) == reachers


@pytest.mark.parametrize(
    "module",
    ["components.images", "components.features", "components.diffusion", "components.params", "components.losses"],
)
def test_a_changed_statement_changes_exactly_the_hashes_whose_closure_holds_it(root: Path, module: str) -> None:
    before = _hashes(root)
    path = _file(root, module)
    _write(path, path.read_text() + "\n_PROBE = 1\n")
    assert _changed(before, _hashes(root)) == _reachers(root, module)


def test_a_hash_of_several_entries_covers_their_union(root: Path) -> None:
    both = code_hash("components.sources", "components.features", root=root)
    assert both == code_hash("components.features", "components.sources", root=root)
    _edit(root, "components.images", "\nimport torch\n", "\nimport torch\n\n_PROBE = 1\n")
    assert code_hash("components.sources", "components.features", root=root) != both


def test_a_new_module_imported_by_an_entry_changes_its_hash_and_removing_it_too(root: Path) -> None:
    _edit(root, "components.grids", "\nfrom PIL import", "\nfrom components import _probe_new\nfrom PIL import")
    without = code_hash("components.grids", root=root)  # the import names no file yet: not in the closure
    _write(root / "components" / "_probe_new.py", "")
    assert "components._probe_new" in import_closure("components.grids", root)
    with_it = code_hash("components.grids", root=root)
    assert with_it != without
    (root / "components" / "_probe_new.py").unlink()
    assert code_hash("components.grids", root=root) == without


def test_a_module_under_another_name_changes_the_hash(root: Path) -> None:
    for name in ("_probe_old", "_probe_renamed"):
        _write(root / "components" / f"{name}.py", "X = 1\n")
    assert code_hash("components._probe_old", root=root) != code_hash("components._probe_renamed", root=root)


# --- neutral modules -----------------------------------------------------------------------------


def test_a_result_neutral_module_is_skipped_but_what_it_imports_is_reached_from_elsewhere(root: Path) -> None:
    probes = {
        "_probe_a": "from components import _probe_neutral, _probe_b\n",
        "_probe_neutral": "from components import _probe_c, _probe_d\n\nRESULT_NEUTRAL = True\nMESSAGE = 'hello'\n",
        "_probe_b": "from ._probe_c import C\n",
        "_probe_c": "C = 1\n",
        "_probe_d": "D = 1\n",
    }
    for name, text in probes.items():
        _write(root / "components" / f"{name}.py", text)
    assert import_closure("components._probe_a", root) == [
        "components._probe_a",
        "components._probe_b",
        "components._probe_c",
    ]
    # as an entry of its own, a neutral module is never skipped
    assert import_closure("components._probe_neutral", root) == [
        "components._probe_c",
        "components._probe_d",
        "components._probe_neutral",
    ]

    before = code_hash("components._probe_a", root=root)
    _edit(root, "components._probe_neutral", "MESSAGE = 'hello'", "MESSAGE = 'bonjour'\nprint(MESSAGE)")
    _edit(root, "components._probe_d", "D = 1", "D = 2")
    assert code_hash("components._probe_a", root=root) == before
    _edit(root, "components._probe_c", "C = 1", "C = 2")
    assert code_hash("components._probe_a", root=root) != before


def test_only_a_top_level_true_result_neutral_marks_a_module(root: Path) -> None:
    for text in ("RESULT_NEUTRAL = False\n", "def f():\n    RESULT_NEUTRAL = True\n", "OTHER = True\n"):
        _write(root / "components" / "_probe_m.py", text)
        _write(root / "components" / "_probe_e.py", "import components._probe_m\n")
        assert "components._probe_m" in import_closure("components._probe_e", root), text
    _write(root / "components" / "_probe_m.py", "RESULT_NEUTRAL: bool = True\n")
    assert import_closure("components._probe_e", root) == ["components._probe_e"]


# --- the parse cache -----------------------------------------------------------------------------


def test_an_edited_file_is_read_again_despite_the_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parses: list[str] = []
    real_parse = ast.parse

    def counting_parse(source, filename="<unknown>", *args, **kwargs):
        parses.append(filename)
        return real_parse(source, filename, *args, **kwargs)

    params = _file(root, "components.params")
    _write(params, params.read_text() + "\n_PROBE = 1\n")
    monkeypatch.setattr(code_identity.ast, "parse", counting_parse)
    before = code_hash(*ENTRIES, root=root)
    assert parses
    parses.clear()
    assert code_hash(*ENTRIES, root=root) == before
    assert parses == []  # warm: nothing parsed again

    # same size, one digit changed, a later mtime
    _edit(root, "components.params", "_PROBE = 1", "_PROBE = 2")
    assert code_hash(*ENTRIES, root=root) != before
    assert parses == [str(root / "components" / "params.py")]


def test_a_syntax_error_names_the_file(root: Path) -> None:
    _edit(root, "components.images", "\nimport torch\n", "\nimport torch\ndef broken(:\n")
    with pytest.raises(SyntaxError, match=r"components/images\.py line \d+"):
        code_hash("components.autoencoder_training", root=root)
