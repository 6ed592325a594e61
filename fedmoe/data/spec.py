"""The spec that names where a dataset comes from (what a partition manifest records)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedmoe.data.registry import BUILTIN


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset comes from: a built-in name or a user file, and how to read it."""

    source: str  # built-in name (e.g. "digits-rot") or a path to a .npz / .csv file
    label_column: str = "label"  # CSV only: the column holding labels
    domain_column: str | None = None  # CSV only: the column holding domains, if any
    options: dict[str, Any] = field(default_factory=dict)  # reserved for source-specific options

    @property
    def is_file(self) -> bool:
        """True when the source is a user file rather than a built-in name."""
        return self.source not in BUILTIN
