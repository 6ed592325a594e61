"""Data in memory: the :class:`Dataset`, the :class:`DataSpec` that names its source, the label
encoding, feature standardisation, and the built-ins' transforms (digits, MNIST-1D, text) with
their registry :data:`BUILTIN`.

Nothing in this package touches the disk: :func:`fedmoe.io.datasets.load_dataset` reads a
:class:`DataSpec`'s source (a built-in's raw arrays, a user file or folder) into a
:class:`Dataset`.
"""

from __future__ import annotations

from fedmoe.data.base import Dataset, encode_labels
from fedmoe.data.registry import BUILTIN, BuiltinSource
from fedmoe.data.spec import DataSpec

__all__ = ["BUILTIN", "BuiltinSource", "DataSpec", "Dataset", "encode_labels"]
