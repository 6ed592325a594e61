"""A round's merge for an engine whose server holds no client's model (Flower): the merge spec of
any method split into what the server computes and what each client computes itself.

The server computes each group's result from the tensors it received: the shared and gate
tensors (FedAvg of the small parts), and, for the server-mediated baselines that upload whole
models, experts merged index by index. Each member receives its groups' results. FedMoE-DA's
Eq. 11 is not computed by the server: each participating target receives its own rows of A
(:func:`target_rows`) and merges them with the source experts it fetches from the peers, through
the same :class:`~fedmoe.aggregate.engine.Merger` as every other merge, so both give the same bits.

A client that sat a round out receives the round's results for the groups it belongs to when the
server next contacts it. A later result of a part replaces the whole part, so only the latest one
per client and part is kept (:class:`Outbox`): the server holds one copy of each group's result,
shared by its members, and drops it once every member has received it or a newer one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedmoe.affinity.proxies import ExpertIndex
from fedmoe.aggregate.base import MergeSpec, SameIndex
from fedmoe.aggregate.engine import Merger
from fedmoe.errors import InputError
from fedmoe.model.schema import ModelSchema, Role, TensorEntry
from fedmoe.plan.matrix import AggregationMatrix

Part = tuple[str, int]  # ("shared", 0), ("gate", 0) or ("experts", MoE layer)


class Outbox:
    """Each client's pending group results, the latest per part; results shared by members."""

    def __init__(self) -> None:
        self._results: dict[int, dict[str, torch.Tensor]] = {}
        self._users: dict[int, int] = {}  # result id → clients still to receive it
        self._pending: dict[int, dict[Part, int]] = {}
        self._next = 0

    def _post(self, part: Part, members: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> None:
        rid = self._next
        self._next += 1
        self._results[rid] = tensors
        self._users[rid] = 0
        for c in members:
            old = self._pending.setdefault(c, {}).get(part)
            if old is not None:
                self._release(old)
            self._pending[c][part] = rid
            self._users[rid] += 1
        if not self._users[rid]:
            self._drop(rid)

    def _release(self, rid: int) -> None:
        self._users[rid] -= 1
        if not self._users[rid]:
            self._drop(rid)

    def _drop(self, rid: int) -> None:
        del self._results[rid]
        del self._users[rid]

    def post(
        self, spec: MergeSpec, schema: ModelSchema, states: Mapping[int, Mapping[str, torch.Tensor]]
    ) -> None:
        """Compute the group results of ``spec`` from ``states`` (what the participants sent:
        at least the tensors of every part the spec merges on the server) and queue them for
        their members."""
        dtypes = {e.name: _dtype(states, e.name) for e in _server_entries(spec, schema)}
        from fedmoe.aggregate.engine import MemorySource

        merger = Merger(spec, schema, MemorySource(states), dtypes)
        parts: list[tuple[Part, tuple[int, ...], list[str]]] = []
        shared = [e.name for e in schema.shared()]
        gates = [e.name for e in schema.gates()]
        for group in spec.shared:
            parts.append((("shared", 0), group.members, shared))
        for group in spec.gate:
            parts.append((("gate", 0), group.members, gates))
        for layer, merge in enumerate(spec.experts):
            if isinstance(merge, SameIndex):
                names = [e.name for e in schema.experts(layer)]
                for eg in merge.groups:
                    parts.append((("experts", layer), eg.members, names))
        for part, members, names in parts:
            if members:
                self._post(part, members, {n: merger.tensor(members[0], n) for n in names})

    def take(self, client: int) -> dict[str, torch.Tensor]:
        """Every pending result of ``client`` (tensor name → tensor), now delivered."""
        out: dict[str, torch.Tensor] = {}
        for rid in self._pending.pop(client, {}).values():
            out.update(self._results[rid])
            self._release(rid)
        return out

    @property
    def held_bytes(self) -> int:
        """Bytes of the results held (the server's memory for them)."""
        return sum(t.numel() * t.element_size() for r in self._results.values() for t in r.values())


def _server_entries(spec: MergeSpec, schema: ModelSchema) -> list[TensorEntry]:
    entries = list(schema.shared()) + list(schema.gates())
    for layer, merge in enumerate(spec.experts):
        if isinstance(merge, SameIndex):
            entries.extend(schema.experts(layer))
    return entries


def _dtype(states: Mapping[int, Mapping[str, torch.Tensor]], name: str) -> torch.dtype:
    for state in states.values():
        if name in state:
            return state[name].dtype
    return torch.float32  # a tensor no group reduces: never read


def uploaded_names(roles: frozenset[Role], schema: ModelSchema) -> list[str]:
    """The tensors a participant sends the server: those of the parts in ``roles`` (FedMoE-DA:
    shared and gate; FedAvg: every part; FedPer: the shared parts; local training: none)."""
    return sorted(e.name for e in schema.entries if e.role in roles)


def target_rows(matrix: AggregationMatrix, client: int) -> dict[str, Any]:
    """``client``'s rows of an applied matrix, as plain data: the participants (the numbering),
    E, and per expert j its sources (client-expert numbers) and weights (exact floats)."""
    index = matrix.index
    e = index.num_experts
    rows: list[list[Any]] = []
    if client in index.clients:
        m0 = index.index(client, 0)
        for j in range(e):
            lo, hi = int(matrix.indptr[m0 + j]), int(matrix.indptr[m0 + j + 1])
            rows.append(
                [
                    [int(s) for s in matrix.sources[lo:hi]],
                    [float(w) for w in matrix.weights[lo:hi]],
                    [float(r) for r in matrix.similarity[lo:hi]],
                ]
            )
    return {"clients": list(index.clients), "num_experts": e, "target": client, "rows": rows}


def matrix_from_rows(data: Mapping[str, Any], where: str) -> AggregationMatrix:
    """The matrix with only the target's rows (every other row empty), from :func:`target_rows`:
    what :class:`~fedmoe.aggregate.engine.Merger` needs to merge that target's experts."""
    try:
        clients = tuple(int(c) for c in data["clients"])
        e = int(data["num_experts"])
        target = int(data["target"])
        rows = data["rows"]
        index = ExpertIndex(clients, e)
        counts = np.zeros(index.size, dtype=np.int64)
        srcs: list[int] = []
        wts: list[float] = []
        sims: list[float] = []
        if rows:
            m0 = index.index(target, 0)
            if len(rows) != e:
                raise ValueError("one row per expert")
            for j, (s, w, r) in enumerate(rows):
                if not (len(s) == len(w) == len(r)) or not s:
                    raise ValueError("a row's sources, weights and similarities differ in length")
                if any(not 0 <= int(x) < index.size for x in s):
                    raise ValueError("a source outside the numbering")
                counts[m0 + j] = len(s)
                srcs += [int(x) for x in s]
                wts += [float(x) for x in w]
                sims += [float(x) for x in r]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: malformed plan rows ({exc})") from None
    indptr = np.zeros(index.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return AggregationMatrix(
        index,
        indptr,
        np.asarray(srcs, dtype=np.int64),
        np.asarray(wts, dtype=np.float64),
        np.asarray(sims, dtype=np.float64),
    )


def row_sources(matrix: AggregationMatrix, client: int) -> list[tuple[int, int]]:
    """(source client, expert) of every entry of ``client``'s rows, other clients only, sorted."""
    index = matrix.index
    if client not in index.clients:
        return []
    e = index.num_experts
    m0 = index.index(client, 0)
    lo, hi = int(matrix.indptr[m0]), int(matrix.indptr[m0 + e])
    keys = {index.key(int(s)) for s in matrix.sources[lo:hi]}
    return sorted(k for k in keys if k[0] != client)
