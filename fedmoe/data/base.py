"""The in-memory dataset, and the label encoding every data source shares."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedmoe.errors import InputError


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset whose samples may carry a domain id.

    Arrays are made read-only on construction, so no function can change a dataset it was given.
    """

    name: str  # registry name, or the file name for user data
    x: np.ndarray  # (n, *input_shape) float32 features
    y: np.ndarray  # (n,) int64 labels in [0, num_classes)
    domain: np.ndarray  # (n,) int64 domain ids in [0, num_domains); all zeros when unknown
    class_names: tuple[str, ...]  # label id -> original label
    domain_names: tuple[str, ...]  # domain id -> name; ("all",) when the data has no domains
    has_domains: bool = True  # False when the source gave no domain information

    def __post_init__(self) -> None:
        # read-only views: the dataset cannot be changed through them, the caller's arrays keep
        # their own flags
        for name in ("x", "y", "domain"):
            view = getattr(self, name).view()
            view.setflags(write=False)
            object.__setattr__(self, name, view)

    @property
    def num_samples(self) -> int:
        """Number of samples n."""
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    @property
    def num_domains(self) -> int:
        """Number of domains D (1 when the data has no domains)."""
        return len(self.domain_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(int(s) for s in self.x.shape[1:])

    def fingerprint(self) -> str:
        """sha256 over the features, labels and domains (dtype, shape and bytes)."""
        digest = hashlib.sha256()
        for arr in (self.x, self.y, self.domain):
            digest.update(f"{arr.dtype.str}{arr.shape}".encode())
            digest.update(np.ascontiguousarray(arr).tobytes())
        return digest.hexdigest()


def encode_labels(values: np.ndarray, what: str, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map arbitrary label or domain values to ids 0..K-1 (sorted order); return ids and names.

    Text values that all parse as numbers are sorted numerically, so a CSV column "2", "10" gives
    the same ids as the integer array [2, 10] of an ``.npz`` file.
    """
    if values.ndim != 1:
        raise InputError(f"{where}: '{what}' must be one-dimensional, got shape {values.shape}")
    if values.dtype.kind in "US":
        try:
            numeric = values.astype(np.float64)
        except ValueError:
            numeric = None
        if numeric is not None and np.isfinite(numeric).all():
            if np.array_equal(numeric, np.round(numeric)) and np.abs(numeric).max() < 2.0**53:
                values = numeric.astype(np.int64)
            else:
                values = numeric
    uniques, ids = np.unique(values, return_inverse=True)
    names = tuple(str(u.item() if hasattr(u, "item") else u) for u in uniques)
    return ids.astype(np.int64), names
