"""The affinity artefact (``kind: "affinity"``): what ``fedmoe affinity`` writes and ``plan-sync``
reads.

Layout (schema 2; schema 1, one MoE layer with ``neighbours`` at the top level, is still read;
schema 3 is schema 2 with the neighbours and share tables in a binary companion, see below)::

    schema_version, kind, fedmoe_version, round, candidates, model_config
    sizes:   {shared, gate, expert: [per layer], num_experts: [per layer], model}
    inputs:  [{client, path, sha256, num_samples, round, stale}]
    clients: [client ids]; client-expert m = position(client)·E + expert
    stale:   [clients whose proxies are older than ``round``: kept, marked]
    pooled:  true when the layers were pooled (every layer then lists the same neighbours)
    centred: true when the sources were ranked by centred proxies (fedmoe.affinity.centre): each
             neighbour entry is then [m', score, plain cosine], sorted by the score
    layers:  [{layer, num_experts,
               neighbours: one row per m: [[m', similarity], ...], decreasing (ties kept),
               expert_domain: {names, shares}, expert_label: {names, shares}}]

Schema 3 (``fedmoe affinity --arrays FILE``, for large federations): each layer keeps ``layer``,
``num_experts`` and the share tables' ``names``; its neighbours and shares are the arrays
``layer-LLL.indptr`` (M+1, int64), ``.indices`` (int64), ``.values`` (float32), ``.domain_shares``
(M, D) and ``.label_shares`` (M, C) (float64, rounded to 6 decimals as in JSON) of the companion
that ``arrays`` names (:mod:`fedmoe.io.arrays_file`); ``.plain`` (float32) when ``centred``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.affinity import Affinity, ExpertIndex, LayerAffinity, Neighbours
from fedmoe.errors import InputError, UsageError
from fedmoe.io.arrays_file import check_csr, load_arrays, row_of, take
from fedmoe.io.manifest import header, malformed, read_manifest, require
from fedmoe.model.config import MoEConfig
from fedmoe.model.hf import HFConfig, ModelConfig
from fedmoe.model.schema import PartSizes

KIND = "affinity"
VERSION = 2
ARRAYS_VERSION = 3  # the neighbours and share tables in a binary companion


def _rounded(table: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in table]


def json_config(config: ModelConfig) -> dict[str, Any]:
    """The config as a JSON object (not a string) for manifests; a Hugging Face model's config is
    wrapped as ``{"huggingface": {...config.json...}}``."""
    loaded: dict[str, Any] = json.loads(config.to_json())
    return {"huggingface": loaded} if isinstance(config, HFConfig) else loaded


def parse_config(data: Any, where: str) -> ModelConfig:
    """The config a manifest's ``model_config`` holds (see :func:`json_config`)."""
    if isinstance(data, dict) and set(data) == {"huggingface"}:
        if not isinstance(data["huggingface"], dict):
            raise InputError(f"{where}: bad model_config (huggingface must be an object)")
        return HFConfig.from_dict(data["huggingface"])
    try:
        return MoEConfig.from_dict(data, where)
    except UsageError as exc:
        raise InputError(f"{where}: bad model_config ({exc.message})") from None


def affinity_to_manifest(
    aff: Affinity,
    config: ModelConfig,
    sizes: PartSizes,
    inputs: list[dict[str, Any]],
    domain_names: list[str] | None = None,
    class_names: list[str] | None = None,
    inline: bool = True,
) -> dict[str, Any]:
    """The artefact of ``aff``; ``inputs`` lists the checkpoints it was computed from. With
    ``inline=False`` the neighbours and share tables are left to the companion
    (:func:`affinity_arrays`), whose ``arrays`` entry the caller adds."""
    layers = []
    for la in aff.layers:
        d, c = la.by_domain.shape[1], la.by_label.shape[1]
        layer: dict[str, Any] = {"layer": la.layer, "num_experts": la.index.num_experts}
        domain: dict[str, Any] = {"names": domain_names or [f"domain{i}" for i in range(d)]}
        label: dict[str, Any] = {"names": class_names or [str(i) for i in range(c)]}
        if inline:
            nb = la.neighbours
            fields = [nb.indices.tolist(), nb.values.tolist()]
            if nb.plain is not None:  # centred: [m', score, plain cosine]
                fields.append(nb.plain.tolist())
            entries = [list(entry) for entry in zip(*fields, strict=True)]
            indptr = nb.indptr.tolist()
            layer["neighbours"] = [entries[indptr[m] : indptr[m + 1]] for m in range(nb.num_rows)]
            domain["shares"] = _rounded(la.by_domain)
            label["shares"] = _rounded(la.by_label)
        layers.append({**layer, "expert_domain": domain, "expert_label": label})
    return {
        **header(KIND, VERSION if inline else ARRAYS_VERSION),
        "round": aff.round,
        "candidates": aff.layers[0].neighbours.k,
        "model_config": json_config(config),
        "sizes": sizes.to_dict(),
        "inputs": inputs,
        "clients": list(aff.clients),
        "stale": list(aff.stale),
        **({"pooled": True} if aff.pooled else {}),
        **({"centred": True} if aff.centred else {}),
        "layers": layers,
    }


def affinity_arrays(aff: Affinity) -> dict[str, np.ndarray]:
    """The companion's arrays of a schema-3 artefact (see the module)."""
    out: dict[str, np.ndarray] = {}
    for la in aff.layers:
        key = f"layer-{la.layer:03d}"
        out[f"{key}.indptr"] = la.neighbours.indptr.astype(np.int64)
        out[f"{key}.indices"] = la.neighbours.indices.astype(np.int64)
        out[f"{key}.values"] = la.neighbours.values.astype(np.float32)
        if la.neighbours.plain is not None:
            out[f"{key}.plain"] = la.neighbours.plain.astype(np.float32)
        out[f"{key}.domain_shares"] = np.round(la.by_domain.astype(np.float64), 6)
        out[f"{key}.label_shares"] = np.round(la.by_label.astype(np.float64), 6)
    return out


@dataclass(frozen=True)
class LoadedAffinity:
    """A validated affinity artefact."""

    affinity: Affinity
    config: ModelConfig
    sizes: PartSizes
    manifest: dict[str, Any]  # the raw artefact
    sha256: str  # of the bytes read


def load_affinity(source: str | Path) -> LoadedAffinity:
    """Read and validate an affinity artefact (or ``-``)."""
    manifest, base, digest = read_manifest(source, KIND, versions=(1, VERSION, ARRAYS_VERSION))
    where = "<stdin>" if str(source) == "-" else str(source)
    with malformed(where, "affinity artefact", "re-create it with fedmoe affinity"):
        arrays = None
        if manifest["schema_version"] == ARRAYS_VERSION:
            arrays = load_arrays(require(manifest, "arrays", where), base, where)
        aff, config, sizes = _parse(manifest, where, arrays)
    return LoadedAffinity(aff, config, sizes, manifest, digest)


def _check_cosines(vals: np.ndarray, indptr: np.ndarray, where: str) -> None:
    bad = ~((vals >= -1.0001) & (vals <= 1.0001))  # NaN fails too: a cosine is in [-1, 1]
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{where}: neighbour row {row_of(indptr, p)} has similarity {float(vals[p])!r}, "
            "not a cosine",
            hint="re-create it with fedmoe affinity",
        )


def _layer_from_arrays(
    data: dict[str, Any],
    layer: int,
    clients: tuple[int, ...],
    candidates: int,
    arrays: dict[str, np.ndarray],
    where: str,
    centred: bool,
) -> LayerAffinity:
    """One layer of a schema-3 artefact, every check vectorised (M may be 65,536 or more)."""
    index = ExpertIndex(clients, int(require(data, "num_experts", where)))
    key = f"layer-{layer:03d}"
    indptr = take(arrays, f"{key}.indptr", np.int64, 1, where)
    cols = take(arrays, f"{key}.indices", np.int64, 1, where)
    vals = take(arrays, f"{key}.values", np.float32, 1, where)
    if cols.shape != vals.shape:
        raise InputError(f"{where}: {key} has {cols.size} neighbour columns for {vals.size} values")
    check_csr(indptr, cols, index.size, index.size, f"layer {layer}'s neighbours", where)
    _check_cosines(vals, indptr, where)
    plain = None
    if centred:
        plain = take(arrays, f"{key}.plain", np.float32, 1, where)
        if plain.shape != vals.shape:
            raise InputError(
                f"{where}: {key} has {plain.size} plain cosines for {vals.size} values"
            )
        _check_cosines(plain, indptr, where)
    same_row = np.ones(max(vals.size - 1, 0), dtype=bool)
    starts = indptr[1:-1]
    same_row[starts[(starts > 0) & (starts < vals.size)] - 1] = False
    rising = (vals[1:] > vals[:-1]) & same_row
    if rising.any():
        p = int(np.flatnonzero(rising)[0])
        raise InputError(
            f"{where}: neighbour row {row_of(indptr, p)} is not sorted by decreasing similarity"
        )
    shares = []
    for name in ("domain_shares", "label_shares"):
        table = take(arrays, f"{key}.{name}", np.float64, 2, where)
        if table.shape[0] != index.size or not np.isfinite(table).all():
            raise InputError(f"{where}: {key}.{name} must be finite with {index.size} rows")
        shares.append(table)
    return LayerAffinity(
        layer, index, Neighbours(indptr, cols, vals, candidates, plain), shares[0], shares[1]
    )


def _parse_layer(
    data: dict[str, Any],
    layer: int,
    clients: tuple[int, ...],
    candidates: int,
    where: str,
    centred: bool,
) -> LayerAffinity:
    index = ExpertIndex(clients, int(require(data, "num_experts", where)))
    rows = require(data, "neighbours", where)
    if len(rows) != index.size:
        raise InputError(
            f"{where}: layer {layer} has {len(rows)} neighbour rows for {index.size} client-experts"
        )
    counts, cols, vals, plain = [], [], [], []
    width = 3 if centred else 2  # [m', similarity] or [m', score, plain cosine]
    for m, row in enumerate(rows):
        if not isinstance(row, list) or not row:  # a client-expert is always its own neighbour
            raise InputError(
                f"{where}: neighbour row {m} is empty or not a list",
                hint="re-create it with fedmoe affinity",
            )
        for entry in row:
            if not (
                isinstance(entry, list) and len(entry) == width and 0 <= int(entry[0]) < index.size
            ):
                raise InputError(f"{where}: neighbour row {m} has a malformed entry {entry!r}")
            cols.append(int(entry[0]))
            vals.append(float(entry[1]))
            if centred:
                plain.append(float(entry[2]))
            for v in entry[1:]:
                if not -1.0001 <= float(v) <= 1.0001:  # NaN fails too: a cosine is in [-1, 1]
                    raise InputError(
                        f"{where}: neighbour row {m} has similarity {v!r}, not a cosine",
                        hint="re-create it with fedmoe affinity",
                    )
        counts.append(len(row))
        if any(row[i][1] < row[i + 1][1] for i in range(len(row) - 1)):
            raise InputError(f"{where}: neighbour row {m} is not sorted by decreasing similarity")
    indptr = np.zeros(index.size + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts, dtype=np.int64), out=indptr[1:])
    neighbours = Neighbours(
        indptr,
        np.asarray(cols, dtype=np.int64),
        np.asarray(vals, dtype=np.float32),
        candidates,
        np.asarray(plain, dtype=np.float32) if centred else None,
    )
    dom = np.asarray(data.get("expert_domain", {}).get("shares", []), dtype=np.float64)
    lab = np.asarray(data.get("expert_label", {}).get("shares", []), dtype=np.float64)
    return LayerAffinity(
        layer, index, neighbours, dom.reshape(index.size, -1), lab.reshape(index.size, -1)
    )


def _parse(
    manifest: dict[str, Any], where: str, arrays: dict[str, np.ndarray] | None = None
) -> tuple[Affinity, ModelConfig, PartSizes]:
    clients = tuple(int(c) for c in require(manifest, "clients", where))
    if list(clients) != sorted(set(clients)):
        raise InputError(f"{where}: 'clients' must be increasing and distinct")
    candidates = int(require(manifest, "candidates", where))
    if manifest["schema_version"] == 1:  # one MoE layer, its fields at the top level
        layers_data = [manifest]
    else:
        layers_data = require(manifest, "layers", where)
    centred = manifest.get("centred", False)
    if not isinstance(centred, bool):
        raise InputError(f"{where}: 'centred' must be true or false")
    layers = tuple(
        _parse_layer(data, layer, clients, candidates, where, centred)
        if arrays is None
        else _layer_from_arrays(data, layer, clients, candidates, arrays, where, centred)
        for layer, data in enumerate(layers_data)
    )
    config = parse_config(require(manifest, "model_config", where), where)
    sizes = PartSizes.from_dict(require(manifest, "sizes", where))
    if sizes.num_experts != tuple(la.index.num_experts for la in layers):
        raise InputError(
            f"{where}: 'sizes.num_experts' {list(sizes.num_experts)} does not match its layers"
        )
    for entry in manifest.get("inputs", []):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("client"), int)
            and entry["client"] in clients
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("stale", False), bool)
        ):
            raise InputError(
                f"{where}: malformed 'inputs' entry {str(entry)[:80]} (needs a client of the "
                "artefact, its sha256 and a stale flag)",
                hint="re-create it with fedmoe affinity",
            )
    stale = tuple(int(c) for c in manifest.get("stale", []))
    pooled = manifest.get("pooled", False)
    if not isinstance(pooled, bool):
        raise InputError(f"{where}: 'pooled' must be true or false")
    first = layers[0].neighbours
    if pooled and not all(la.neighbours.same_as(first) for la in layers[1:]):
        raise InputError(f"{where}: 'pooled' but its layers' neighbours differ")
    return Affinity(layers, int(manifest.get("round", 0)), stale, pooled, centred), config, sizes
