"""The architecture of ``components/`` and ``flows/`` at a git revision or in the working tree.

For the ``.py`` files directly in ``components/`` and ``flows/`` (not tests, not benchmarks) it measures:

1. The internal import graph, from ``ast`` (imports inside functions count): files, arrows, import cycles
   (strongly connected components of more than one module) and levels (the longest import chain, in modules,
   after collapsing each cycle into one node; a module that imports nothing internal is level 1).
2. Upward arrows: arrows into a higher layer of the intended layering (``LAYERS``), plus arrows inside a cycle;
   and two rules: the first stage (first_stage/autoencoders and autoencoder_training) never reaches diffusion or evaluation, and no model module reaches
   ``mlflow`` (through the internal graph plus each module's own third-party imports).
3. Places that decide "f = 1 means pixel space": source lines matching ``PIXEL_PATTERNS``, comment-only lines
   skipped (docstring lines are counted).
4. Lines in ``flows/``: all lines, and lines that are neither blank nor comment-only.

A file with a syntax error (say, mid-edit) is reported and contributes no arrows; it still counts as a module.

    python benchmarks/architecture.py                          # the working tree
    python benchmarks/architecture.py --rev 5c0a03e            # a past commit (git show, no checkout)
    python benchmarks/architecture.py --rev 5c0a03e --compare  # that commit ("before") and the working tree

Writes reports/benchmarks/architecture.json (keys "before" and "after" with --compare).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from collections import deque
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"
PACKAGES = ("components", "flows")
LAYERS = {  # lowest first; a module not listed takes the first layer with a name its own name starts with
    "foundation": ["errors", "contract", "machine", "params", "presets", "images", "workspace"],
    "data": ["sources", "dataset", "dvc", "grids"],
    "models": ["first_stage", "autoencoders", "conditioning", "diffusion", "features", "losses"],
    "computation": ["training", "latents", "metrics", "evaluation", "autoencoder_training", "ldm_training"],
    "records": ["tracking", "runs", "artifacts", "sweep_summary", "report", "report_render"],
}
LAYER_NAMES = [*LAYERS, "orchestration"]  # orchestration: everything in flows/
MODELS = ("first_stage", "autoencoders", "diffusion", "conditioning", "features", "losses")
PIXEL_PATTERNS = [
    r"factor\s*[!=]=\s*1\b",
    r"\bf\s*[!=]=\s*1\b",
    r"\bnet is None\b",
    r"\bnet is not None\b",
    r"\.trainable\b",
    r"pixels-",
    r"startswith\(\"none",
    r"none \(pixel space\)",
]


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def read_sources(rev: str | None) -> dict[str, str]:
    """Path -> text of the .py files directly in the packages, at ``rev`` or in the working tree."""
    if rev is None:
        files = sorted(f for p in PACKAGES for f in (ROOT / p).glob("*.py"))
        return {f.relative_to(ROOT).as_posix(): f.read_text(encoding="utf-8", errors="replace") for f in files}
    paths = git("ls-tree", "--name-only", rev, *(f"{p}/" for p in PACKAGES)).split()
    return {p: git("show", f"{rev}:{p}") for p in paths if p.endswith(".py")}


def imports_of(tree: ast.AST, me: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """(internal modules imported anywhere in the tree, top-level names of third-party imports).
    Imports under ``if TYPE_CHECKING:`` are left out: they name types and never run."""
    internal: set[str] = set()
    external: set[str] = set()
    package = me if me in PACKAGES else me.rsplit(".", 1)[0]
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this package
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                external.add(name.split(".")[0])
                continue
            while name and name not in modules:  # components.x.y -> components.x
                name = name.rpartition(".")[0]
            if name and name != me:
                internal.add(name)
    return internal, external


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Breadth-first from ``start``: each module it reaches (itself included) -> the module that imports it."""
    parent = {start: start}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] - parent.keys()):
            parent[w] = v
            queue.append(w)
    return parent


def chain(parent: dict[str, str], goal: str) -> str:
    links = [goal]
    while parent[links[-1]] != links[-1]:
        links.append(parent[links[-1]])
    return " -> ".join(links[::-1])


def layer_of(module: str) -> int | None:
    package, _, short = module.partition(".")
    if package == "flows":
        return len(LAYER_NAMES) - 1
    for exact in (True, False):
        for level, names in enumerate(LAYERS.values()):
            if any(short == n if exact else short.startswith(n) for n in names):
                return level
    return None


def measure(rev: str | None) -> dict[str, Any]:
    sources = read_sources(rev)
    modules = {p.removesuffix(".py").replace("/", ".").removesuffix(".__init__"): p for p in sources}
    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    errors: list[str] = []
    for name, path in modules.items():
        try:
            tree = ast.parse(sources[path], filename=path)
        except (SyntaxError, ValueError) as e:
            errors.append(f"{path}: {e}")
            tree = ast.Module(body=[], type_ignores=[])
        graph[name], external[name] = imports_of(tree, name, set(modules))

    reach = {v: reachable(graph, v) for v in graph}
    home = {v: frozenset(w for w in reach[v] if v in reach[w]) for v in graph}  # v's cycle, or {v}

    @cache
    def longest(group: frozenset[str]) -> tuple[str, ...]:  # the longest import chain from group, cycles collapsed
        below = [longest(home[w]) for v in group for w in graph[v] if w not in group]
        return (" + ".join(sorted(group)), *max(below, key=len, default=()))

    arrows = sorted((v, w) for v in graph for w in graph[v])
    upward = []
    for v, w in arrows:
        lv, lw = layer_of(v), layer_of(w)
        if home[v] == home[w]:
            upward.append(f"{v} -> {w} (import cycle)")
        elif lv is not None and lw is not None and lw > lv:
            upward.append(f"{v} -> {w} ({LAYER_NAMES[lv]} -> {LAYER_NAMES[lw]})")

    def first(m: str, goal: Callable[[str], bool]) -> list[str]:  # the nearest module reached from m where goal holds
        return [chain(reach[m], v) for v in reach[m] if goal(v)][:1]

    short = {m: m.partition(".")[2] for m in graph}
    stage_rule = "first stage (+ its training) reaches diffusion/evaluation"
    rules: dict[str, list[str]] = {stage_rule: [], "model modules reach mlflow": []}
    for m in sorted(graph):
        if short[m] in ("first_stage", "autoencoders", "autoencoder_training"):
            rules[stage_rule] += first(m, lambda v: short[v] in ("diffusion", "evaluation"))
        if short[m] in MODELS:
            rules["model modules reach mlflow"] += [
                f"{c} -> mlflow" for c in first(m, lambda v: "mlflow" in external[v])
            ]

    pixel = []
    for path, text in sources.items():
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip().startswith("#") and any(re.search(p, line) for p in PIXEL_PATTERNS):
                pixel.append(f"{path}:{n}")

    flow_lines = [line.strip() for p, t in sources.items() if p.startswith("flows/") for line in t.splitlines()]
    deepest = max((longest(c) for c in home.values()), key=len, default=())
    cycles = sorted({tuple(sorted(c)) for c in home.values() if len(c) > 1})
    counts = {
        "files": len(modules),
        "arrows": len(arrows),
        "import cycles": len(cycles),
        "levels": len(deepest),
        "upward arrows": len(upward),
        **{rule: len(found) for rule, found in rules.items()},
        "f = 1 decisions": len(pixel),
        "flows/ lines": len(flow_lines),
        "flows/ code lines": sum(1 for line in flow_lines if line and not line.startswith("#")),
    }
    return {
        "revision": rev or "working tree",
        "counts": counts,
        "parse_errors": errors,
        "import_cycles": [", ".join(c) for c in cycles],
        "longest_chain": [" -> ".join(deepest)],
        "upward_arrows": upward,
        "unlayered": sorted(m for m in modules if layer_of(m) is None),
        **rules,
        "pixel_space_decisions": pixel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git revision to read (default: the working tree)")
    parser.add_argument("--compare", action="store_true", help="--rev as 'before', the working tree as 'after'")
    args = parser.parse_args()
    if args.compare and not args.rev:
        parser.error("--compare needs --rev")

    runs = [measure(args.rev), measure(None)] if args.compare else [measure(args.rev)]
    width = max(len(key) for key in runs[0]["counts"])
    print(f"{'':{width}}" + "".join(f"  {m['revision']:>12}" for m in runs))
    for key in runs[0]["counts"]:
        print(f"{key:{width}}" + "".join(f"  {m['counts'][key]:>12}" for m in runs))
    for m in runs:
        print(f"\n{m['revision']}:")
        for title, items in m.items():
            if isinstance(items, list) and items:
                print(f"  {title.replace('_', ' ')}:" + "".join(f"\n    {item}" for item in items))

    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / "architecture.json"
    report = dict(zip(("before", "after"), runs, strict=True)) if args.compare else runs[0]
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
