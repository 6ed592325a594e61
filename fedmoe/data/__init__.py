"""Data sources: the built-in domain-shifted digits and user files (.npz, .csv).

:func:`load_dataset` turns a :class:`DataSpec` (what a partition manifest records) into a
:class:`Dataset`; :data:`BUILTIN` lists the names that need no file.
"""

from fedmoe.data.base import Dataset, DataSpec
from fedmoe.data.registry import BUILTIN, load_dataset

__all__ = ["BUILTIN", "DataSpec", "Dataset", "load_dataset"]
