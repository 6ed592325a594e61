"""How a run's models are scored: accuracy for the built-in classifier, per-byte perplexity for a
Hugging Face language model. One declaration per score names its metrics fields, says which way
is better and how a value is printed, so the metrics log, the report, its table, its plots and the
summary of several seeds treat both the same way.

The fields of a score ``s`` (``acc`` or ``ppl``) are ``mean_local_s``, ``worst_local_s``,
``mean_global_s``, ``local_s_by_domain`` and ``global_s_by_domain``; a run's metrics lines carry
one score's fields, which is how a report tells which score its run has.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Quality:
    """One way of scoring a model."""

    name: str  # "accuracy" or "perplexity": the word in captions and titles
    short: str  # the fields' suffix: "acc" or "ppl"
    higher_is_better: bool
    unit: str  # what a printed cell is in
    scale: float  # printed value = stored value × scale
    decimals: int  # printed decimals
    worst_word: str  # the worst client's value: "lowest" or "highest"
    drop_unit: str  # the unit of an attacked arm's drop
    plot_file: str  # the run folder's per-round plot

    @property
    def mean_local(self) -> str:
        """The personalised mean over clients (each on its own local test split)."""
        return f"mean_local_{self.short}"

    @property
    def worst_local(self) -> str:
        """The worst client's personalised value."""
        return f"worst_local_{self.short}"

    @property
    def mean_global(self) -> str:
        """The mean over clients on the shared global test set."""
        return f"mean_global_{self.short}"

    @property
    def local_by_domain(self) -> str:
        """Every client's local test samples pooled, per domain."""
        return f"local_{self.short}_by_domain"

    @property
    def global_by_domain(self) -> str:
        """The global test set per domain, mean over clients."""
        return f"global_{self.short}_by_domain"

    @property
    def eval_keys(self) -> tuple[str, ...]:
        """What an evaluation adds to a round's metrics line."""
        return (self.mean_local, self.worst_local, self.mean_global, self.local_by_domain,
                self.global_by_domain)  # fmt: skip

    @property
    def scalars(self) -> tuple[str, ...]:
        """The per-round scalar fields."""
        return (self.mean_local, self.worst_local, self.mean_global)

    def cell(self, value: float | None) -> str:
        """A value as printed in a table ('-' when missing)."""
        return "-" if value is None else f"{self.scale * value:.{self.decimals}f}"

    @property
    def rank_decimals(self) -> int:
        """Decimals of the stored value that a printed cell shows (two methods that print the
        same tie)."""
        return self.decimals + round(math.log10(self.scale))

    def drop(self, clean: float, attacked: float) -> float:
        """How much worse an attacked arm is than its clean arm (positive: worse)."""
        return clean - attacked if self.higher_is_better else attacked - clean

    def sign(self) -> int:
        """+1 when higher is better, −1 when lower is (to rank by the maximum of sign × value)."""
        return 1 if self.higher_is_better else -1


ACCURACY = Quality("accuracy", "acc", True, "%", 100.0, 1, "lowest", "pp", "accuracy.png")
PERPLEXITY = Quality(
    "perplexity", "ppl", False, "ppl/byte", 1.0, 2, "highest", "ppl/byte", "perplexity.png"
)
QUALITIES = {q.name: q for q in (ACCURACY, PERPLEXITY)}


def quality_of_rows(rows: Iterable[Mapping[str, Any]]) -> Quality:
    """The score of a run's metrics lines: perplexity when any line has its fields, else
    accuracy (also for a run with no evaluated round yet)."""
    return PERPLEXITY if any(PERPLEXITY.mean_local in r for r in rows) else ACCURACY


def quality_named(name: object) -> Quality:
    """The score a report or summary names (accuracy for one written before scores were named,
    or a damaged name)."""
    return QUALITIES.get(name, ACCURACY) if isinstance(name, str) else ACCURACY
