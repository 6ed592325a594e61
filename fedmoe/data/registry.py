"""The static registry of built-in data sources and the one loader that reads any source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedmoe.data import digits, files
from fedmoe.data.base import Dataset, DataSpec
from fedmoe.errors import UsageError

# name -> (one-line summary for --help, loader)
BUILTIN: dict[str, tuple[str, Callable[[], Dataset]]] = {
    "digits-rot": ("UCI digits, 4 domains: rotated 0/90/180/270 degrees", digits.digits_rot),
    "digits-style": ("UCI digits, 4 domains: clean/inverted/noisy/blurred", digits.digits_style),
}


def load_dataset(spec: DataSpec) -> Dataset:
    """Load the dataset that ``spec`` names.

    Raises
    ------
    UsageError
        When the name is neither a built-in source nor a path ending in ``.npz`` or ``.csv``.
    InputError
        When the file is missing, malformed, or lacks the required arrays or columns.
    """
    if spec.source in BUILTIN:
        return BUILTIN[spec.source][1]()
    path = Path(spec.source)
    if path.suffix == ".npz":
        return files.load_npz(path)
    if path.suffix == ".csv":
        return files.load_csv(path, spec.label_column, spec.domain_column)
    names = ", ".join(sorted(BUILTIN))
    raise UsageError(
        f"unknown dataset '{spec.source}'",
        hint=f"use a built-in name ({names}) or a path to a .npz or .csv file",
    )
