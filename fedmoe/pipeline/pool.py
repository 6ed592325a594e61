"""Training many clients at once: one worker process per core, one torch thread per worker.

Small models gain nothing from a second intra-op thread (measured: 0.91 ms per step with one
thread, 0.97 ms with two), while two clients trained side by side use both cores; and two processes
that each run two torch threads slow small matmuls ~50×, so every worker is pinned to one thread.
Workers are spawned (never forked: a forked OpenMP runtime can deadlock), load the dataset once,
and are reused for every round. Results do not depend on how many workers there are: each client's
training is seeded by (seed, round, client) alone and always runs on one thread.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from fedmoe.data import Dataset, DataSpec
from fedmoe.errors import InputError
from fedmoe.io.datasets import load_dataset
from fedmoe.model import MoEConfig
from fedmoe.partition import ClientSplit
from fedmoe.train.client import ClientUpdate, train_cohort
from fedmoe.train.local import TrainConfig

_DATASET: Dataset | None = None


@dataclass(frozen=True)
class Job:
    """One client's local round."""

    config: MoEConfig
    state: dict[str, torch.Tensor]  # the model it starts from
    split: ClientSplit  # its samples
    train: TrainConfig
    seed: int  # the run seed
    round: int
    client: int
    candidates: tuple[dict[str, torch.Tensor], ...] = ()  # clustered FL: start from the best


def _die_with_parent(parent: int) -> None:
    """Make this worker end when the process that started it ends, however it ends (SIGKILL
    included): the kernel's parent-death signal where there is one (Linux), and a watchdog thread
    that notices the parent is gone everywhere else."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, not ours
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, daemon=True).start()


def _init(spec: DataSpec, fingerprint: str, parent: int) -> None:  # in each worker process
    global _DATASET
    _die_with_parent(parent)
    torch.set_num_threads(1)
    dataset = load_dataset(spec)
    if dataset.fingerprint() != fingerprint:
        raise InputError(f"dataset {spec.source} changed while training")
    _DATASET = dataset


def worker_dataset() -> Dataset | None:
    """The dataset this worker process loaded at its start (None outside a worker)."""
    return _DATASET


def _ready(_: int) -> int:
    return os.getpid()


def _run(jobs: list[Job]) -> list[ClientUpdate]:
    assert _DATASET is not None
    return _train(jobs, _DATASET)


def _train(jobs: list[Job], dataset: Dataset) -> list[ClientUpdate]:
    """Train ``jobs``: those that share their model, settings, round and candidates as one
    cohort (:func:`fedmoe.train.client.train_cohort`), in their order."""
    out: list[ClientUpdate] = []
    first = 0
    while first < len(jobs):
        lead, last = jobs[first], first + 1
        while last < len(jobs) and _same_cohort(lead, jobs[last]):
            last += 1
        part = jobs[first:last]
        out.extend(
            train_cohort(
                lead.config,
                [j.state for j in part],
                dataset,
                [j.split for j in part],
                lead.train,
                lead.seed,
                lead.round,
                [j.client for j in part],
                lead.candidates,
            )
        )
        first = last
    return out


def _same_cohort(a: Job, b: Job) -> bool:
    return (a.config, a.train, a.seed, a.round) == (b.config, b.train, b.seed, b.round) and (
        a.candidates is b.candidates
    )


def default_workers() -> int:
    """One worker per core, or ``FEDMOE_WORKERS`` when set."""
    env = os.environ.get("FEDMOE_WORKERS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, os.cpu_count() or 1)


class TrainPool:
    """Trains jobs in ``workers`` processes (in this process, one thread, when ``workers`` is 1).

    Use as a context manager; the worker processes live until it exits.
    """

    def __init__(
        self, spec: DataSpec, fingerprint: str, dataset: Callable[[], Dataset], workers: int
    ) -> None:
        self.spec = spec
        self.fingerprint = fingerprint
        self._dataset = dataset  # loads the data in this process, only if it trains here
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self.fallback: str | None = None  # why the pool trains in-process, if it had to

    def __enter__(self) -> TrainPool:
        if self.workers > 1:
            try:
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init,
                    initargs=(self.spec, self.fingerprint, os.getpid()),
                )
                # start every worker now, so their start-up is not charged to the first round
                list(self._pool.map(_ready, range(self.workers)))
            except (OSError, BrokenProcessPool) as exc:  # no processes here: train in-process
                if self._pool is not None:
                    self._pool.shutdown(cancel_futures=True)
                self._pool = None
                self.fallback = f"worker processes unavailable ({exc}); training in-process"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    @property
    def parallel(self) -> bool:
        """Whether jobs run in worker processes (else in this process)."""
        return self._pool is not None

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a worker process, where :func:`worker_dataset` is the pool's
        dataset and torch runs one thread (only when :attr:`parallel`)."""
        if self._pool is None:
            raise RuntimeError("submit needs worker processes")
        return self._pool.submit(fn, *args)

    def abort(self) -> None:
        """Stop every worker now, running tasks included (after an error or a Ctrl-C in this
        process: their partial work is what ``--resume`` redoes). The pool is unusable after."""
        if self._pool is None:
            return
        for process in list(getattr(self._pool, "_processes", {}).values()):
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def run(self, jobs: list[Job]) -> list[ClientUpdate]:
        """Train every job; results in the order of ``jobs``."""
        if self._pool is None:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return _train(jobs, self._dataset())
            finally:
                torch.set_num_threads(previous)
        # one cohort a worker: a step's overhead is paid once for all of a worker's clients
        size = -(-len(jobs) // self.workers)
        parts = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        return [u for done in self._pool.map(_run, parts) for u in done]
