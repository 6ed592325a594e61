"""Reading datasets from disk: the built-ins' raw arrays and user files.

:func:`load_dataset` turns a :class:`~fedmoe.data.DataSpec` (what a partition manifest records)
into a :class:`~fedmoe.data.Dataset`. A built-in name reads its raw arrays here (the UCI digits
from scikit-learn's packaged CSV) and applies its pure transform from :mod:`fedmoe.data`; a path
reads a user file:

- ``.npz``: arrays ``x`` (n, ...), ``y`` (n,) and an optional ``domain`` (n,);
- ``.csv``: a header row, one label column, an optional domain column, every other column a
  numeric feature;
- ``.parquet`` (a file or a folder of them) and a ``datasets.Dataset.save_to_disk`` folder: label
  and domain columns by name, as for a CSV (:mod:`fedmoe.io.tables`);
- ``.jsonl`` and a folder of text with one sub-folder per domain: byte windows for language models;
- a folder of images laid out ``root/<domain>/<class>/<image>`` (:mod:`fedmoe.io.images`).

The spec's options (:data:`fedmoe.data.spec.DATA_OPTIONS`) say how: ``standardize`` z-scores the
features of a table (.csv, .npz, Parquet, Arrow); ``image_size`` and ``grayscale`` shape images.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedmoe.data import BUILTIN, Dataset, DataSpec, encode_labels
from fedmoe.data.spec import IMAGE_SIZE, option_problem
from fedmoe.data.standardize import standardized
from fedmoe.errors import InputError, UsageError


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (1797, 8, 8) in [0, 16] and int64 labels, read from scikit-learn's packaged CSV.

    Raises
    ------
    InputError
        When scikit-learn is not installed.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the built-in digits need scikit-learn, which is not installed",
            hint="pip install scikit-learn",
        )
    csv_gz = (
        Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    )
    if csv_gz.is_file():  # read the file directly: importing sklearn costs about a second
        with gzip.open(csv_gz, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - layout of a future scikit-learn
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
    return pixels.reshape(-1, 8, 8), labels.astype(np.int64)


def _sklearn_root() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the built-in datasets need scikit-learn, which is not installed",
            hint="pip install scikit-learn",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def raw_text_mix() -> tuple[np.ndarray, np.ndarray]:
    """The bytes of ``text-mix`` and each byte's domain (0 code, 1 prose, 2 data), from files every
    Python installation with scikit-learn has: the standard library's top-level modules (code),
    Python's documentation topics (``pydoc_data.topics``) and scikit-learn's dataset descriptions
    (prose), and scikit-learn's packaged CSV tables (data)."""
    import sysconfig

    code = b"".join(p.read_bytes() for p in sorted(Path(sysconfig.get_path("stdlib")).glob("*.py")))
    try:
        from pydoc_data.topics import topics

        docs = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    except ImportError:  # pragma: no cover - a Python built without its docs
        docs = b""
    sk = _sklearn_root() / "datasets"
    docs += b"".join(p.read_bytes() for p in sorted((sk / "descr").glob("*.rst")))
    tables = []
    for p in sorted((sk / "data").glob("*.csv*")):
        tables.append(gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes())
    data = b"".join(tables)
    streams = [code, docs, data]
    raw = np.frombuffer(b"".join(streams), dtype=np.uint8)
    domain = np.repeat(np.arange(3, dtype=np.int64), [len(t) for t in streams])
    return raw, domain


# MNIST-1D's generation parameters (the paper's defaults, pinned here so that a change of the
# package's defaults cannot change the data), with 4,000 signals per domain of mnist1d-shift
MNIST1D_ARGS = {
    "num_samples": 16_000,
    "train_split": 0.8,  # the generator's own split; fedmoe joins both parts
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}


@functools.lru_cache(maxsize=1)
def raw_mnist1d() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D signals (16000, 40) float64 and int64 labels, generated by the ``mnist1d``
    package from its templates (never downloaded); generated once per process (about 10 s).

    The generator seeds NumPy's and Python's global random generators; their states are saved
    and restored around it, so the caller's randomness is untouched. The arrays are read-only.

    Raises
    ------
    InputError
        When the ``mnist1d`` package is not installed.
    """
    if importlib.util.find_spec("mnist1d") is None:
        raise InputError(
            "the built-in MNIST-1D needs the mnist1d package, which is not installed",
            hint="pip install mnist1d  (or pip install 'fedmoe[data]')",
        )
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        for key, value in MNIST1D_ARGS.items():
            setattr(args, key, value)
        made = make_dataset(args)  # seeds the global generators from args.seed
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([made["x"], made["x_test"]]).astype(np.float64)  # (n, 40)
    y = np.concatenate([made["y"], made["y_test"]]).astype(np.int64)  # (n,)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


# BuiltinSource.raw -> the reader of those raw (features, labels) arrays
RAW_READERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "uci-digits": raw_digits,
    "offline-text": raw_text_mix,
    "mnist1d": raw_mnist1d,
}


MAX_TEXT_BYTES = 1 << 30  # a text dataset larger than this is refused


def load_jsonl(path: Path) -> Dataset:
    """A JSON Lines file of ``{"text": ..., "domain": ...}`` objects (``domain`` optional) as byte
    windows (:func:`fedmoe.data.text.byte_windows`), each domain's texts joined in file order."""
    import json

    from fedmoe.data.text import byte_windows

    _check_file(path)
    by_domain: dict[str, list[bytes]] = {}
    has_domains = False
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise InputError(f"{path}: larger than {MAX_TEXT_BYTES >> 30} GiB")
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    raise InputError(f"{path}:{lineno}: not a JSON object") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise InputError(f"{path}:{lineno}: needs a string 'text' field")
                dom = obj.get("domain", "all")
                if "domain" in obj:
                    has_domains = True
                if not isinstance(dom, (str, int)) or isinstance(dom, bool):
                    raise InputError(f"{path}:{lineno}: 'domain' must be a string or integer")
                by_domain.setdefault(str(dom), []).append(obj["text"].encode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as UTF-8 JSON Lines ({exc})") from None
    if not by_domain:
        raise InputError(f"{path}: no text", hint="one JSON object with a 'text' field per line")
    names = tuple(sorted(by_domain))
    data = byte_windows([b"\n".join(by_domain[n]) for n in names], names, path.name)
    return data if has_domains else _no_domains(data)


def load_text_folder(path: Path) -> Dataset:
    """A folder with one sub-folder per domain of text files (any suffix, read as UTF-8 bytes),
    as byte windows; each domain's files are joined in name order."""
    from fedmoe.data.text import byte_windows

    domains = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise InputError(
            f"{path}: no sub-folder", hint="put each domain's text files in a sub-folder"
        )
    streams, total = [], 0
    for d in domains:
        files = sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
        parts = []
        for f in files:
            total += f.stat().st_size
            if total > MAX_TEXT_BYTES:
                raise InputError(f"{path}: more than {MAX_TEXT_BYTES >> 30} GiB of text")
            parts.append(f.read_bytes())
        streams.append(b"\n".join(parts))
    return byte_windows(streams, tuple(d.name for d in domains), path.name)


def _no_domains(data: Dataset) -> Dataset:
    return Dataset(
        data.name, data.x, data.y, data.domain, data.class_names, data.domain_names, False
    )


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
    if (
        not np.issubdtype(x.dtype, np.number)
        or np.issubdtype(x.dtype, np.complexfloating)
        or x.ndim < 2
        or x.shape[0] == 0
        or int(np.prod(x.shape[1:])) == 0
    ):
        raise InputError(
            f"{path}: 'x' must be a real numeric array of shape (n, ...) with n ≥ 1 and at least "
            f"one feature, got {x.dtype} {x.shape}"
        )
    for key, arr in (("y", y), ("domain", arrays.get("domain"))):
        if arr is not None and arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise InputError(f"{path}: '{key}' contains NaN or Inf", hint="drop those samples")
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
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        xf = x.astype(np.float32)
    _two_classes(class_names, path)
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
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
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
        raise InputError(
            f"{path}: features contain NaN, Inf or values beyond float32's range",
            hint="clean, impute or rescale them",
        )
    raw_labels = np.array(cols[li])
    if any(v.strip().lower() in ("", "nan", "inf", "-inf", "+inf") for v in raw_labels):
        raise InputError(
            f"{path}: column '{label_column}' has empty or NaN labels", hint="drop those rows"
        )
    labels, class_names = encode_labels(raw_labels, label_column, str(path))
    _two_classes(class_names, path)
    if di is not None:
        domain, domain_names = encode_labels(np.array(cols[di]), domain_column or "", str(path))
    else:
        domain, domain_names = np.zeros(len(labels), np.int64), ("all",)
    return Dataset(path.name, x, labels, domain, class_names, domain_names, di is not None)


def load_dataset(spec: DataSpec) -> Dataset:
    """Load the dataset that ``spec`` names, read as its options say.

    Parameters
    ----------
    spec
        A built-in name (see :data:`fedmoe.data.BUILTIN`), or a path: a ``.npz``, ``.csv``,
        ``.parquet`` or ``.jsonl`` file, or a folder (of Parquet files, of ``save_to_disk``
        Arrow files, of images by domain and class, or of text by domain), with a table's label
        and domain columns.

    Returns
    -------
    Dataset
        The data, arrays read-only.

    Raises
    ------
    UsageError
        When the name is neither a built-in source nor a readable kind of path, or an option
        does not apply to the source.
    InputError
        When the file is missing, malformed, or lacks the required arrays or columns.
    """
    problem = option_problem(spec.options)
    if problem is not None:
        raise UsageError(f"{spec.source}: {problem}")
    kind = _kind(spec)
    _check_applies(spec, kind)
    data = _read(spec, kind)
    return standardized(data) if spec.options.get("standardize") else data


def _kind(spec: DataSpec) -> str:
    """What ``spec.source`` is: builtin, npz, csv, parquet, jsonl, arrow, images or text."""
    from fedmoe.io.images import holds_images
    from fedmoe.io.tables import is_arrow_folder, is_parquet_folder

    if spec.source in BUILTIN:
        return "builtin"
    path = Path(spec.source)
    if path.suffix in (".npz", ".csv", ".parquet", ".jsonl"):
        return path.suffix[1:]
    if path.is_dir():
        if is_arrow_folder(path):
            return "arrow"
        if is_parquet_folder(path):
            return "parquet"
        return "images" if holds_images(path) else "text"
    names = ", ".join(sorted(BUILTIN))
    raise UsageError(
        f"unknown dataset '{spec.source}'",
        hint=f"use a built-in name ({names}), a path to a .npz, .csv, .parquet or .jsonl file, "
        "or a folder (Parquet or save_to_disk Arrow files, images by domain and class, or text "
        "by domain)",
    )


def _check_applies(spec: DataSpec, kind: str) -> None:
    """Refuse an option the source's kind does not read."""
    tables = ("npz", "csv", "parquet", "arrow")
    for key, kinds, what in (
        ("standardize", tables, ".csv, .npz, Parquet and Arrow data"),
        ("image_size", ("images",), "image folders"),
        ("grayscale", ("images",), "image folders"),
    ):
        if key in spec.options and kind not in kinds:
            raise UsageError(
                f"{spec.source}: the data option '{key}' applies to {what} only",
                hint=f"drop it for this dataset ({kind})",
            )


def _read(spec: DataSpec, kind: str) -> Dataset:
    from fedmoe.io import images, tables

    path = Path(spec.source)
    if kind == "builtin":
        builtin = BUILTIN[spec.source]
        return builtin.transform(*RAW_READERS[builtin.raw]())
    if kind == "npz":
        return load_npz(path)
    if kind == "csv":
        return load_csv(path, spec.label_column, spec.domain_column)
    if kind == "jsonl":
        return load_jsonl(path)
    if kind == "parquet":
        return tables.table_dataset(
            tables.read_parquet(path), path, spec.label_column, spec.domain_column
        )
    if kind == "arrow":
        return tables.table_dataset(
            tables.read_arrow_folder(path), path, spec.label_column, spec.domain_column
        )
    if kind == "images":
        size = int(spec.options.get("image_size", IMAGE_SIZE))
        return images.load_image_folder(path, size, bool(spec.options.get("grayscale", False)))
    return load_text_folder(path)


def _two_classes(class_names: tuple[str, ...], path: Path) -> None:
    """A classifier needs at least two classes."""
    if len(class_names) < 2:
        raise InputError(
            f"{path}: the labels hold {len(class_names)} class; a classifier needs at least 2",
            hint="check the label column",
        )
