"""YAML for parameters: PyYAML's safe loader, minus what only hurts in a parameter file.

- Aliases (``*name``, and ``<<: *name``) are refused: a few hundred bytes of nested aliases
  expand to billions of nodes once the tree is walked (the "billion laughs"), and a parameter
  file never needs them. The same holds for values read back from a run's logged parameters,
  which anyone with access to the store can edit.
- A key given twice in one mapping is refused: PyYAML keeps the last silently, so the value a
  reader sees first is not the one that runs.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode


class Refused(yaml.MarkedYAMLError):
    """Valid YAML that a parameter file may not hold (an alias, a repeated key)."""


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise Refused(
                None,
                None,
                f"found the alias *{event.anchor}: write the value out (aliases are not read)",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # (an unhashable key is refused by the base class)
            if key in seen:
                raise Refused(
                    None, None, f"the key {key!r} appears twice in one mapping: keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(text: str) -> Any:
    """``yaml.safe_load`` that refuses aliases and duplicate keys (``Refused``, a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
