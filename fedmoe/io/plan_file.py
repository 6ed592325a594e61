"""The sync plan (``kind: "sync-plan"``): what ``fedmoe plan-sync`` writes, the server sends each
client (its rows), and ``fedmoe aggregate --plan`` applies.

Layout (schema 2; schema 1, one MoE layer with ``targets`` at the top level, is still read)::

    schema_version, kind, fedmoe_version
    round, matrix_round, refreshed, merges_experts, top_p, tau, refresh_interval, gate
    params:    every FedMoE-DA parameter (P, τ, I, gate, candidates, stale, interval, reduce, ...)
    affinity: {path, sha256} | null (null when the matrix was reused)
    previous_plan: {path, sha256, reused} | null                model_config, sizes
    clients:      [ids] every client the matrices cover (participants and held stale proxies)
    participants: [ids] clients whose rows apply this round
    layers: [{layer, num_experts,
              targets: [{client, expert, sources: [{client, expert, weight, similarity}]}]}]
              (Eq. 9–10 over every covered client; weights sum to 1)
    transfers: [{from, to, layer, experts: [j'], bytes}]   (the applied rows' fetches)
    ledger:    {server_up, server_down, plan_down, server_total, p2p, fedavg_equivalent, ...}

Schema 3 (``fedmoe plan-sync --arrays FILE``, for large federations): each layer keeps ``layer``
and ``num_experts``, and ``transfers`` is left out; the matrices and transfers are the arrays of
the companion that ``arrays`` names (:mod:`fedmoe.io.arrays_file`): per layer ``layer-LLL.indptr``
(M+1), ``.sources`` (int64), ``.weights`` (float64, exact), ``.similarity`` (float64, NaN where
unknown); and ``transfers.from``, ``.to``, ``.layer``, ``.bytes`` (one per transfer),
``.experts_indptr`` and ``.experts`` (int64).

With ``plan-sync --per-client FILE`` the plan also names the participants' own plans
(:func:`fedmoe.pipeline.sync.client_plans`), one compact JSON line each in one file::

    client_plans: {path, sha256, bytes, index: [[client, offset, length, sha256], ...]}

(schema 3: the index is the companion's ``client_plans.clients``, ``.offsets``, ``.lengths``
(int64) and ``.sha256`` (uint8, one row of 32 bytes per client) instead). A client reads only its
own byte range (:func:`read_client_plan`), which the server can send it with the range.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.affinity import ExpertIndex
from fedmoe.aggregate.fedmoe_da import FedMoEDA
from fedmoe.errors import FedMoeError, InputError
from fedmoe.io.affinity_file import json_config, parse_config
from fedmoe.io.arrays_file import check_csr, load_arrays, row_of, take
from fedmoe.io.manifest import header, malformed, read_manifest, require, resolve, sha256_bytes
from fedmoe.model.hf import ModelConfig
from fedmoe.model.schema import PartSizes
from fedmoe.params import params_dict as method_params
from fedmoe.plan import AggregationMatrix, Ledger, Transfer, Transfers
from fedmoe.round.sync import SyncPlan

KIND = "sync-plan"
VERSION = 2
ARRAYS_VERSION = 3  # the matrices and transfers in a binary companion
WEIGHT_TOLERANCE = 1e-6


def target_rows(matrix: AggregationMatrix) -> list[dict[str, Any]]:
    """The ``targets`` entries: one per client-expert, its sources and weights."""
    index = matrix.index
    rows = []
    for m in range(index.size):
        lo, hi = int(matrix.indptr[m]), int(matrix.indptr[m + 1])
        client, expert = index.key(m)
        sources = []
        for p in range(lo, hi):
            sc, se = index.key(int(matrix.sources[p]))
            sim = float(matrix.similarity[p])
            sources.append(
                {
                    "client": sc,
                    "expert": se,
                    "weight": float(matrix.weights[p]),
                    "similarity": None if math.isnan(sim) else sim,
                }
            )
        rows.append({"client": client, "expert": expert, "sources": sources})
    return rows


def plan_to_manifest(
    plan: SyncPlan,
    config: ModelConfig,
    sizes: PartSizes,
    affinity: dict[str, Any] | None = None,
    previous_plan: dict[str, Any] | None = None,
    inline: bool = True,
) -> dict[str, Any]:
    """The sync-plan manifest of ``plan`` (``inline=False``: the matrices and transfers are left
    to the companion, :func:`plan_arrays`, whose ``arrays`` entry the caller adds)."""
    m = plan.method
    layers: list[dict[str, Any]] = [
        {"layer": layer, "num_experts": mat.index.num_experts}
        for layer, mat in enumerate(plan.matrices)
    ]
    if inline:
        for entry, mat in zip(layers, plan.matrices, strict=True):
            entry["targets"] = target_rows(mat)
    inline_only: dict[str, Any] = {}  # schema 2: the transfers in the JSON too
    if inline:
        inline_only["transfers"] = [
            {
                "from": t.source,
                "to": t.target,
                "layer": t.layer,
                "experts": list(t.experts),
                "bytes": t.bytes,
            }
            for t in plan.transfers
        ]
    return {
        **header(KIND, VERSION if inline else ARRAYS_VERSION),
        "round": plan.round,
        "matrix_round": plan.matrix_round,
        "refreshed": plan.refreshed,
        "merges_experts": plan.merges_experts,
        "top_p": m.top_p,
        "tau": m.tau,
        "refresh_interval": m.refresh_interval,
        "gate": m.gate.value,
        "params": method_params(m),
        "affinity": affinity,
        "previous_plan": previous_plan,
        "model_config": json_config(config),
        "sizes": sizes.to_dict(),
        "clients": list(plan.matrices[0].index.clients),
        "participants": list(plan.participants),
        "layers": layers,
        **inline_only,
        "ledger": plan.ledger.to_dict(),
    }


def plan_arrays(plan: SyncPlan) -> dict[str, np.ndarray]:
    """The companion's arrays of a schema-3 plan (see the module)."""
    out: dict[str, np.ndarray] = {}
    for layer, mat in enumerate(plan.matrices):
        key = f"layer-{layer:03d}"
        out[f"{key}.indptr"] = mat.indptr.astype(np.int64)
        out[f"{key}.sources"] = mat.sources.astype(np.int64)
        out[f"{key}.weights"] = mat.weights.astype(np.float64)
        out[f"{key}.similarity"] = mat.similarity.astype(np.float64)
    ts = plan.transfers
    out["transfers.from"] = ts.source
    out["transfers.to"] = ts.target
    out["transfers.layer"] = ts.layer
    out["transfers.bytes"] = ts.bytes
    out["transfers.experts_indptr"] = ts.indptr
    out["transfers.experts"] = ts.experts
    return out


def _matrix_from_arrays(
    arrays: dict[str, np.ndarray], layer: int, index: ExpertIndex, where: str
) -> AggregationMatrix:
    """One layer's matrix of a schema-3 plan, every check vectorised."""
    key = f"layer-{layer:03d}"
    indptr = take(arrays, f"{key}.indptr", np.int64, 1, where)
    sources = take(arrays, f"{key}.sources", np.int64, 1, where)
    weights = take(arrays, f"{key}.weights", np.float64, 1, where)
    similarity = take(arrays, f"{key}.similarity", np.float64, 1, where)
    if not sources.shape == weights.shape == similarity.shape:
        raise InputError(f"{where}: {key}'s sources, weights and similarities differ in length")
    check_csr(indptr, sources, index.size, index.size, f"layer {layer}'s matrix", where)
    bad = ~(np.isfinite(weights) & (weights >= 0))
    if bad.any():
        c, e = index.key(row_of(indptr, int(np.flatnonzero(bad)[0])))
        raise InputError(f"{where}: a weight of target client {c} expert {e} is not ≥ 0")
    sums = np.add.reduceat(weights, indptr[:-1]) if weights.size else weights
    off = np.abs(sums - 1.0) > WEIGHT_TOLERANCE
    if off.any():
        m = int(np.flatnonzero(off)[0])
        c, e = index.key(m)
        raise InputError(
            f"{where}: weights of target client {c} expert {e} sum to {float(sums[m]):.9g}, not 1",
            hint="re-create the plan with fedmoe plan-sync",
        )
    return AggregationMatrix(index, indptr, sources, weights, similarity)


def _transfers_from_arrays(arrays: dict[str, np.ndarray], where: str) -> Transfers:
    cols = [
        take(arrays, f"transfers.{n}", np.int64, 1, where) for n in ("from", "to", "layer", "bytes")
    ]
    ptr = take(arrays, "transfers.experts_indptr", np.int64, 1, where)
    experts = take(arrays, "transfers.experts", np.int64, 1, where)
    if len({c.size for c in cols}) != 1 or ptr.size != cols[0].size + 1:
        raise InputError(f"{where}: the transfer arrays differ in length")
    if int(ptr[0]) != 0 or int(ptr[-1]) != experts.size or (np.diff(ptr) < 0).any():
        raise InputError(f"{where}: malformed transfer expert lists")
    return Transfers(cols[0], cols[1], cols[2], cols[3], ptr, experts)


def matrix_from_rows(
    rows: list[dict[str, Any]], index: ExpertIndex, where: str
) -> AggregationMatrix:
    """Parse and check ``targets``: every client-expert once, known sources, weights summing to 1."""
    seen = np.zeros(index.size, dtype=bool)
    per_target: list[list[tuple[int, float, float]]] = [[] for _ in range(index.size)]
    clients = set(index.clients)
    for row in rows:
        try:
            client, expert = int(row["client"]), int(row["expert"])
            sources = row["sources"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: malformed target entry {row!r}") from None
        if client not in clients or not 0 <= expert < index.num_experts:
            raise InputError(
                f"{where}: target client {client} expert {expert} is not in the plan's clients "
                f"{sorted(clients)} × experts 0..{index.num_experts - 1}"
            )
        m = index.index(client, expert)
        if seen[m]:
            raise InputError(f"{where}: target client {client} expert {expert} appears twice")
        seen[m] = True
        total = 0.0
        for s in sources:
            try:
                sc, se, w = int(s["client"]), int(s["expert"]), float(s["weight"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{where}: malformed source {s!r}") from None
            if sc not in clients or not 0 <= se < index.num_experts:
                raise InputError(
                    f"{where}: source client {sc} expert {se} of target client {client} expert "
                    f"{expert} is unknown",
                    hint="the plan must only name clients and experts it covers",
                )
            if not math.isfinite(w) or w < 0:
                raise InputError(f"{where}: weight {w} of target client {client} expert {expert}")
            sim = s.get("similarity")
            per_target[m].append((index.index(sc, se), w, math.nan if sim is None else float(sim)))
            total += w
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise InputError(
                f"{where}: weights of target client {client} expert {expert} sum to {total:.9g}, "
                "not 1",
                hint="re-create the plan with fedmoe plan-sync",
            )
    if not seen.all():
        m = int(np.flatnonzero(~seen)[0])
        c, e = index.key(m)
        raise InputError(f"{where}: no row for target client {c} expert {e}")
    counts = [len(t) for t in per_target]
    indptr = np.zeros(index.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    flat = [x for t in per_target for x in t]
    return AggregationMatrix(
        index,
        indptr,
        np.array([f[0] for f in flat], dtype=np.int64),
        np.array([f[1] for f in flat], dtype=np.float64),
        np.array([f[2] for f in flat], dtype=np.float64),
    )


@dataclass(frozen=True)
class ClientPlanIndex:
    """Where each participant's own plan lies in the client plans file."""

    path: Path  # the client plans file
    sha256: str  # of the whole file
    entries: dict[int, tuple[int, int, str]]  # client → (byte offset, length, sha256 of its line)


def client_plans_entry(
    path: str, digest: str, size: int, index: list[tuple[int, int, int, str]], inline: bool
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The plan's ``client_plans`` entry for the client plans file at ``path`` (relative to the
    plan's folder; its sha256 and size), and the index arrays for the companion when not
    ``inline``."""
    entry: dict[str, Any] = {"path": path, "sha256": digest, "bytes": size}
    if inline:
        entry["index"] = [list(row) for row in index]
        return entry, {}
    arrays: dict[str, np.ndarray] = {
        "client_plans.clients": np.array([r[0] for r in index], dtype=np.int64),
        "client_plans.offsets": np.array([r[1] for r in index], dtype=np.int64),
        "client_plans.lengths": np.array([r[2] for r in index], dtype=np.int64),
        "client_plans.sha256": np.frombuffer(
            b"".join(bytes.fromhex(r[3]) for r in index), dtype=np.uint8
        ).reshape(len(index), 32),
    }
    return entry, arrays


def _client_plan_index(
    manifest: dict[str, Any], base: Path, arrays: dict[str, np.ndarray] | None, where: str
) -> ClientPlanIndex | None:
    entry = manifest.get("client_plans")
    if entry is None:
        return None
    if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
        raise InputError(f"{where}: malformed 'client_plans' entry")
    size = int(require(entry, "bytes", where))
    if arrays is None:
        rows = [
            (int(r[0]), int(r[1]), int(r[2]), str(r[3])) for r in require(entry, "index", where)
        ]
    else:
        clients = take(arrays, "client_plans.clients", np.int64, 1, where).tolist()
        offsets = take(arrays, "client_plans.offsets", np.int64, 1, where).tolist()
        lengths = take(arrays, "client_plans.lengths", np.int64, 1, where).tolist()
        digests = take(arrays, "client_plans.sha256", np.uint8, 2, where)
        if not len(clients) == len(offsets) == len(lengths) == digests.shape[0]:
            raise InputError(f"{where}: the client plan index arrays differ in length")
        rows = [
            (c, o, n, bytes(d).hex())
            for c, o, n, d in zip(clients, offsets, lengths, digests, strict=True)
        ]
    entries: dict[int, tuple[int, int, str]] = {}
    for c, offset, length, digest in rows:
        if offset < 0 or length < 1 or offset + length > size or c in entries:
            raise InputError(f"{where}: client {c}'s entry in the client plan index is malformed")
        entries[c] = (offset, length, digest)
    return ClientPlanIndex(
        resolve(entry["path"], base), str(require(entry, "sha256", where)), entries
    )


def read_client_plan(index: ClientPlanIndex, client: int) -> dict[str, Any]:
    """Client ``client``'s own plan: its byte range of the client plans file, checked against the
    sha256 the full plan records."""
    if client not in index.entries:
        raise InputError(
            f"{index.path}: client {client} has no plan this round",
            hint=f"participants: {', '.join(map(str, sorted(index.entries)))}",
        )
    offset, length, digest = index.entries[client]
    try:
        with open(index.path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
    except FileNotFoundError:
        raise InputError(f"{index.path}: no such client plans file") from None
    if sha256_bytes(data) != digest:
        raise InputError(
            f"{index.path}: client {client}'s plan (bytes {offset}..{offset + length}) does not "
            "match the sha256 the sync plan records",
            hint="re-create the plans with fedmoe plan-sync --per-client",
        )
    own: dict[str, Any] = json.loads(data)
    if own.get("kind") != "client-plan" or own.get("client") != client:
        raise InputError(
            f"{index.path}: bytes {offset}..{offset + length} are not client {client}'s plan"
        )
    return own


@dataclass(frozen=True)
class LoadedPlan:
    """A validated sync plan."""

    plan: SyncPlan  # matrices, participants, method, transfers, ledger
    config: ModelConfig  # the model it was made for
    sizes: PartSizes
    manifest: dict[str, Any]  # the raw plan
    sha256: str  # of the bytes read
    where: str  # how errors name this plan
    client_plans: ClientPlanIndex | None = None  # each participant's own plan (--per-client)


def _method(manifest: dict[str, Any], where: str) -> FedMoEDA:
    params = manifest.get("params")
    if params is None:  # schema 1 recorded P, τ, I and the gate only
        params = {k: manifest[k] for k in ("top_p", "tau", "refresh_interval", "gate")}
        params["candidates"] = max(16, int(params["top_p"]) + 1)
    try:
        return FedMoEDA(**params)
    except (FedMoeError, TypeError) as exc:
        raise InputError(f"{where}: bad FedMoE-DA parameters ({exc})") from None


def load_plan(source: str | Path) -> LoadedPlan:
    """Read and validate a sync plan (or ``-``)."""
    manifest, base, digest = read_manifest(source, KIND, versions=(1, VERSION, ARRAYS_VERSION))
    where = "<stdin>" if str(source) == "-" else str(source)
    with malformed(where, "sync plan", "re-create it with fedmoe plan-sync"):
        arrays = None
        if manifest["schema_version"] == ARRAYS_VERSION:
            arrays = load_arrays(require(manifest, "arrays", where), base, where)
        loaded = _parse(manifest, digest, where, arrays)
        index = _client_plan_index(manifest, base, arrays, where)
    return dataclasses.replace(loaded, client_plans=index) if index is not None else loaded


def _parse(
    manifest: dict[str, Any],
    digest: str,
    where: str,
    arrays: dict[str, np.ndarray] | None = None,
) -> LoadedPlan:
    try:
        clients = tuple(int(c) for c in require(manifest, "clients", where))
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'clients' must be integers") from None
    if list(clients) != sorted(set(clients)):
        raise InputError(f"{where}: 'clients' must be increasing and distinct")
    if manifest["schema_version"] == 1:
        layers = [
            {"num_experts": require(manifest, "num_experts", where), "targets": manifest["targets"]}
        ]
        participants = clients
    else:
        layers = require(manifest, "layers", where)
        participants = tuple(int(c) for c in require(manifest, "participants", where))
        if list(participants) != sorted(set(participants)):
            raise InputError(f"{where}: 'participants' must be increasing and distinct")
    matrices = tuple(
        matrix_from_rows(
            require(layer, "targets", where),
            ExpertIndex(clients, int(require(layer, "num_experts", where))),
            where,
        )
        if arrays is None
        else _matrix_from_arrays(
            arrays, number, ExpertIndex(clients, int(require(layer, "num_experts", where))), where
        )
        for number, layer in enumerate(layers)
    )
    config = parse_config(require(manifest, "model_config", where), where)
    sizes = PartSizes.from_dict(require(manifest, "sizes", where))
    transfers = (
        _transfers_from_arrays(arrays, where)
        if arrays is not None
        else Transfers.of(
            [
                Transfer(
                    int(t["from"]),
                    int(t["to"]),
                    int(t.get("layer", 0)),
                    tuple(int(x) for x in t["experts"]),
                    int(t["bytes"]),
                )
                for t in manifest.get("transfers", [])
            ]
        )
    )
    led = manifest.get("ledger", {})
    ledger = Ledger(
        *(
            int(led.get(k, 0))
            for k in (
                "clients",
                "server_up",
                "server_down",
                "plan_down",
                "p2p",
                "fedavg_equivalent",
                "max_client_p2p_in",
            )
        )
    )
    plan = SyncPlan(
        int(require(manifest, "round", where)),
        int(require(manifest, "matrix_round", where)),
        _method(manifest, where),
        matrices,
        participants,
        transfers,
        ledger,
    )
    return LoadedPlan(plan, config, sizes, manifest, digest, where)
