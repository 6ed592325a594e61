"""The partition manifest (``kind: "partition"``): what ``fedmoe partition`` writes and every later
step reads to find a client's samples.

Layout (schema 1)::

    schema_version, kind, fedmoe_version
    dataset:  {source, path?, file_sha256?, label_column?, domain_column?, options?, sha256,
               num_samples, input_shape, num_classes, num_domains, has_domains, class_names,
               domain_names}
    scheme, params, seed, num_clients, global_test_fraction, local_test_fraction
    metrics:  skew metrics (fedmoe.partition.metrics)
    global_test: [indices]       unassigned: [indices]
    clients:  [{id, num_samples, num_train, num_test, label_counts, domain_counts, train, test}]

``file_sha256`` of a folder (Parquet, Arrow, images, text) is :func:`fedmoe.io.digest.sha256_path`'s
digest over its files; ``options`` (only when given) are the :class:`DataSpec` options the data
was read with (``standardize``, ``image_size``, ``grayscale``), so every later step reads it the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.data import Dataset, DataSpec
from fedmoe.data.spec import option_problem
from fedmoe.errors import InputError
from fedmoe.io.datasets import load_dataset
from fedmoe.io.digest import sha256_path
from fedmoe.io.manifest import (
    header,
    malformed,
    read_manifest,
    relative,
    require,
    resolve,
)
from fedmoe.partition import ClientSplit, Partition

KIND = "partition"


def dataset_record(dataset: Dataset, spec: DataSpec, base: Path) -> dict[str, Any]:
    """The manifest's ``dataset`` entry: how to reload the data and its fingerprint."""
    rec: dict[str, Any] = {"source": "builtin" if not spec.is_file else "file"}
    if spec.is_file:
        path = Path(spec.source)
        rec["path"] = relative(path, base)
        rec["file_sha256"] = sha256_path(path)
        if path.suffix in (".csv", ".parquet") or is_table_folder(path):
            rec["label_column"] = spec.label_column
            rec["domain_column"] = spec.domain_column
    else:
        rec["name"] = spec.source
    if spec.options:
        rec["options"] = dict(spec.options)
    rec.update(
        sha256=dataset.fingerprint(),
        num_samples=dataset.num_samples,
        input_shape=list(dataset.input_shape),
        num_classes=dataset.num_classes,
        num_domains=dataset.num_domains,
        has_domains=dataset.has_domains,
        class_names=list(dataset.class_names),
        domain_names=list(dataset.domain_names),
    )
    return rec


def is_table_folder(path: Path) -> bool:
    """True for a folder read as a table (Parquet files, or ``save_to_disk`` Arrow files)."""
    from fedmoe.io.tables import is_arrow_folder, is_parquet_folder

    return path.is_dir() and (is_arrow_folder(path) or is_parquet_folder(path))


def partition_to_manifest(
    partition: Partition, dataset: Dataset, spec: DataSpec, base: Path
) -> dict[str, Any]:
    """The manifest of ``partition``; file paths are written relative to folder ``base``."""
    clients = []
    for i, c in enumerate(partition.clients):
        clients.append(
            {
                "id": i,
                "num_samples": int(c.train.size + c.test.size),
                "num_train": int(c.train.size),
                "num_test": int(c.test.size),
                "label_counts": partition.label_counts[i].tolist(),
                "domain_counts": partition.domain_counts[i].tolist(),
                "train": c.train.tolist(),
                "test": c.test.tolist(),
            }
        )
    return {
        **header(KIND),
        "dataset": dataset_record(dataset, spec, base),
        "scheme": partition.scheme,
        "params": partition.params,
        "seed": partition.seed,
        "num_clients": len(partition.clients),
        "global_test_fraction": partition.global_test_fraction,
        "local_test_fraction": partition.local_test_fraction,
        "metrics": partition.metrics,
        "global_test": partition.global_test.tolist(),
        "unassigned": partition.unassigned.tolist(),
        "clients": clients,
    }


@dataclass(frozen=True)
class LoadedPartition:
    """A validated partition manifest; its dataset is loaded on first use of :attr:`dataset`.

    Shapes, names and per-client counts come from the manifest alone, so a command that needs
    only those (``fedmoe init --partition``) never reads the data.
    """

    path: str  # where the manifest came from ("-" for stdin)
    sha256: str  # sha256 of the manifest's bytes
    dataset_spec: DataSpec  # how to load the dataset (worker processes reload it)
    clients: tuple[ClientSplit, ...]  # client id = position
    global_test: np.ndarray  # (n_global,) indices
    manifest: dict[str, Any]  # the raw manifest
    num_samples: int  # n, the dataset's size as the manifest records it
    input_shape: tuple[int, ...]  # shape of one sample
    class_names: tuple[str, ...]  # label id -> original label
    domain_names: tuple[str, ...]  # domain id -> name
    fingerprint: str  # the dataset's recorded fingerprint (Dataset.fingerprint)

    @property
    def num_clients(self) -> int:
        """N."""
        return len(self.clients)

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    @property
    def num_domains(self) -> int:
        """Number of domains D (1 when the data has no domains)."""
        return len(self.domain_names)

    @cached_property
    def dataset(self) -> Dataset:
        """The dataset, loaded on first access and checked against the manifest's fingerprint.

        Raises
        ------
        InputError
            When the data no longer matches the fingerprint, or cannot be read.
        """
        dataset = load_dataset(self.dataset_spec)
        self._check_fingerprint(dataset)
        if dataset.num_samples != self.num_samples:  # only a hand-edited manifest gets here
            raise InputError(
                f"{self.path}: records {self.num_samples} samples, its dataset has "
                f"{dataset.num_samples}",
                hint="re-run fedmoe partition",
            )
        return dataset

    def adopt(self, dataset: Dataset) -> None:
        """Use ``dataset``, already loaded (a worker process's copy), instead of loading it again;
        it must be the manifest's dataset (same fingerprint)."""
        self._check_fingerprint(dataset)
        self.__dict__["dataset"] = dataset  # what the cached property would have stored

    def _check_fingerprint(self, dataset: Dataset) -> None:
        """An :class:`InputError` unless ``dataset`` is the one the manifest recorded."""
        if dataset.fingerprint() != self.fingerprint:
            raise InputError(
                f"{self.path}: dataset '{self.dataset_spec.source}' no longer matches the "
                "manifest's fingerprint",
                hint="re-run fedmoe partition with this installation",
            )

    def client(self, client_id: int) -> ClientSplit:
        """Client ``client_id``'s split, or an :class:`InputError` naming the valid range."""
        if not 0 <= client_id < self.num_clients:
            raise InputError(
                f"{self.path}: no client {client_id} (the partition has clients 0.."
                f"{self.num_clients - 1})"
            )
        return self.clients[client_id]

    def domain_counts(self, client_id: int) -> list[int]:
        """Samples (train and test) of each domain at client ``client_id``, from the manifest.

        Raises
        ------
        InputError
            When there is no such client, or its ``domain_counts`` entry is malformed.
        """
        self.client(client_id)
        where = f"{self.path} client {client_id}"
        value = require(self.manifest["clients"][client_id], "domain_counts", where)
        try:
            counts = [int(v) for v in value]
        except (TypeError, ValueError):
            raise InputError(f"{where}: 'domain_counts' must be a list of ints") from None
        if len(counts) != self.num_domains:
            raise InputError(
                f"{where}: 'domain_counts' has {len(counts)} entries, the dataset has "
                f"{self.num_domains} domains",
                hint="re-create the file with fedmoe partition",
            )
        return counts

    def dominant_domain(self, client_id: int) -> int:
        """The domain id client ``client_id`` has most samples of (the lowest id on a tie)."""
        return int(np.argmax(self.domain_counts(client_id)))


def _indices(value: Any, n: int, where: str) -> np.ndarray:
    """A list of distinct integer sample indices in [0, n), refused otherwise (floats, booleans,
    repeats and out-of-range values would silently select other samples)."""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise InputError(f"{where}: indices must be a list of integers in [0, {n})")
    arr = np.asarray(value, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise InputError(f"{where}: indices must be a list of integers in [0, {n})")
    if np.unique(arr).size != arr.size:
        raise InputError(f"{where}: an index appears twice", hint="re-run fedmoe partition")
    return arr


def _disjoint(
    clients: tuple[ClientSplit, ...], global_test: np.ndarray, n: int, where: str
) -> None:
    """Every sample belongs to at most one split: one client's train or test, or the global test
    set. Overlaps would let a model be evaluated on data it trained on."""
    owner = np.full(n, -1, dtype=np.int64)
    parts = [
        (f"client {i} {kind}", arr)
        for i, c in enumerate(clients)
        for kind, arr in (("train", c.train), ("test", c.test))
    ]
    parts.append(("global_test", global_test))
    for pos, (name, arr) in enumerate(parts):
        taken = owner[arr] >= 0
        if taken.any():
            first = parts[int(owner[arr][taken][0])][0]
            raise InputError(
                f"{where}: sample {int(arr[taken][0])} is in both {first} and {name}",
                hint="re-run fedmoe partition; a partition's splits never overlap",
            )
        owner[arr] = pos


def _shape_and_names(
    rec: dict[str, Any], where: str
) -> tuple[int, tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """``num_samples``, ``input_shape``, ``class_names`` and ``domain_names`` of the ``dataset``
    entry, checked against ``num_classes`` / ``num_domains`` where those are recorded."""
    try:
        n = int(require(rec, "num_samples", where))
        shape = tuple(int(s) for s in require(rec, "input_shape", where))
        classes = tuple(str(c) for c in require(rec, "class_names", where))
        domains = tuple(str(d) for d in require(rec, "domain_names", where))
    except (TypeError, ValueError):
        raise InputError(
            f"{where}: malformed dataset entry (num_samples, input_shape, class_names, "
            "domain_names)",
            hint="re-create the file with fedmoe partition",
        ) from None
    for key, names in (("num_classes", classes), ("num_domains", domains)):
        if key in rec and rec[key] != len(names):
            raise InputError(
                f"{where}: dataset '{key}' is {rec[key]} but it lists {len(names)} names",
                hint="re-create the file with fedmoe partition",
            )
    return n, shape, classes, domains


def load_partition(source: str | Path) -> LoadedPartition:
    """Read and validate a partition manifest (or ``-``) without loading its dataset.

    A user data file must still be where the manifest says and unchanged (its sha256 is
    checked); the dataset itself is loaded, and its fingerprint verified, on first use of
    :attr:`LoadedPartition.dataset`.
    """
    manifest, base, digest = read_manifest(source, KIND)
    name = str(source)
    with malformed(name, "partition manifest", "re-create it with fedmoe partition"):
        rec = require(manifest, "dataset", name)
        if rec.get("source") == "file":
            path = resolve(require(rec, "path", name), base)
            if not path.exists():
                raise InputError(
                    f"{name}: its dataset file {path} is missing",
                    hint="keep the data file where the manifest expects it (paths are relative)",
                )
            if sha256_path(path) != rec.get("file_sha256"):
                raise InputError(
                    f"{name}: dataset file {path} changed since the partition was made "
                    "(sha256 mismatch)",
                    hint="re-run fedmoe partition on the current file",
                )
            spec = DataSpec(str(path), rec.get("label_column") or "label", rec.get("domain_column"))
        else:
            builtin = require(rec, "name", name)
            if not isinstance(builtin, str):
                raise InputError(f"{name}: dataset 'name' must be a string, got {builtin!r}")
            spec = DataSpec(builtin)
        options = rec.get("options", {})
        problem = option_problem(options)
        if problem is not None:
            raise InputError(
                f"{name}: dataset {problem}", hint="re-create it with fedmoe partition"
            )
        spec = DataSpec(spec.source, spec.label_column, spec.domain_column, dict(options))
        n, shape, class_names, domain_names = _shape_and_names(rec, name)
        clients = tuple(
            ClientSplit(
                train=_indices(require(c, "train", name), n, f"{name} client {i}"),
                test=_indices(require(c, "test", name), n, f"{name} client {i}"),
            )
            for i, c in enumerate(require(manifest, "clients", name))
        )
        global_test = _indices(manifest.get("global_test", []), n, f"{name} global_test")
        _disjoint(clients, global_test, n, name)
    return LoadedPartition(
        path=name,
        sha256=digest,
        dataset_spec=spec,
        clients=clients,
        global_test=global_test,
        manifest=manifest,
        num_samples=n,
        input_shape=shape,
        class_names=class_names,
        domain_names=domain_names,
        fingerprint=str(rec.get("sha256")),
    )
