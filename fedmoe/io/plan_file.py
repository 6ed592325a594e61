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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.affinity import ExpertIndex
from fedmoe.aggregate.fedmoe_da import FedMoEDA
from fedmoe.errors import FedMoeError, InputError
from fedmoe.io.affinity_file import json_config, parse_config
from fedmoe.io.manifest import header, malformed, read_manifest, require
from fedmoe.model.hf import ModelConfig
from fedmoe.model.schema import PartSizes
from fedmoe.params import params_dict as method_params
from fedmoe.plan import AggregationMatrix, Ledger, Transfer
from fedmoe.round.sync import SyncPlan

KIND = "sync-plan"
VERSION = 2
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
) -> dict[str, Any]:
    """The sync-plan manifest of ``plan``."""
    m = plan.method
    return {
        **header(KIND, VERSION),
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
        "layers": [
            {"layer": layer, "num_experts": mat.index.num_experts, "targets": target_rows(mat)}
            for layer, mat in enumerate(plan.matrices)
        ],
        "transfers": [
            {
                "from": t.source,
                "to": t.target,
                "layer": t.layer,
                "experts": list(t.experts),
                "bytes": t.bytes,
            }
            for t in plan.transfers
        ],
        "ledger": plan.ledger.to_dict(),
    }


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
class LoadedPlan:
    """A validated sync plan."""

    plan: SyncPlan  # matrices, participants, method, transfers, ledger
    config: ModelConfig  # the model it was made for
    sizes: PartSizes
    manifest: dict[str, Any]  # the raw plan
    sha256: str  # of the bytes read
    where: str  # how errors name this plan


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
    manifest, _, digest = read_manifest(source, KIND, versions=(1, VERSION))
    where = "<stdin>" if str(source) == "-" else str(source)
    with malformed(where, "sync plan", "re-create it with fedmoe plan-sync"):
        return _parse(manifest, digest, where)


def _parse(manifest: dict[str, Any], digest: str, where: str) -> LoadedPlan:
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
        for layer in layers
    )
    config = parse_config(require(manifest, "model_config", where), where)
    sizes = PartSizes.from_dict(require(manifest, "sizes", where))
    transfers = tuple(
        Transfer(
            int(t["from"]),
            int(t["to"]),
            int(t.get("layer", 0)),
            tuple(int(x) for x in t["experts"]),
            int(t["bytes"]),
        )
        for t in manifest.get("transfers", [])
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
