"""The static registry of built-in data sources: name → summary, raw source and pure transform.

Nothing here reads a file. :func:`fedmoe.io.datasets.load_dataset` reads a source's raw arrays and
applies its transform; ``--help`` text and recipe validation read the names and summaries alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmoe.data.base import Dataset
from fedmoe.data.digits import digits_rot, digits_style
from fedmoe.data.mnist1d import mnist1d_shift
from fedmoe.data.text import text_mix


@dataclass(frozen=True)
class BuiltinSource:
    """One built-in dataset: what ``--help`` says about it and how it is made from raw arrays."""

    summary: str  # one line for --help
    raw: str  # which raw arrays fedmoe.io.datasets reads for it ("uci-digits", "mnist1d")
    transform: Callable[[np.ndarray, np.ndarray], Dataset]  # (raw features, raw labels) -> data


BUILTIN: dict[str, BuiltinSource] = {
    "digits-rot": BuiltinSource(
        "UCI digits, 4 domains: rotated 0/90/180/270 degrees", "uci-digits", digits_rot
    ),
    "digits-style": BuiltinSource(
        "UCI digits, 4 domains: clean/inverted/noisy/blurred", "uci-digits", digits_style
    ),
    "mnist1d-shift": BuiltinSource(
        "MNIST-1D (needs the mnist1d package), 4 domains: plain/reversed/negated/reversed+negated",
        "mnist1d",
        mnist1d_shift,
    ),
    "text-mix": BuiltinSource(
        "text for byte-level language models, 3 domains: Python code, English docs, CSV data",
        "offline-text",
        text_mix,
    ),
}
