"""The one engine that applies a :class:`MergeSpec`: for each output client, each tensor in name
order, computed from the sources it needs and handed to a sink as soon as it is ready.

Sources are anything that can read a whole tensor or one expert slice by client (checkpoints on
disk through ``safe_open``, or tensors in memory), so the CLI and the ``run`` orchestrator share
this code. Sums are accumulated in float64 and rounded once to the tensor's dtype, so Eq. 11 is
reproduced to the last bit of float32 whatever the order of the sources.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from fedmoe.aggregate.base import MergeSpec


class TensorSource(Protocol):
    """Read access to the input models, by client id."""

    def tensor(self, client: int, name: str) -> torch.Tensor:
        """The whole tensor ``name`` of ``client``."""
        ...

    def expert(self, client: int, name: str, index: int) -> torch.Tensor:
        """Slice ``[index]`` of expert tensor ``name`` of ``client``."""
        ...


class MemorySource:
    """A :class:`TensorSource` over in-memory state dicts."""

    def __init__(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        self.states = states

    def tensor(self, client: int, name: str) -> torch.Tensor:
        return self.states[client][name]

    def expert(self, client: int, name: str, index: int) -> torch.Tensor:
        return self.states[client][name][index]


def _weighted(parts: list[tuple[torch.Tensor, float]], dtype: torch.dtype) -> torch.Tensor:
    """Σ w·t in float64, rounded once to ``dtype``."""
    acc = torch.zeros(parts[0][0].shape, dtype=torch.float64)
    for t, w in parts:
        acc.add_(t.to(torch.float64), alpha=w)
    return acc.to(dtype)


def merge_client(
    spec: MergeSpec,
    source: TensorSource,
    client: int,
    names: list[str],
    dtypes: dict[str, torch.dtype],
    cache: dict[tuple[object, ...], torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of ``client``'s output model, in the order of ``names``.

    Parameters
    ----------
    spec
        The merge.
    source
        The input models.
    client
        The output client.
    names
        Every tensor name of the model.
    dtypes
        Name → dtype of the outputs.
    cache
        Shared parts computed for an earlier client with the same sources are reused from here.
    """
    index = spec.experts.index
    e = index.num_experts
    for name in names:
        if name.startswith("experts."):
            m0 = index.index(client, 0)
            lo, hi = int(spec.experts.indptr[m0]), int(spec.experts.indptr[m0 + e])
            srcs = spec.experts.sources[lo:hi]
            uniq, inverse = np.unique(srcs, return_inverse=True)
            keys = [index.key(int(u)) for u in uniq]
            stacked = torch.stack([source.expert(c, name, j) for c, j in keys])  # (u, ...)
            stacked = stacked.to(torch.float64)
            weights = torch.zeros(e, len(uniq), dtype=torch.float64)  # (E, u)
            rows = np.repeat(np.arange(e), np.diff(spec.experts.indptr[m0 : m0 + e + 1]))
            w = torch.from_numpy(spec.experts.weights[lo:hi])
            weights.index_put_(
                (torch.from_numpy(rows), torch.from_numpy(inverse.reshape(-1))), w, accumulate=True
            )
            out = (weights @ stacked.reshape(len(uniq), -1)).reshape(e, *stacked.shape[1:])
            yield name, out.to(dtypes[name])
        elif name.startswith("gate.") and not spec.gate_shared:
            yield name, source.tensor(client, name)
        else:
            pairs = spec.shared[client]
            key = (name, pairs)
            if cache is not None and key in cache:
                yield name, cache[key]
                continue
            out = _weighted([(source.tensor(c, name), w) for c, w in pairs], dtypes[name])
            if cache is not None:
                cache[key] = out
            yield name, out


def merge_states(
    spec: MergeSpec, states: dict[int, dict[str, torch.Tensor]]
) -> dict[int, dict[str, torch.Tensor]]:
    """Apply ``spec`` to in-memory models: client id → output tensors."""
    source = MemorySource(states)
    first = states[spec.index.clients[0]]
    names = sorted(first)
    dtypes = {k: v.dtype for k, v in first.items()}
    cache: dict[tuple[object, ...], torch.Tensor] = {}
    return {
        c: dict(merge_client(spec, source, c, names, dtypes, cache)) for c in spec.index.clients
    }
