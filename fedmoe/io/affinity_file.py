"""The affinity artefact (``kind: "affinity"``): what ``fedmoe affinity`` writes and ``plan-sync``
reads.

Layout (schema 1)::

    schema_version, kind, fedmoe_version, round, candidates, model_config
    sizes:     {embed, gate, expert, num_experts, model}     bytes of each part
    inputs:    [{client, path, sha256, num_samples, round}]
    clients:   [client ids]; client-expert m = position(client)·E + expert
    neighbours: one row per m: [[m', similarity], ...], decreasing similarity (ties kept)
    expert_domain: {names, shares: [[...] per m]}     expert_label: {names, shares}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmoe.affinity import Affinity, ExpertIndex, Neighbours
from fedmoe.errors import InputError, UsageError
from fedmoe.io.manifest import header, read_manifest, require
from fedmoe.model.config import MoEConfig
from fedmoe.plan.sizes import TensorSizes

KIND = "affinity"


def _rounded(table: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in table]


def affinity_to_manifest(
    aff: Affinity,
    config: MoEConfig,
    sizes: TensorSizes,
    inputs: list[dict[str, Any]],
    round_: int,
    domain_names: list[str] | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """The artefact of ``aff``; ``inputs`` lists the checkpoints it was computed from."""
    nb = aff.neighbours
    indptr, cols, vals = nb.indptr.tolist(), nb.indices.tolist(), nb.values.tolist()
    rows = [
        [[cols[p], vals[p]] for p in range(indptr[m], indptr[m + 1])] for m in range(nb.num_rows)
    ]
    d = aff.by_domain.shape[1]
    c = aff.by_label.shape[1]
    return {
        **header(KIND),
        "round": round_,
        "candidates": nb.k,
        "model_config": json_config(config),
        "sizes": {**sizes.__dict__, "model": sizes.model},
        "inputs": inputs,
        "clients": list(aff.index.clients),
        "num_experts": aff.index.num_experts,
        "neighbours": rows,
        "expert_domain": {
            "names": domain_names or [f"domain{i}" for i in range(d)],
            "shares": _rounded(aff.by_domain),
        },
        "expert_label": {
            "names": class_names or [str(i) for i in range(c)],
            "shares": _rounded(aff.by_label),
        },
    }


def json_config(config: MoEConfig) -> dict[str, Any]:
    """The config as a JSON object (not a string) for manifests."""
    import json

    return json.loads(config.to_json())


def load_affinity(
    source: str | Path,
) -> tuple[Affinity, MoEConfig, TensorSizes, dict[str, Any], str]:
    """Read and validate an affinity artefact (or ``-``); the last item is its sha256."""
    manifest, _, digest = read_manifest(source, KIND)
    where = "<stdin>" if str(source) == "-" else str(source)
    try:
        return (*_parse_affinity(manifest, where), digest)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(
            f"{where}: malformed affinity artefact ({type(exc).__name__}: {exc})",
            hint="re-create it with fedmoe affinity",
        ) from None


def _parse_affinity(
    manifest: dict[str, Any], where: str
) -> tuple[Affinity, MoEConfig, TensorSizes, dict[str, Any]]:
    clients = tuple(int(c) for c in require(manifest, "clients", where))
    if list(clients) != sorted(set(clients)):
        raise InputError(f"{where}: 'clients' must be increasing and distinct")
    index = ExpertIndex(clients, int(require(manifest, "num_experts", where)))
    rows = require(manifest, "neighbours", where)
    if len(rows) != index.size:
        raise InputError(f"{where}: {len(rows)} neighbour rows for {index.size} client-experts")
    counts, cols, vals = [], [], []
    for m, row in enumerate(rows):
        for entry in row:
            if not (
                isinstance(entry, list) and len(entry) == 2 and 0 <= int(entry[0]) < index.size
            ):
                raise InputError(f"{where}: neighbour row {m} has a malformed entry {entry!r}")
            cols.append(int(entry[0]))
            vals.append(float(entry[1]))
        counts.append(len(row))
        if any(row[i][1] < row[i + 1][1] for i in range(len(row) - 1)):
            raise InputError(f"{where}: neighbour row {m} is not sorted by decreasing similarity")
    indptr = torch.zeros(index.size + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), dim=0)
    neighbours = Neighbours(
        indptr,
        torch.tensor(cols, dtype=torch.int64),
        torch.tensor(vals, dtype=torch.float32),
        int(require(manifest, "candidates", where)),
    )
    try:
        config = MoEConfig.from_dict(require(manifest, "model_config", where), where)
    except UsageError as exc:
        raise InputError(f"{where}: bad model_config ({exc.message})") from None
    sz = require(manifest, "sizes", where)
    sizes = TensorSizes(
        int(sz["embed"]), int(sz["gate"]), int(sz["expert"]), int(sz["num_experts"])
    )
    dom = np.asarray(manifest.get("expert_domain", {}).get("shares", []), dtype=np.float64)
    lab = np.asarray(manifest.get("expert_label", {}).get("shares", []), dtype=np.float64)
    aff = Affinity(index, neighbours, dom.reshape(index.size, -1), lab.reshape(index.size, -1))
    return aff, config, sizes, manifest
