"""The binary companion of a manifest: the large arrays of an affinity artefact or a sync plan
(neighbour lists, the sparse matrices, the transfers) in one safetensors file, so that the JSON
stays human-sized at any scale (issue: M = 65,536 client-experts give ~50 MB of JSON rows).

The manifest names the companion under ``arrays``::

    "arrays": {"path": "aff.arrays.safetensors", "sha256": "…", "bytes": 1234}

with ``path`` relative to the manifest's folder (to the working folder when the manifest travels
through a pipe). The sha256 binds the two: a reader refuses a companion whose bytes changed, and
the manifest's own sha256 (which plans and aggregates record) covers the companion's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.errors import InputError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.digest import sha256_bytes
from fedmoe.io.manifest import relative, resolve

MAX_BYTES = 8 << 30  # a companion above 8 GiB is refused, not read


def stage_arrays(
    outputs: OutputSet, path: Path, arrays: Mapping[str, np.ndarray], base: Path
) -> dict[str, Any]:
    """Stage ``arrays`` as a safetensors file at ``path`` (published with the other outputs) and
    return the manifest's ``arrays`` entry, its path relative to ``base``."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    outputs.write_bytes(path, data)
    return {"path": relative(path, base), "sha256": sha256_bytes(data), "bytes": len(data)}


def load_arrays(entry: Any, base: Path, where: str) -> dict[str, np.ndarray]:
    """The arrays a manifest's ``arrays`` entry names, checked against its sha256."""
    from safetensors.numpy import load

    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("path"), str)
        and isinstance(entry.get("sha256"), str)
    ):
        raise InputError(f"{where}: malformed 'arrays' entry (needs a path and a sha256)")
    path = resolve(entry["path"], base)
    hint = f"keep {Path(entry['path']).name} beside the manifest, or re-create both"
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise InputError(f"{path}: an arrays file is at most {MAX_BYTES >> 30} GiB")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{where}: its arrays file {path} is missing", hint=hint) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the arrays file ({exc.strerror})") from None
    if sha256_bytes(data) != entry["sha256"]:
        raise InputError(f"{path}: its sha256 differs from the one {where} records", hint=hint)
    try:
        return dict(load(data))
    except Exception as exc:  # safetensors raises its own error type on bad files
        raise InputError(
            f"{path}: not a readable arrays file ({str(exc).splitlines()[0]})", hint=hint
        ) from None


def take(arrays: Mapping[str, np.ndarray], name: str, dtype: Any, ndim: int, where: str) -> Any:
    """Array ``name`` of the companion, with its dtype and rank checked."""
    a = arrays.get(name)
    if a is None:
        raise InputError(f"{where}: the arrays file has no '{name}'")
    if a.dtype != np.dtype(dtype) or a.ndim != ndim:
        raise InputError(
            f"{where}: array '{name}' is {a.dtype} with {a.ndim} dimensions, not "
            f"{np.dtype(dtype)} with {ndim}"
        )
    return a


def check_csr(
    indptr: np.ndarray, indices: np.ndarray, rows: int, columns: int, what: str, where: str
) -> None:
    """A CSR layout of ``rows`` rows: starts at 0, non-decreasing, ends at the entry count; every
    row has an entry; every column in ``[0, columns)``."""
    if indptr.shape != (rows + 1,) or int(indptr[0]) != 0 or int(indptr[-1]) != indices.size:
        raise InputError(f"{where}: {what} has a malformed row pointer for {rows} rows")
    counts = np.diff(indptr)
    if (counts < 1).any():
        m = int(np.flatnonzero(counts < 1)[0])
        raise InputError(f"{where}: {what} row {m} is empty")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= columns):
        bad = int(np.flatnonzero((indices < 0) | (indices >= columns))[0])
        raise InputError(
            f"{where}: {what} entry {bad} names column {int(indices[bad])} of {columns}"
        )


def row_of(indptr: np.ndarray, position: int) -> int:
    """The row that entry ``position`` of a CSR layout belongs to."""
    return int(np.searchsorted(indptr, position, side="right") - 1)
