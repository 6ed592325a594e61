"""The partitioner family: one small base class, one scheme per file, a static registry.

A partitioner only decides *which client owns each sample of the pool*; holding out the global test
set, splitting each client into local train/test, and measuring skew are shared steps
(:mod:`fedmoe.partition.pipeline`).
"""

from __future__ import annotations

import dataclasses
import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedmoe.errors import ParamError, UsageError
from fedmoe.params import check_types


@dataclass(frozen=True)
class PoolInfo:
    """What a partitioner may know about the data it splits (for validating a request)."""

    num_samples: int  # samples in the pool (after the global test hold-out)
    num_classes: int  # C
    num_domains: int  # D (1 when the data has no domains)
    has_domains: bool  # whether the data carries domain ids at all


@dataclass(frozen=True)
class Partitioner(ABC):
    """Base class of every partition scheme.

    Subclasses are frozen dataclasses whose fields are the scheme's options (each documented with a
    comment) and implement :meth:`assign`. ``name`` is the registry key; ``summary`` the one line in
    ``--help``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]

    @abstractmethod
    def assign(
        self, labels: np.ndarray, domains: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Owner of each pool sample.

        Parameters
        ----------
        labels, domains
            (n,) int arrays of the pool's labels and domain ids.
        num_clients
            N, the number of clients.
        rng
            The scheme's own generator; the only source of randomness.

        Returns
        -------
        np.ndarray
            (n,) int64 client id per sample in [0, N), or -1 for a sample no client receives.
        """

    def check(self, pool: PoolInfo, num_clients: int) -> None:
        """Raise :class:`UsageError` when the request cannot be met on this pool."""
        min_size = getattr(self, "min_size", 1)
        if min_size < 0:
            raise ParamError("min_size", min_size, "must be >= 0", hint="for example 2")
        if num_clients * min_size > pool.num_samples:
            raise UsageError(
                f"{num_clients} clients × min size {min_size} needs {num_clients * min_size} "
                f"samples but the pool has {pool.num_samples}",
                hint=f"use at most {pool.num_samples // max(min_size, 1)} clients "
                "or a smaller --min-size",
            )

    @classmethod
    def option_names(cls) -> list[str]:
        """The scheme's options, as field names."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Partitioner:
        """Build the scheme from user options, refusing any the scheme does not use."""
        known = cls.option_names()
        for key in cls.ignored_options(options):
            raise UsageError(
                f"option --{key.replace('_', '-')} has no effect with scheme '{cls.name}' "
                "and the other options given",
                hint="drop it",
            )
        for key in options:
            if key not in known:
                flag = "--" + key.replace("_", "-")
                valid = ", ".join("--" + k.replace("_", "-") for k in known) or "none"
                raise UsageError(
                    f"option {flag} is not used by scheme '{cls.name}' (its options: {valid})"
                )
        return cls(**check_types(cls, options))

    @classmethod
    def ignored_options(cls, options: dict[str, Any]) -> list[str]:
        """Options given that the scheme would ignore in combination with the others given."""
        return []

    def params(self) -> dict[str, Any]:
        """The effective options, for the manifest."""
        return dataclasses.asdict(self)


def require_positive(value: float, flag: str, example: str) -> None:
    """Refuse a non-positive concentration or count with a remedy (``flag``: the option name;
    the error names the parameter's key, which the CLI and the recipe loader word their way)."""
    if not value > 0:
        key = flag.lstrip("-").replace("-", "_")
        raise ParamError(key, value, "must be > 0", hint=f"for example {example}")


def nearest(name: str, choices: list[str]) -> str:
    """A ' (did you mean X?)' suffix for the closest of ``choices``, or ''."""
    match = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""
