"""Columnar tables as datasets: Parquet files and Hugging Face ``datasets`` folders on disk.

- a ``.parquet`` file, or a folder of ``*.parquet`` files (read in name order, one table);
- a folder written by ``datasets.Dataset.save_to_disk``: Arrow IPC streams ``data-*.arrow`` beside
  ``dataset_info.json`` and ``state.json``, read with pyarrow (the ``datasets`` package is not
  needed).

One column holds the labels, one optional column the domains (chosen by name, as for a CSV); every
other column is a feature: a number, or a fixed-length list of numbers (nested lists too, as an
image or embedding column holds). With one list column the samples keep its shape, (n, a, b, ...);
otherwise each row's features are concatenated, (n, F). A label or domain column saved as a
``datasets`` ``ClassLabel`` keeps its class names (from the Hugging Face schema metadata).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.data import Dataset, encode_labels
from fedmoe.errors import InputError


def _pyarrow() -> Any:
    if importlib.util.find_spec("pyarrow") is None:
        raise InputError(
            "Parquet and Arrow data need pyarrow, which is not installed",
            hint="pip install pyarrow  (or pip install 'fedmoe[data]')",
        )
    import pyarrow

    return pyarrow


def is_arrow_folder(folder: Path) -> bool:
    """True for a folder ``datasets`` ``save_to_disk`` wrote: a ``Dataset``'s (or one split of
    a ``DatasetDict``'s), or a whole ``DatasetDict``'s (which is refused when read)."""
    markers = ("state.json", "dataset_info.json", "dataset_dict.json")
    return any((folder / f).is_file() for f in markers) or any(folder.glob("*.arrow"))


def is_parquet_folder(folder: Path) -> bool:
    """True for a folder holding ``*.parquet`` files at its top level."""
    return any(folder.glob("*.parquet"))


def _fail(where: Path, what: str, exc: BaseException) -> InputError:
    detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return InputError(f"{where}: not a readable {what} ({detail})")


def read_parquet(path: Path) -> Any:
    """One ``pyarrow.Table`` from a Parquet file or a folder of them (name order)."""
    _pyarrow()  # the one-line error when pyarrow is missing
    import pyarrow.parquet as pq

    if not path.exists():
        raise InputError(f"{path}: no such file", hint="check the --dataset path")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no .parquet file in the folder")
    return _concat(path, "Parquet", files, pq.read_table)


def read_arrow_folder(folder: Path) -> Any:
    """One ``pyarrow.Table`` from the ``*.arrow`` files of a ``save_to_disk`` folder (name
    order; Arrow IPC streams, as ``datasets`` writes them, or IPC files)."""
    pa = _pyarrow()
    import pyarrow.ipc as ipc

    if (folder / "dataset_dict.json").is_file():
        splits = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_dir())) or "none"
        raise InputError(
            f"{folder}: a DatasetDict (splits: {splits}), not one dataset",
            hint="point --dataset at one split's folder, e.g. " + str(folder / "train"),
        )
    files = sorted(folder.glob("data-*.arrow")) or sorted(folder.glob("*.arrow"))
    if not files:
        raise InputError(
            f"{folder}: no .arrow file", hint="save it with datasets.Dataset.save_to_disk"
        )

    def read(f: Path) -> Any:
        with pa.memory_map(str(f)) as source:
            try:
                return ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return ipc.open_file(source).read_all()

    return _concat(folder, "Arrow", files, read)


def _concat(where: Path, kind: str, files: list[Path], read: Any) -> Any:
    """One table from ``files`` read one by one with ``read``; a file that cannot be read, or
    files of different schemas, are input errors naming the file or ``where``."""
    pa = _pyarrow()
    tables = []
    for f in files:
        try:
            tables.append(read(f))
        except (OSError, pa.ArrowException) as exc:
            raise _fail(f, f"{kind} file", exc) from None
    try:
        return pa.concat_tables(tables)
    except pa.ArrowException as exc:
        raise InputError(
            f"{where}: its {kind} files do not share one schema ({str(exc).splitlines()[0]})",
            hint="keep one split's files in the folder",
        ) from None


def _class_label_names(table: Any, column: str) -> list[str] | None:
    """The names of a ``datasets`` ``ClassLabel`` column, from the schema's Hugging Face
    metadata; None when the column is not one."""
    meta = (table.schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(meta)["info"]["features"] if meta else {}
        feature = features.get(column, {})
        if feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
            return [str(n) for n in feature["names"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # unreadable metadata: fall back to the values themselves
    return None


def _numbers(column: Any, name: str, where: Path) -> np.ndarray:
    """A feature column as float (n, ...): a numeric column, or fixed-length (nested) lists."""
    import pyarrow as pa
    import pyarrow.types as pt

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if arr.null_count:
        raise InputError(f"{where}: feature column '{name}' has missing values", hint="drop them")
    n = len(arr)
    shape: list[int] = []
    while pt.is_list(arr.type) or pt.is_large_list(arr.type) or pt.is_fixed_size_list(arr.type):
        if pt.is_fixed_size_list(arr.type):
            size = int(arr.type.list_size)
        else:
            lengths = arr.value_lengths().to_numpy(zero_copy_only=False)  # (rows at this level,)
            if lengths.size and (lengths != lengths[0]).any():
                raise InputError(
                    f"{where}: feature column '{name}' holds lists of different lengths "
                    f"({int(lengths.min())} to {int(lengths.max())})",
                    hint="pad or truncate them to one length",
                )
            size = int(lengths[0]) if lengths.size else 0
        shape.append(size)
        arr = arr.flatten()
        if arr.null_count:
            raise InputError(f"{where}: feature column '{name}' has missing values")
    if not (pt.is_integer(arr.type) or pt.is_floating(arr.type) or pt.is_boolean(arr.type)):
        raise InputError(
            f"{where}: feature column '{name}' is not numeric ({arr.type})",
            hint="drop or encode it, or name it with --label-column / --domain-column",
        )
    try:
        values = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    except pa.ArrowException as exc:  # pragma: no cover - numeric Arrow arrays convert
        raise _fail(where, f"column '{name}'", exc) from None
    return values.reshape(n, *shape) if n else values.reshape(0, *shape)


def _ids(table: Any, column: str, where: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    import pyarrow.types as pt

    col = table.column(column)
    if col.null_count:
        raise InputError(f"{where}: column '{column}' has missing values", hint="drop those rows")
    if not (
        pt.is_integer(col.type)
        or pt.is_floating(col.type)
        or pt.is_string(col.type)
        or pt.is_large_string(col.type)
    ):
        raise InputError(
            f"{where}: column '{column}' must hold integers or strings, got {col.type}"
        )
    values = np.asarray(col.to_numpy(zero_copy_only=False))
    if values.dtype == object:
        values = values.astype(str)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"{where}: column '{column}' has NaN or Inf", hint="drop those rows")
    ids, names = encode_labels(values, column, str(where))
    declared = _class_label_names(table, column)
    if declared is not None and values.dtype.kind in "iu":
        uniques = np.unique(values)
        if uniques.min() >= 0 and uniques.max() < len(declared):
            names = tuple(declared[int(u)] for u in uniques)
    return ids, names


def table_dataset(table: Any, where: Path, label_column: str, domain_column: str | None) -> Dataset:
    """A :class:`Dataset` from a ``pyarrow.Table`` (see the module docstring)."""
    head = list(table.column_names)
    for col, opt in ((label_column, "--label-column"), (domain_column, "--domain-column")):
        if col is not None and col not in head:
            raise InputError(
                f"{where}: no column '{col}' (columns: {', '.join(head)})",
                hint=f"name the right column with {opt}",
            )
    if table.num_rows == 0:
        raise InputError(f"{where}: no rows")
    features = [c for c in head if c not in (label_column, domain_column)]
    if not features:
        raise InputError(f"{where}: no feature columns besides the label and domain columns")
    blocks = [_numbers(table.column(c), c, where) for c in features]
    if len(blocks) == 1 and blocks[0].ndim > 1:
        x64 = blocks[0]  # (n, *shape) one list column keeps its shape
    else:
        x64 = np.concatenate([b.reshape(b.shape[0], -1) for b in blocks], axis=1)  # (n, F)
    if x64.ndim < 2 or int(np.prod(x64.shape[1:])) == 0:
        raise InputError(f"{where}: the feature columns hold no values")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        x = x64.astype(np.float32)
    if not np.isfinite(x).all():
        raise InputError(
            f"{where}: features contain NaN, Inf or values beyond float32's range",
            hint="clean, impute or rescale them",
        )
    labels, class_names = _ids(table, label_column, where)
    if len(class_names) < 2:
        raise InputError(
            f"{where}: the labels hold {len(class_names)} class; a classifier needs at least 2",
            hint="check the label column",
        )
    if domain_column is not None:
        domain, domain_names = _ids(table, domain_column, where)
    else:
        domain, domain_names = np.zeros(len(labels), np.int64), ("all",)
    return Dataset(
        where.name, x, labels, domain, class_names, domain_names, domain_column is not None
    )
