"""The sync plan of a round (FedMoE-DA, arXiv 2411.02115, Eq. 9–11): fresh matrices from an
affinity artefact, or the previous plan's matrices reused within the refresh interval I, then the
rows applied to this round's participants, their transfers and the traffic ledger."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedmoe.aggregate.fedmoe_da import FedMoEDA
from fedmoe.errors import ParamError, UsageError
from fedmoe.io.affinity_file import LoadedAffinity
from fedmoe.io.manifest import STDIO, relative
from fedmoe.io.plan_file import LoadedPlan, plan_to_manifest
from fedmoe.plan.transfers import sorted_unique
from fedmoe.round import SyncPlan, build_matrices, plan_sync


def _ref(source: str, base: Path) -> str:
    return "<stdin>" if source == STDIO else relative(Path(source), base)


def sync_artefact(
    method: FedMoEDA,
    round_: int | None,
    participants: list[int] | None,
    affinity: LoadedAffinity | None,
    affinity_source: str | None,
    previous: LoadedPlan | None,
    previous_source: str | None,
    base: Path,
    inline: bool = True,
) -> tuple[SyncPlan, dict[str, Any]]:
    """Build this round's sync plan and its manifest.

    Parameters
    ----------
    method
        FedMoE-DA's parameters (P, τ, I, gate, interval reading).
    round_
        This round (default: the affinity's round, else the previous plan's round + 1).
    participants
        Clients that trained this round (default: the affinity's fresh clients).
    affinity, affinity_source
        The affinity artefact (needed when the matrices are recomputed) and how it was named.
    previous, previous_source
        The previous round's plan, whose matrices are reused while ``round - matrix_round < I``.
    base
        The folder the plan's paths are written relative to.
    inline
        False: the matrices and transfers are left to a binary companion (the caller stages it).
    """
    if round_ is None:
        if affinity is not None:
            round_ = affinity.affinity.round
        elif previous is not None:
            round_ = previous.plan.round + 1
        else:
            raise UsageError("give --round, an affinity artefact or a previous plan")
    if round_ < 1:
        raise ParamError("round", round_, "must be >= 1")
    if previous is not None and round_ <= previous.plan.round:
        raise ParamError(
            "round",
            round_,
            f"must come after the previous plan's round {previous.plan.round}",
            hint=f"for example {previous.plan.round + 1}",
        )
    reuse = previous is not None and not method.refresh_due(round_, previous.plan.matrix_round)
    if reuse:  # the matrices were made with the previous plan's P, τ and candidates: keep them
        assert previous is not None
        method = previous.plan.method

    if reuse:
        assert previous is not None
        matrices, matrix_round = previous.plan.matrices, previous.plan.matrix_round
        config, sizes = previous.config, previous.sizes
        aff_ref = None
    else:
        if affinity is None:
            raise UsageError(
                "an affinity artefact is needed to compute the matrix this round",
                hint="fedmoe affinity CKPTS | fedmoe plan-sync -",
            )
        matrices = build_matrices(
            affinity.affinity,
            method.top_p,
            method.tau,
            method.min_weight,
            method.top_clients,
            method.csls,
        )
        method = dataclasses.replace(
            method,
            candidates=affinity.affinity.layers[0].neighbours.k,
            pool_layers=affinity.affinity.pooled,
            centred=affinity.affinity.centred,
        )
        matrix_round, config, sizes = round_, affinity.config, affinity.sizes
        aff_ref = {"path": _ref(str(affinity_source), base), "sha256": affinity.sha256}
    if participants is None:
        if affinity is None or reuse:
            raise UsageError(
                "say which clients take part in this round",
                hint="pass --participants 0,3,5 (the clients whose checkpoints you aggregate)",
            )
        stale = set(affinity.affinity.stale)
        participants = [c for c in affinity.affinity.clients if c not in stale]
    plan = plan_sync(matrices, matrix_round, round_, participants, method, sizes)
    prev_ref = None
    if previous is not None:
        prev_ref = {
            "path": _ref(str(previous_source), base),
            "sha256": previous.sha256,
            "reused": reuse,
        }
    manifest = plan_to_manifest(plan, config, sizes, aff_ref, prev_ref, inline)
    if not reuse and affinity is not None:  # the uploads the fresh matrices were computed from
        taking = set(plan.participants)
        manifest["uploads"] = {
            str(i["client"]): i["sha256"]
            for i in affinity.manifest.get("inputs", [])
            if not i.get("stale") and int(i["client"]) in taking
        }
    return plan, manifest


CLIENT_PLAN = "client-plan"


def client_plans(plan: SyncPlan, manifest: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """Each participant's own small plan, as one compact JSON text: its rows of every layer's
    applied matrix (sources as ``[client, expert, weight]``, exact float64 weights: a source of
    another client is an expert to fetch) and the peers it fetches from: what the server sends
    that client (the full plan grows with every client; this one with P and E only). Each fetched
    expert is checked against the sha256 its sender published (:mod:`fedmoe.io.exchange`).
    Written as text directly: at 8,192 clients there are ~600,000 sources, too many to build as
    objects."""
    from fedmoe.io.manifest import header

    parts: dict[int, list[str]] = {c: [] for c in plan.participants}
    for layer, mat in enumerate(plan.applied()):
        index, e = mat.index, mat.index.num_experts
        clients = np.asarray(index.clients, dtype=np.int64)
        src_client = clients[mat.sources // e]  # (nnz,) each source's client id
        src_expert = mat.sources % e
        bounds = mat.indptr.tolist()
        for pos, c in enumerate(index.clients):
            if c not in parts:
                continue
            lo, hi = bounds[pos * e], bounds[pos * e + e]  # this client's rows, contiguous
            entries = [
                f"[{sc},{sj},{w!r}]"
                for sc, sj, w in zip(
                    src_client[lo:hi].tolist(),
                    src_expert[lo:hi].tolist(),
                    mat.weights[lo:hi].tolist(),
                    strict=True,
                )
            ]
            experts = ",".join(
                f'{{"expert":{j},"sources":['
                + ",".join(entries[bounds[pos * e + j] - lo : bounds[pos * e + j + 1] - lo])
                + "]}"
                for j in range(e)
            )
            parts[c].append(f'{{"layer":{layer},"num_experts":{e},"experts":[{experts}]}}')
    ts = plan.transfers  # unique (receiver, sender) keys sort by receiver, then sender
    pairs = sorted_unique(ts.target * (1 << 31) + ts.source) if len(ts) else np.zeros(0, np.int64)
    receivers, senders = (pairs >> 31).tolist(), (pairs & ((1 << 31) - 1)).tolist()
    peers: dict[int, list[str]] = {c: [] for c in plan.participants}
    for dst, src in zip(receivers, senders, strict=True):
        if dst in peers:
            peers[dst].append(str(src))
    affinity = manifest.get("affinity")
    for c in plan.participants:
        head = {
            **header(CLIENT_PLAN),
            "client": c,
            "round": plan.round,
            "matrix_round": plan.matrix_round,
            "gate": plan.method.gate.value,
            "merges_experts": plan.merges_experts,
            "affinity_sha256": affinity["sha256"] if affinity else None,
        }
        rows = parts.pop(c)  # each client's text is released once yielded
        yield (
            c,
            (
                json.dumps(head, separators=(",", ":"))[:-1]
                + f',"layers":[{",".join(rows)}],"peers":[{",".join(peers[c])}]}}'
            ),
        )


def write_client_plans(
    handle: BinaryIO, plans: Iterator[tuple[int, str]]
) -> tuple[str, int, list[tuple[int, int, int, str]]]:
    """Write the client plans to ``handle``, one line each (in the order given: increasing client
    id), as they are made; returns the file's sha256, its size and its index: (client, byte
    offset, length, sha256 of the line). A client fetches its line alone, by byte range, as it
    fetches experts from the exchange."""
    import hashlib

    whole = hashlib.sha256()
    index: list[tuple[int, int, int, str]] = []
    offset = 0
    for c, text in plans:
        line = (text + "\n").encode()
        handle.write(line)
        whole.update(line)
        index.append((c, offset, len(line), hashlib.sha256(line).hexdigest()))
        offset += len(line)
    return whole.hexdigest(), offset, index
