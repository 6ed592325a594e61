"""The peer-to-peer transfer list implied by A (FedMoE-DA, arXiv 2411.02115, Eq. 11): client
i needs θ_{i',j'} of MoE layer l for every kept source with i' ≠ i and fetches it directly from
peer i', once, however many of its own experts use it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fedmoe.plan.matrix import AggregationMatrix


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-D integer array, by one sort and a mask: NumPy 2.3 and later hash
    the values first, which is ~30× slower at the ~590,000 keys of an 8,192-client plan."""
    ordered = np.sort(values)
    keep = np.empty(ordered.shape[0], dtype=bool)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


@dataclass(frozen=True)
class Transfer:
    """Experts of one MoE layer that one client sends another."""

    source: int  # client that sends
    target: int  # client that fetches
    layer: int  # MoE layer
    experts: tuple[int, ...]  # expert indices j' of the sender, increasing
    bytes: int  # len(experts) × bytes per expert of this layer


@dataclass(frozen=True, eq=False)
class Transfers:
    """A transfer list as columns (a federation of thousands of clients moves hundreds of
    thousands of (sender, receiver) pairs a round: one object each would cost ~200 bytes and a
    Python loop everywhere). Row t: ``source[t]`` sends ``experts[indptr[t]:indptr[t+1]]`` of
    MoE layer ``layer[t]`` to ``target[t]``, ``bytes[t]`` in all."""

    source: np.ndarray  # (T,) int64 sending client
    target: np.ndarray  # (T,) int64 fetching client
    layer: np.ndarray  # (T,) int64 MoE layer
    bytes: np.ndarray  # (T,) int64
    indptr: np.ndarray  # (T + 1,) int64
    experts: np.ndarray  # (X,) int64 expert indices j' of the sender, increasing per row

    @classmethod
    def empty(cls) -> Transfers:
        """No transfer."""
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, np.zeros(1, dtype=np.int64), z)

    @classmethod
    def of(cls, items: list[Transfer]) -> Transfers:
        """The table of ``items``, in their order."""
        ptr = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum([len(t.experts) for t in items], out=ptr[1:])
        return cls(
            np.array([t.source for t in items], dtype=np.int64),
            np.array([t.target for t in items], dtype=np.int64),
            np.array([t.layer for t in items], dtype=np.int64),
            np.array([t.bytes for t in items], dtype=np.int64),
            ptr,
            np.array([j for t in items for j in t.experts], dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: list[Transfers]) -> Transfers:
        """The rows of ``parts`` together, ordered by (sender, receiver, layer)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        source = np.concatenate([p.source for p in parts])
        target = np.concatenate([p.target for p in parts])
        layer = np.concatenate([p.layer for p in parts])
        sizes = np.concatenate([p.bytes for p in parts])
        counts = np.concatenate([np.diff(p.indptr) for p in parts])
        experts = np.concatenate([p.experts for p in parts])
        order = np.lexsort((layer, target, source))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[order]
        counts = counts[order]
        ptr = np.zeros(order.size + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        take = np.repeat(starts - ptr[:-1], counts) + np.arange(int(ptr[-1]))
        return cls(source[order], target[order], layer[order], sizes[order], ptr, experts[take])

    def __len__(self) -> int:
        return int(self.source.size)

    def __iter__(self) -> Iterator[Transfer]:
        bounds, flat = self.indptr.tolist(), self.experts.tolist()
        for t, (s, r, lay, size) in enumerate(
            zip(
                self.source.tolist(),
                self.target.tolist(),
                self.layer.tolist(),
                self.bytes.tolist(),
                strict=True,
            )
        ):
            yield Transfer(s, r, lay, tuple(flat[bounds[t] : bounds[t + 1]]), size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Transfers):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f), getattr(other, f))
            for f in ("source", "target", "layer", "bytes", "indptr", "experts")
        )

    __hash__ = None  # type: ignore[assignment]

    def received(self) -> dict[int, int]:
        """Bytes each receiving client fetches."""
        uniq, inv = np.unique(self.target, return_inverse=True)
        totals = np.bincount(inv, weights=self.bytes, minlength=uniq.size)
        return {int(c): int(b) for c, b in zip(uniq.tolist(), totals.tolist(), strict=True)}


def transfer_table(matrix: AggregationMatrix, expert_bytes: int, layer: int = 0) -> Transfers:
    """Every (sender → receiver) pair with the experts it moves, ordered by (sender, receiver)."""
    index = matrix.index
    e, n = index.num_experts, len(index.clients)
    clients = np.asarray(index.clients, dtype=np.int64)
    tgt = matrix.targets // e  # (nnz,) receiving client's position
    src = matrix.sources // e  # (nnz,) sending client's position
    remote = src != tgt
    # one int64 key per (sender, receiver, expert), sender-major: unique sorts and dedups at once
    keys = sorted_unique((src[remote] * n + tgt[remote]) * e + matrix.sources[remote] % e)
    if keys.size == 0:
        return Transfers.empty()
    pair = keys // e
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
    ptr = np.append(starts, keys.size).astype(np.int64)
    counts = np.diff(ptr)
    return Transfers(
        clients[pair[starts] // n],
        clients[pair[starts] % n],
        np.full(starts.size, layer, dtype=np.int64),
        counts * expert_bytes,
        ptr,
        keys % e,
    )


def transfer_list(matrix: AggregationMatrix, expert_bytes: int, layer: int = 0) -> list[Transfer]:
    """:func:`transfer_table` as a list of :class:`Transfer`."""
    return list(transfer_table(matrix, expert_bytes, layer))
