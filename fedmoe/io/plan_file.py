"""The sync plan (``kind: "sync-plan"``): what ``fedmoe plan-sync`` writes, the server sends each
client (its rows), and ``fedmoe aggregate --plan`` applies.

Layout (schema 1)::

    schema_version, kind, fedmoe_version
    round, matrix_round, refreshed, top_p, tau, refresh_interval, gate ("per-client" | "shared")
    affinity: {path, sha256} | null (null when the matrix was reused)
    previous_plan: {path, sha256, reused} | null                model_config, sizes
    clients: [ids], num_experts
    targets:   [{client, expert, sources: [{client, expert, weight, similarity}]}]  weights sum to 1
    transfers: [{from, to, experts: [j'], bytes}]
    ledger:    {server_up, server_down, plan_down, server_total, p2p, fedavg_equivalent, ...}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.affinity import ExpertIndex
from fedmoe.errors import InputError
from fedmoe.io.manifest import header, read_manifest, require
from fedmoe.model.config import MoEConfig
from fedmoe.plan import (
    AggregationMatrix,
    Ledger,
    TensorSizes,
    Transfer,
    traffic_ledger,
    transfer_list,
)

KIND = "sync-plan"
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


def plan_bytes_per_client(rows: list[dict[str, Any]]) -> dict[int, int]:
    """Bytes of each client's rows as compact JSON: what the server sends that client."""
    by_client: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_client.setdefault(row["client"], []).append(row)
    return {c: len(json.dumps(r, separators=(",", ":")).encode()) for c, r in by_client.items()}


def transfer_rows(transfers: list[Transfer]) -> list[dict[str, Any]]:
    """The ``transfers`` entries."""
    return [
        {"from": t.source, "to": t.target, "experts": list(t.experts), "bytes": t.bytes}
        for t in transfers
    ]


@dataclass(frozen=True)
class PlanSettings:
    """How a plan's matrix was made and is used (the plan's scalar fields)."""

    round: int  # the round this plan is for
    matrix_round: int  # the round whose affinity built the matrix (< round when reused)
    top_p: int  # P
    tau: float  # τ
    refresh_interval: int  # I
    gate: str  # "per-client" or "shared"


def build_plan(
    matrix: AggregationMatrix,
    settings: PlanSettings,
    config: MoEConfig,
    sizes: TensorSizes,
    affinity: dict[str, Any] | None = None,
    previous_plan: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Ledger]:
    """The sync-plan manifest of ``matrix``: targets, transfers and the traffic ledger."""
    rows = target_rows(matrix)
    transfers = transfer_list(matrix, sizes.expert)
    ledger = traffic_ledger(
        sizes,
        list(matrix.index.clients),
        transfers,
        plan_bytes_per_client(rows),
        settings.gate == "shared",
    )
    plan = {
        **header(KIND),
        "round": settings.round,
        "matrix_round": settings.matrix_round,
        "refreshed": settings.matrix_round == settings.round,
        "top_p": settings.top_p,
        "tau": settings.tau,
        "refresh_interval": settings.refresh_interval,
        "gate": settings.gate,
        "affinity": affinity,
        "previous_plan": previous_plan,
        "model_config": json.loads(config.to_json()),
        "sizes": {**sizes.__dict__, "model": sizes.model},
        "clients": list(matrix.index.clients),
        "num_experts": matrix.index.num_experts,
        "targets": rows,
        "transfers": transfer_rows(transfers),
        "ledger": ledger.to_dict(),
    }
    return plan, ledger


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

    matrix: AggregationMatrix  # A
    manifest: dict[str, Any]  # the raw plan
    sha256: str  # of the bytes read

    def field(self, key: str) -> Any:
        """``manifest[key]``, or an :class:`InputError` naming the missing key."""
        return require(self.manifest, key, self.where)

    @property
    def where(self) -> str:
        """How errors name this plan."""
        return str(self.manifest.get("_where", "sync plan"))


def load_plan(source: str | Path) -> LoadedPlan:
    """Read and validate a sync plan (or ``-``)."""
    manifest, _, digest = read_manifest(source, KIND)
    where = "<stdin>" if str(source) == "-" else str(source)
    try:
        clients = tuple(int(c) for c in require(manifest, "clients", where))
        num_experts = int(require(manifest, "num_experts", where))
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'clients' and 'num_experts' must be integers") from None
    if list(clients) != sorted(set(clients)):
        raise InputError(f"{where}: 'clients' must be increasing and distinct")
    index = ExpertIndex(clients, num_experts)
    matrix = matrix_from_rows(require(manifest, "targets", where), index, where)
    for key in ("round", "matrix_round", "top_p", "tau", "model_config", "sizes", "gate"):
        require(manifest, key, where)
    return LoadedPlan(matrix, {**manifest, "_where": where}, digest)
