"""The one engine that applies a :class:`~fedmoe.aggregate.base.MergeSpec`: for each output client,
each tensor in name order, computed from the sources it needs and handed over as soon as it is
ready.

The role of each tensor comes from the :class:`~fedmoe.model.schema.ModelSchema`. A group's result
is computed once and given to all its members (a cache holds one result per group and tensor, so
memory grows with the number of groups, never with the number of members). Sources are anything
that reads a whole tensor or one expert slice by client (checkpoints on disk, or tensors in
memory), so the CLI and ``fedmoe run`` share this code. Weighted sums are accumulated in float64
and rounded once, so Eq. 11 is reproduced to the last bit of float32 whatever the source order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
import torch

from fedmoe.aggregate.base import CrossExpert, Group, MergeSpec, SameIndex
from fedmoe.aggregate.defence import defend_row
from fedmoe.aggregate.reduce import reduce_tensors, weighted_rows, weighted_sum
from fedmoe.model.schema import ModelSchema, Role, TensorEntry


class TensorSource(Protocol):
    """Read access to the models of a round, by client id (every client of the spec)."""

    def tensor(self, client: int, name: str) -> torch.Tensor:
        """The whole tensor ``name`` of ``client``."""
        ...

    def experts(self, client: int, name: str, indices: list[int]) -> torch.Tensor:
        """Slices ``[indices]`` (along axis 0) of stacked expert tensor ``name``, stacked."""
        ...


class MemorySource:
    """A :class:`TensorSource` over in-memory state dicts."""

    def __init__(self, states: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        self.states = states

    def tensor(self, client: int, name: str) -> torch.Tensor:
        return self.states[client][name]

    def experts(self, client: int, name: str, indices: list[int]) -> torch.Tensor:
        return self.states[client][name][indices]


class Merger:
    """Applies one spec to one source; reuses each group's result across its members."""

    def __init__(
        self,
        spec: MergeSpec,
        schema: ModelSchema,
        source: TensorSource,
        dtypes: Mapping[str, torch.dtype],
        starts: TensorSource | None = None,
    ) -> None:
        self.spec = spec
        self.schema = schema
        self.source = source
        self.dtypes = dtypes
        self.starts = starts  # each target's model at the start of the round (trust defence)
        self._cache: dict[tuple[object, ...], torch.Tensor] = {}
        self._member: dict[tuple[int, int], int | None] = {}

    def _group(self, part: tuple[Group, ...], which: int, client: int) -> int | None:
        key = (which, client)
        if key not in self._member:
            self._member[key] = self.spec.group_of(part, client)
        return self._member[key]

    def _reduce(self, group: Group, name: str) -> torch.Tensor:
        tensors = [self.source.tensor(c, name) for c in group.sources]
        starts = self._starts(group.sources, name)
        return reduce_tensors(self.spec.reduce, tensors, group.weights, self.dtypes[name], starts)

    def tensor(self, client: int, name: str) -> torch.Tensor:
        """Tensor ``name`` of ``client``'s output model."""
        entry = self.schema.entry(name)
        if entry.role is Role.EXPERT:
            assert entry.layer is not None
            return self._expert(client, entry, self.spec.experts[entry.layer])
        part, which = (self.spec.shared, 0) if entry.role is Role.SHARED else (self.spec.gate, 1)
        g = self._group(part, which, client)
        if g is None:
            return self.source.tensor(client, name)
        key = (which, g, name)
        if key not in self._cache:
            self._cache[key] = self._reduce(part[g], name)
        return self._cache[key]

    def _expert(
        self, client: int, entry: TensorEntry, merge: SameIndex | CrossExpert | None
    ) -> torch.Tensor:
        if merge is None:
            return self.source.tensor(client, entry.name)
        if isinstance(merge, SameIndex):
            for g, group in enumerate(merge.groups):
                if client in group.members:
                    key = ("x", entry.layer, g, entry.name)
                    if key not in self._cache:
                        self._cache[key] = self._same_index(group.sources, group.weights, entry)
                    return self._cache[key]
            return self.source.tensor(client, entry.name)
        return self._cross(client, entry, merge)

    def _same_index(
        self, sources: tuple[int, ...], weights: tuple[tuple[float, ...], ...], entry: TensorEntry
    ) -> torch.Tensor:
        """Expert j ← reduce over sources of their expert j, weights row j."""
        dtype = self.dtypes[entry.name]
        if entry.stacked:
            if self.spec.reduce.weighted:
                w = torch.tensor(weights, dtype=torch.float64)  # (E, S)
                acc = torch.zeros(entry.shape, dtype=torch.float64)
                view = (-1,) + (1,) * (len(entry.shape) - 1)
                for s, c in enumerate(sources):
                    t = self.source.tensor(c, entry.name).to(torch.float64)  # (E, ...)
                    acc.add_(t * w[:, s].reshape(view))
                return acc.to(dtype)
            full = [self.source.tensor(c, entry.name) for c in sources]
            begun = self._starts(sources, entry.name)
            parts = [
                reduce_tensors(
                    self.spec.reduce,
                    [t[j] for t in full],
                    weights[j],
                    dtype,
                    None if begun is None else [t[j] for t in begun],
                )
                for j in range(entry.shape[0])
            ]
            return torch.stack(parts)
        assert entry.expert is not None
        tensors = [self.source.tensor(c, entry.name) for c in sources]
        begun = self._starts(sources, entry.name)
        return reduce_tensors(self.spec.reduce, tensors, weights[entry.expert], dtype, begun)

    def _starts(self, sources: tuple[int, ...], name: str) -> list[torch.Tensor] | None:
        """The sources' tensor ``name`` at the start of the round, when the reduce kind needs it."""
        if not self.spec.reduce.needs_start:
            return None
        starts = self._start_source()
        return [starts.tensor(c, name) for c in sources]

    def _start_source(self) -> TensorSource:
        """The start models, which the reduce kind or the defence needs."""
        if self.starts is None:
            raise KeyError("the start models")
        return self.starts

    def _cross(self, client: int, entry: TensorEntry, merge: CrossExpert) -> torch.Tensor:
        """Eq. 11 for ``client``'s experts of one layer."""
        matrix = merge.matrix
        index = matrix.index
        if client not in index.clients:
            return self.source.tensor(client, entry.name)
        e = index.num_experts
        m0 = index.index(client, 0)
        lo, hi = int(matrix.indptr[m0]), int(matrix.indptr[m0 + e])
        srcs = matrix.sources[lo:hi]
        uniq, inverse = np.unique(srcs, return_inverse=True)
        keys = [index.key(int(u)) for u in uniq]
        rows = np.repeat(np.arange(e), np.diff(matrix.indptr[m0 : m0 + e + 1]))
        weights = torch.zeros(e, len(uniq), dtype=torch.float64)  # (E, u)
        weights.index_put_(
            (torch.from_numpy(rows), torch.from_numpy(inverse.reshape(-1))),
            torch.from_numpy(matrix.weights[lo:hi]),
            accumulate=True,
        )
        dtype = self.dtypes[entry.name]
        if entry.stacked:
            # one read per source client for all the experts it contributes (keys are sorted by
            # client, then expert, so the concatenation keeps the order of ``uniq``)
            by_client: dict[int, list[int]] = {}
            for c, j in keys:
                by_client.setdefault(c, []).append(j)
            blocks = [
                _on_wire(self.source.experts(c, entry.name, js), merge.wire, c != client)
                for c, js in by_client.items()
            ]
            if merge.defence.plain:  # Eq. 11 itself, chunk by chunk: no whole float64 copy
                flats = [b.reshape(b.shape[0], -1) for b in blocks]
                return weighted_rows(weights, flats, dtype).reshape(e, *blocks[0].shape[1:])
            stacked = torch.cat(blocks)  # (u, ...)
            flat = stacked.to(torch.float64).reshape(len(uniq), -1)  # (u, ·)
            start = self._start(client, entry.name)
            begun = None
            if merge.defence.reduce.needs_start:  # every source's expert at its start
                begun = self._source_starts(by_client, entry.name).reshape(len(uniq), -1)
            out = torch.stack(
                [
                    self._defended(
                        weights[j], flat, keys, (client, j), merge,
                        None if start is None else start[j].flatten(), begun,
                    )
                    for j in range(e)
                ]
            )  # fmt: skip
            return out.reshape(e, *stacked.shape[1:]).to(dtype)
        assert entry.expert is not None
        # a per-expert tensor: read only the sources of this expert's row
        full_row = weights[entry.expert]
        used = torch.nonzero(full_row).flatten().tolist()
        row = full_row[used]
        keys = [keys[u] for u in used]
        pieces = [
            _on_wire(
                self.source.tensor(c, self.schema.expert_name(entry.slot, j)),
                merge.wire,
                c != client,
            )
            for c, j in keys
        ]
        if merge.defence.plain:  # Eq. 11 itself: one weighted sum, no stacked copy of the sources
            return weighted_sum(list(zip(pieces, row.tolist(), strict=True)), dtype)
        flat = torch.stack(pieces).to(torch.float64).reshape(len(keys), -1)
        start = self._start(client, entry.name)
        flat_start = None if start is None else start.flatten()
        begun = None
        if merge.defence.reduce.needs_start:  # every source's expert at its start
            starts = self._start_source()
            begun = torch.stack(
                [starts.tensor(c, self.schema.expert_name(entry.slot, j)) for c, j in keys]
            ).to(torch.float64)
            begun = begun.reshape(len(keys), -1)
        out = self._defended(row, flat, keys, (client, entry.expert), merge, flat_start, begun)
        return out.reshape(entry.shape).to(dtype)

    def _start(self, client: int, name: str) -> torch.Tensor | None:
        """Tensor ``name`` of ``client``'s model at the start of the round (float64), when the
        defence needs it and it is known."""
        if self.starts is None:
            return None
        try:
            return self.starts.tensor(client, name).to(torch.float64)
        except KeyError:  # a target without a known start: the trust step is skipped
            return None

    @staticmethod
    def _defended(
        row: torch.Tensor,
        flat: torch.Tensor,
        keys: list[tuple[int, int]],
        target: tuple[int, int],
        merge: CrossExpert,
        start: torch.Tensor | None = None,
        begun: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One target expert's tensor under the spec's defence (:mod:`fedmoe.aggregate.defence`):
        only the sources its row names (``begun``: every source's tensor at its start)."""
        used = torch.nonzero(row).flatten().tolist()
        own = next((p for p, u in enumerate(used) if keys[u] == target), None)
        starts = None if begun is None else begun[used]
        return defend_row(flat[used], row[used], own, merge.defence, start, starts)

    def _source_starts(self, by_client: dict[int, list[int]], name: str) -> torch.Tensor:
        """The sources' experts at the start of the round, in the order of ``by_client``."""
        starts = self._start_source()
        return torch.cat([starts.experts(c, name, js) for c, js in by_client.items()]).to(
            torch.float64
        )

    def release(self, name: str) -> None:
        """Forget the cached group results of tensor ``name`` (every member has it)."""
        for key in [k for k in self._cache if k[-1] == name]:
            del self._cache[key]

    def client(
        self, client: int, names: list[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of ``client``'s output model, in the order of ``names``."""
        for name in names if names is not None else self.schema.names:
            yield name, self.tensor(client, name)


def merge_states(
    spec: MergeSpec,
    schema: ModelSchema,
    states: Mapping[int, Mapping[str, torch.Tensor]],
    starts: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Apply ``spec`` to in-memory models (every client of the spec): client id → output tensors.
    Members of one group share the group's tensors (the same objects), and a part a client keeps is
    its input tensor itself: copy before changing an output in place."""
    first = states[spec.clients[0]]
    dtypes = {k: v.dtype for k, v in first.items()}
    merger = Merger(
        spec, schema, MemorySource(states), dtypes, MemorySource(starts) if starts else None
    )
    return {c: dict(merger.client(c)) for c in spec.clients}


def _on_wire(t: torch.Tensor, wire: str | None, remote: bool) -> torch.Tensor:
    """A source expert as its target receives it: rounded to the wire's dtype when it comes from
    another client (``FedMoEDA.wire``; the merge then widens it exactly), as stored otherwise."""
    if not remote or wire is None:
        return t
    dtype = getattr(torch, wire)
    return t if t.dtype == dtype else t.to(dtype)
