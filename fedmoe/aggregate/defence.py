"""Per-target defences of the Eq. 11 expert merge against malicious or broken peers.

In FedMoE-DA a client merges experts that other clients send it directly (arXiv 2411.02115,
Eq. 11); the server never sees them, so a defence against a bad peer belongs to the target
itself, which holds its own trained expert and the sources its row of A names. Three defences,
applied to one row (one target expert, one tensor) in this order, each optional:

1. **Outlier down-weighting** (``outlier = k > 0``): with med the coordinate-wise median of the
   row's sources and d_s = ‖x_s − med‖, each source other than the target's own expert gets its
   weight multiplied by min(1, k·median(d) / d_s), and the row's weights are renormalised — a
   source much farther from its peers than is typical of them loses influence smoothly. Our
   design, in the spirit of median-distance filtering (e.g. Blanchard et al.'s Krum, NeurIPS 2017,
   which scores by distances to the nearest peers); it keeps Eq. 11's domain weights otherwise.
2. **Norm bounding against the target's own** (``bound = ρ > 0``): each source's difference from
   the target's own expert is scaled to an L2 norm of at most ρ·‖x_own‖ (Sun et al., "Can You
   Really Backdoor Federated Learning?", 2019, bound update norms by a fixed radius; we centre on
   the target and make the radius relative, so one value serves every tensor and model size).
   With ρ = ∞ the result is Eq. 11 exactly, since the row's weights sum to one.
3. **Trust in the direction of the target's own update** (``trust``): with θ0 the target's expert
   at the start of the round and u = x_own − θ0 its own update, each other source gets its weight
   multiplied by max(0, cos(x_s − θ0, u)), and the row's weights are renormalised. This is the
   trust score of FLTrust (Cao et al., NDSS 2021), with the target's own update in the role of the
   server's root-dataset update: a peer that moved the target's expert against the way the
   target's own data moved it (a flipped or unrelated update) is not merged. It needs θ0 (the
   target's model before its local training); without it the step is skipped.
4. **The reduce kind** over the (re-weighted, bounded) sources: the weighted mean (Eq. 11), or
   the coordinate-wise median, trimmed mean, centred clipping or aligned mean of
   :mod:`fedmoe.aggregate.reduce` (the median and trimmed mean ignore the weights, as in Yin et
   al., ICML 2018; the aligned mean weighs each source's own one-round update by its agreement
   with the row's median update, so it needs every source's start model).

Departure from the paper: the paper trusts every peer; with every defence off (the default) the
merge is the paper's Eq. 11, bit for bit. Each defence acts per tensor of the expert (weights and
biases separately), so the merge still streams tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from fedmoe.aggregate.reduce import Reduce, ReduceKind, reduce_tensors


@dataclass(frozen=True)
class ExpertDefence:
    """How a target combines the sources of one row of A."""

    reduce: Reduce = Reduce()  # mean = Eq. 11
    bound: float = 0.0  # ρ: relative L2 radius around the target's own expert (0: off)
    outlier: float = 0.0  # k: down-weight sources beyond k × the median distance (0: off)
    trust: bool = False  # weigh sources by the cosine of their move to the target's own update

    @property
    def plain(self) -> bool:
        """True when the merge is Eq. 11 itself (no defence)."""
        return (
            self.reduce.kind is ReduceKind.MEAN
            and self.bound <= 0
            and self.outlier <= 0
            and not self.trust
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "reduce": self.reduce.to_dict(),
            "bound": self.bound,
            "outlier": self.outlier,
            "trust": self.trust,
        }


def defend_row(
    x: torch.Tensor,
    weights: torch.Tensor,
    own: int | None,
    defence: ExpertDefence,
    start: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """One target's merged tensor from its row's sources.

    Parameters
    ----------
    x
        (S, D) float64: the sources' copies of the tensor, flattened.
    weights
        (S,) float64: the row's Eq. 10 weights (summing to one).
    own
        Position of the target's own expert among the sources (None if it is not one of them).
    defence
        What to apply.
    start
        (D,) float64: the target's expert at the start of the round (for ``trust``).
    starts
        (S, D) float64: every source's expert at the start of its round (``aligned-mean``).

    Returns
    -------
    torch.Tensor
        (D,) float64.
    """
    import torch

    w = weights.clone()
    n = x.shape[0]
    if defence.outlier > 0 and n >= 3:
        med = x.sort(dim=0).values
        centre = (med[(n - 1) // 2] + med[n // 2]) / 2
        d = (x - centre).norm(dim=1)  # (S,)
        typical = d.sort().values
        m = float((typical[(n - 1) // 2] + typical[n // 2]) / 2)
        factor = torch.where(
            d > 0, torch.clamp(defence.outlier * m / torch.clamp(d, min=1e-300), max=1.0), 1.0
        )
        if own is not None:
            factor[own] = 1.0  # a target trusts its own expert
        w = w * factor
        total = float(w.sum())
        w = w / total if total > 0 else weights.clone()
    if defence.trust and own is not None and start is not None:
        u = x[own] - start
        if float(u.norm()) > 0:
            v = x - start  # (S, D)
            cos = (v @ u) / torch.clamp(v.norm(dim=1) * u.norm(), min=1e-300)
            factor = torch.clamp(cos, min=0.0)
            factor[own] = 1.0
            w = w * factor
            total = float(w.sum())
            w = w / total if total > 0 else weights.clone()
    if defence.bound > 0 and own is not None:
        base = x[own]
        dev = x - base  # (S, D)
        radius = defence.bound * float(base.norm())
        norms = dev.norm(dim=1)
        scale = torch.where(
            norms > radius, radius / torch.clamp(norms, min=1e-300), torch.ones_like(norms)
        )
        x = base + dev * scale[:, None]
    rows = list(x)
    begun = None if starts is None else list(starts)
    return reduce_tensors(defence.reduce, rows, tuple(float(v) for v in w), torch.float64, begun)
