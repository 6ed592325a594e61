"""The partition manifest (``kind: "partition"``): what ``fedmoe partition`` writes and every later
step reads to find a client's samples.

Layout (schema 1)::

    schema_version, kind, fedmoe_version
    dataset:  {source, path?, file_sha256?, label_column?, domain_column?, sha256, num_samples,
               input_shape, num_classes, num_domains, has_domains, class_names, domain_names}
    scheme, params, seed, num_clients, global_test_fraction, local_test_fraction
    metrics:  skew metrics (fedmoe.partition.metrics)
    global_test: [indices]       unassigned: [indices]
    clients:  [{id, num_samples, num_train, num_test, label_counts, domain_counts, train, test}]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.data import Dataset, DataSpec, load_dataset
from fedmoe.errors import InputError
from fedmoe.io.manifest import header, read_manifest, relative, require, resolve, sha256_file
from fedmoe.partition import ClientSplit, Partition

KIND = "partition"


def dataset_record(dataset: Dataset, spec: DataSpec, base: Path) -> dict[str, Any]:
    """The manifest's ``dataset`` entry: how to reload the data and its fingerprint."""
    rec: dict[str, Any] = {"source": "builtin" if not spec.is_file else "file"}
    if spec.is_file:
        path = Path(spec.source)
        rec["path"] = relative(path, base)
        rec["file_sha256"] = sha256_file(path)
        if path.suffix == ".csv":
            rec["label_column"] = spec.label_column
            rec["domain_column"] = spec.domain_column
    else:
        rec["name"] = spec.source
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
    """A partition manifest with its dataset loaded and checked against the fingerprint."""

    path: str  # where the manifest came from ("-" for stdin)
    sha256: str  # sha256 of the manifest's bytes
    dataset_spec: DataSpec  # how the dataset was loaded (worker processes reload it)
    dataset: Dataset
    clients: tuple[ClientSplit, ...]  # client id = position
    global_test: np.ndarray  # (n_global,) indices
    manifest: dict[str, Any]  # the raw manifest

    @property
    def num_clients(self) -> int:
        """N."""
        return len(self.clients)

    def client(self, client_id: int) -> ClientSplit:
        """Client ``client_id``'s split, or an :class:`InputError` naming the valid range."""
        if not 0 <= client_id < self.num_clients:
            raise InputError(
                f"{self.path}: no client {client_id} (the partition has clients 0.."
                f"{self.num_clients - 1})"
            )
        return self.clients[client_id]


def _indices(value: Any, n: int, where: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.int64)
    if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() >= n)):
        raise InputError(f"{where}: indices must be a list of ints in [0, {n})")
    return arr


def load_partition(source: str | Path) -> LoadedPartition:
    """Read a partition manifest (or ``-``), reload its dataset and verify the fingerprint."""
    manifest, base, digest = read_manifest(source, KIND)
    name = str(source)
    rec = require(manifest, "dataset", name)
    if rec.get("source") == "file":
        path = resolve(require(rec, "path", name), base)
        if not path.is_file():
            raise InputError(
                f"{name}: its dataset file {path} is missing",
                hint="keep the data file where the manifest expects it (paths are relative)",
            )
        if sha256_file(path) != rec.get("file_sha256"):
            raise InputError(
                f"{name}: dataset file {path} changed since the partition was made "
                "(sha256 mismatch)",
                hint="re-run fedmoe partition on the current file",
            )
        spec = DataSpec(str(path), rec.get("label_column") or "label", rec.get("domain_column"))
    else:
        spec = DataSpec(require(rec, "name", name))
    dataset = load_dataset(spec)
    if dataset.fingerprint() != rec.get("sha256"):
        raise InputError(
            f"{name}: dataset '{spec.source}' no longer matches the manifest's fingerprint",
            hint="re-run fedmoe partition with this installation",
        )
    n = dataset.num_samples
    clients = tuple(
        ClientSplit(
            train=_indices(require(c, "train", name), n, f"{name} client {i}"),
            test=_indices(require(c, "test", name), n, f"{name} client {i}"),
        )
        for i, c in enumerate(require(manifest, "clients", name))
    )
    return LoadedPartition(
        path=name,
        sha256=digest,
        dataset_spec=spec,
        dataset=dataset,
        clients=clients,
        global_test=_indices(manifest.get("global_test", []), n, f"{name} global_test"),
        manifest=manifest,
    )
