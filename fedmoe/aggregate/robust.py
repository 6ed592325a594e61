"""The reduce parameters a server-averaging method declares (shared by the methods that average)."""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe.aggregate.reduce import Reduce, ReduceKind
from fedmoe.params import param


@dataclass(frozen=True, kw_only=True)
class ReduceParams:
    """How the server combines the clients of a group: the weighted mean, or a robust statistic."""

    reduce: ReduceKind = param(
        ReduceKind.MEAN,
        "mean, median, trimmed-mean, clipped-mean, aligned-mean or multi-krum (median and"
        " trimmed-mean unweighted; aligned-mean needs each participant's start model)",
    )
    trim: float = param(
        0.1,
        "trimmed-mean: share cut at each end per coordinate; multi-krum: share of clients dropped",
        ge=0.0,
        lt=0.5,
    )
    clip: float = param(1.0, "clipped-mean: L2 radius of a deviation from the median", gt=0.0)
    krum_ratio: float = param(
        0.0,
        "multi-krum: drop a client only if its score exceeds this multiple of the median score"
        " (0: always drop the share trim)",
        ge=0.0,
    )

    def reducer(self) -> Reduce:
        """The :class:`Reduce` these parameters describe."""
        return Reduce(self.reduce, self.trim, self.clip, self.krum_ratio)
