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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from fedmoe.data import Dataset, DataSpec
from fedmoe.errors import InputError
from fedmoe.io.datasets import load_dataset
from fedmoe.model import MoEConfig
from fedmoe.partition import ClientSplit
from fedmoe.train.client import ClientUpdate, train_client
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


def _ready(_: int) -> int:
    return os.getpid()


def _run(job: Job) -> ClientUpdate:
    assert _DATASET is not None
    return _train(job, _DATASET)


def _train(job: Job, dataset: Dataset) -> ClientUpdate:
    return train_client(
        job.config, job.state, dataset, job.split, job.train, job.seed, job.round, job.client,
        job.candidates,
    )  # fmt: skip


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

    def run(self, jobs: list[Job]) -> list[ClientUpdate]:
        """Train every job; results in the order of ``jobs``."""
        if self._pool is None:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                dataset = self._dataset()
                return [_train(job, dataset) for job in jobs]
            finally:
                torch.set_num_threads(previous)
        chunk = max(1, -(-len(jobs) // (2 * self.workers)))  # few, balanced round trips
        return list(self._pool.map(_run, jobs, chunksize=chunk))
