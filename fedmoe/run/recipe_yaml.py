"""Reading a recipe's YAML safely and within bounds: no aliases, a size limit, a nesting limit.

Kept apart from :mod:`fedmoe.run.recipe` (which imports every method, and with them torch) so
that ``fedmoe report`` reads a run's resolved recipe without importing torch.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings; anything larger is refused


class _NoAliasLoader(yaml.SafeLoader):
    """A safe loader that refuses YAML aliases (``*name``): a recipe has no use for them, and
    nested aliases expand exponentially (the "billion laughs")."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"aliases are not allowed in a recipe (alias at line {event.start_mark.line + 1})"
            )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """Parse a recipe's YAML safely and within bounds."""
    if len(text.encode("utf-8")) > MAX_RECIPE_BYTES:
        raise yaml.YAMLError(f"larger than {MAX_RECIPE_BYTES // 1024} KiB")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to be a recipe") from None
