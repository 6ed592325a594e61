"""The spec that names where a dataset comes from (what a partition manifest records)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedmoe.data.registry import BUILTIN

IMAGE_SIZE = 32  # side, in pixels, of the square images an image folder is resized to by default
MAX_IMAGE_SIZE = 1024

# DataSpec.options: key -> what it does (for --help, recipe docs and error messages)
DATA_OPTIONS: dict[str, str] = {
    "standardize": "z-score every feature over all samples (.csv, .npz, Parquet, Arrow data)",
    "image_size": f"side in pixels images are resized to (image folders; default {IMAGE_SIZE})",
    "grayscale": "read images as one grey channel instead of three RGB ones (image folders)",
}


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset comes from: a built-in name or a user file, and how to read it."""

    source: str  # built-in name (e.g. "digits-rot") or a path to a file or folder
    label_column: str = "label"  # tables (.csv, Parquet, Arrow): the column holding labels
    domain_column: str | None = None  # tables: the column holding domains, if any
    options: dict[str, Any] = field(default_factory=dict)  # DATA_OPTIONS given (recorded)

    @property
    def is_file(self) -> bool:
        """True when the source is a user file rather than a built-in name."""
        return self.source not in BUILTIN


def option_problem(options: object) -> str | None:
    """What is wrong with a :attr:`DataSpec.options` mapping, naming the key; None when valid."""
    if not isinstance(options, dict):
        return f"options must be a mapping, got {options!r}"
    for key, value in options.items():
        if key not in DATA_OPTIONS:
            return f"unknown data option '{key}' (valid: {', '.join(DATA_OPTIONS)})"
        if key in ("standardize", "grayscale") and not isinstance(value, bool):
            return f"data option '{key}' must be true or false, got {value!r}"
        if key == "image_size" and (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 1 <= value <= MAX_IMAGE_SIZE
        ):
            return f"data option 'image_size' must be an integer in [1, {MAX_IMAGE_SIZE}], got {value!r}"
    return None
