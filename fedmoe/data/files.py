"""User data files: ``.npz`` (arrays ``x``, ``y``, optional ``domain``) and ``.csv`` (a header row,
one label column, an optional domain column, every other column a numeric feature)."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from fedmoe.data.base import Dataset, encode_labels
from fedmoe.errors import InputError


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: no such file", hint="check the --dataset path")


def load_npz(path: Path) -> Dataset:
    """Read ``x`` (n, ...) features, ``y`` (n,) labels and an optional ``domain`` (n,) array."""
    _check_file(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            found = ", ".join(sorted(arrays)) or "none"
            raise InputError(
                f"{path}: missing array '{key}' (found: {found})",
                hint="save with np.savez(path, x=features, y=labels, domain=domains)",
            )
    x, y = arrays["x"], arrays["y"]
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2 or x.shape[0] == 0:
        raise InputError(
            f"{path}: 'x' must be a numeric array of shape (n, ...) with n ≥ 1, got {x.shape}"
        )
    if y.ndim != 1:
        raise InputError(f"{path}: 'y' must be one-dimensional (n,), got shape {y.shape}")
    if y.shape[0] != x.shape[0]:
        raise InputError(f"{path}: 'x' has {x.shape[0]} samples but 'y' has {y.shape[0]}")
    labels, class_names = encode_labels(y, "y", str(path))
    has_domains = "domain" in arrays
    if has_domains:
        dom = arrays["domain"]
        if dom.shape[0] != x.shape[0]:
            raise InputError(
                f"{path}: 'x' has {x.shape[0]} samples but 'domain' has {dom.shape[0]}"
            )
        domain, domain_names = encode_labels(dom, "domain", str(path))
    else:
        domain, domain_names = np.zeros(len(labels), np.int64), ("all",)
    xf = x.astype(np.float32)
    if not np.isfinite(xf).all():
        raise InputError(f"{path}: 'x' contains NaN or Inf", hint="clean or impute the features")
    return Dataset(path.name, xf, labels, domain, class_names, domain_names, has_domains)


def load_csv(path: Path, label_column: str, domain_column: str | None) -> Dataset:
    """Read a CSV with a header; features are every column but the label and domain columns."""
    _check_file(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's BOM
            rows = [(i, row) for i, row in enumerate(csv.reader(handle), start=1) if row]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as UTF-8 CSV ({exc})") from None
    if len(rows) < 2:
        raise InputError(f"{path}: needs a header row and at least one data row")
    head = [h.strip() for h in rows[0][1]]
    for col, opt in ((label_column, "--label-column"), (domain_column, "--domain-column")):
        if col is not None and col not in head:
            raise InputError(
                f"{path}: no column '{col}' (columns: {', '.join(head)})",
                hint=f"name the right column with {opt}",
            )
    body = [row for _, row in rows[1:]]
    for lineno, row in rows[1:]:
        if len(row) != len(head):
            raise InputError(f"{path}:{lineno}: {len(row)} fields, the header has {len(head)}")
    cols = list(zip(*body, strict=True))
    li = head.index(label_column)
    di = head.index(domain_column) if domain_column is not None else None
    feat_idx = [i for i in range(len(head)) if i not in (li, di)]
    if not feat_idx:
        raise InputError(f"{path}: no feature columns besides the label and domain columns")
    try:
        x = np.array([cols[i] for i in feat_idx], dtype=np.float32).T  # (n, F)
    except ValueError:
        for i in feat_idx:
            try:
                np.array(cols[i], dtype=np.float32)
            except ValueError:
                raise InputError(
                    f"{path}: feature column '{head[i]}' is not numeric",
                    hint="drop or encode it, or name it with --label-column / --domain-column",
                ) from None
        raise
    if not np.isfinite(x).all():
        raise InputError(f"{path}: features contain NaN or Inf", hint="clean or impute them")
    labels, class_names = encode_labels(np.array(cols[li]), label_column, str(path))
    if di is not None:
        domain, domain_names = encode_labels(np.array(cols[di]), domain_column or "", str(path))
    else:
        domain, domain_names = np.zeros(len(labels), np.int64), ("all",)
    return Dataset(path.name, x, labels, domain, class_names, domain_names, di is not None)
