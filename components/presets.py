"""Parameter presets: YAML files that layer on each other, ``--set`` overrides on top, and where
each value came from.

A preset may name what it extends in the key ``extends:`` (a path relative to the preset, or
``none`` for the schema's defaults alone). Without one it extends ``params/default.yaml``, so a
preset of one key changes that key and nothing else. ``--set dotted.key=value`` comes last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from components import safe_yaml, workspace
from components.errors import UserError
from components.params import Params, describe, flatten

RESULT_NEUTRAL = True  # the values reach a result, through the run key; how they were read does not
EXTENDS = "extends"
SCHEMA = "schema default"
SET = "--set"


@dataclass(frozen=True)
class Resolved:
    params: Params
    origin: dict[str, str]  # dotted key -> the preset that set it, "--set" or "schema default"


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """The preset at ``path`` (with what it extends; None: the schema's defaults) and the
    ``--set`` overrides, validated; ``UserError`` if anything is bad."""
    return resolve(path, overrides).params


def resolve(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Resolved:
    """``load_params``, with where each value came from."""
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer, values in layers(Path(path)) if path is not None else []:
        tree = merge(tree, values)
        origin |= dict.fromkeys(flatten(values), str(layer))
    for assignment in overrides:
        apply_override(tree, assignment)
        origin[assignment.partition("=")[0].strip()] = SET
    try:
        params = Params.model_validate(tree)
    except ValidationError as exc:
        raise UserError(describe(exc, Path(path) if path is not None else None)) from None
    return Resolved(params, {key: _origin_of(key, origin) for key in params.flat()})


def changed_from_defaults(params: Params) -> dict[str, Any]:
    """The keys whose values differ from ``params/default.yaml``'s: what a report names, and
    ``latentlab sweep --set KEY=VALUE ...`` for each reproduces ``params``."""
    defaults = load_params(workspace.default_params()).flat()
    return {key: value for key, value in params.flat().items() if defaults.get(key) != value}


def layers(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The presets ``path`` stands on, the base first, each without its ``extends`` key."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    default = workspace.default_params()
    while True:
        if chain and not path.is_file():
            raise UserError(
                f"{path} does not exist (named by `extends` in {chain[0][0]}, relative to that file's folder): "
                "fix that key, or leave it out to extend params/default.yaml."
            )
        values = read_preset(path)
        if any(path.resolve() == seen.resolve() for seen, _ in chain):
            raise UserError(f"Parameter file {path} extends itself (through {chain[-1][0]}): break the `extends` loop.")
        base = values.pop(EXTENDS, "default")
        chain.insert(0, (path, values))
        if base is None or str(base).lower() == "none" or (base == "default" and path.resolve() == default.resolve()):
            return chain
        path = default if base == "default" else Path(os.path.normpath(path.parent / str(base)))


def read_preset(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"Parameter file {path} does not exist: pass --params with a YAML file.")
    try:
        tree = safe_yaml.load(path.read_text(encoding="utf-8-sig")) or {}  # -sig: a BOM is not a key
    except yaml.YAMLError as exc:
        raise UserError(f"Parameter file {path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"Parameter file {path} is not UTF-8 (byte offset {exc.start}): save it as UTF-8.") from None
    if not isinstance(tree, dict):
        raise UserError(f"Parameter file {path} must hold a mapping of sections (data:, ae:, ...).")
    return tree


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``, section by section (a list or value replaces, a section merges)."""
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = merge(base[key], value) if both else value
    return merged


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value``; the value is read as YAML (``8``, ``true``, ``[1, 2]``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {assignment!r} is not of the form dotted.key=value (e.g. ae.factor=8).")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {part} is a value, not a section.")
    try:
        node[leaf] = safe_yaml.load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not YAML"
        # (safe_yaml's own refusals say what to do; a syntax error is usually a string to quote)
        fix = "" if isinstance(exc, safe_yaml.Refused) else f"; quote it, e.g. --set '{key}=\"{raw}\"'"
        raise UserError(f"--set {assignment!r}: the value is not valid YAML ({problem}){fix}.") from None


def _origin_of(key: str, origin: dict[str, str]) -> str:
    """Who set ``key``: itself, or the section it belongs to (``--set ae={...}``)."""
    while key:
        if key in origin:
            return origin[key]
        key = key.rpartition(".")[0]
    return SCHEMA
