"""Training many clients at once: one worker process per core, one torch thread per worker.

Small models gain nothing from a second intra-op thread (measured: 0.91 ms per step with one
thread, 0.97 ms with two), while two clients trained side by side use both cores; and two processes
that each run two torch threads slow small matmuls ~50×, so every worker is pinned to one thread.
Workers are spawned (never forked: a forked OpenMP runtime can deadlock) in the background as
soon as a command knows it needs them, load a dataset the first time a task needs it, and are
reused for every round. Results do not depend on how many workers there are: each client's
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

_DATASET: tuple[str, Dataset] | None = None  # (fingerprint, data) of this worker


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


def _init(parent: int, warm: tuple[str, ...]) -> None:  # in each worker process
    import importlib

    _die_with_parent(parent)
    torch.set_num_threads(1)
    for name in warm:  # import now what the tasks will need, while the parent sets up
        importlib.import_module(name)


def _bind(spec: DataSpec, fingerprint: str) -> Dataset:
    """In a worker: the dataset ``spec`` (loaded once per worker and kept for later tasks),
    checked against the ``fingerprint`` the run recorded."""
    global _DATASET
    if _DATASET is None or _DATASET[0] != fingerprint:
        dataset = load_dataset(spec)
        if dataset.fingerprint() != fingerprint:
            raise InputError(f"dataset {spec.source} changed while training")
        _DATASET = (fingerprint, dataset)
    return _DATASET[1]


def _task(spec: DataSpec, fingerprint: str, fn: Callable[..., Any], *args: Any) -> Any:
    """In a worker: ``fn(*args)`` with :func:`worker_dataset` bound to the pool's dataset."""
    _bind(spec, fingerprint)
    return fn(*args)


def worker_dataset() -> Dataset | None:
    """The dataset of the task this worker process runs (None outside a worker)."""
    return None if _DATASET is None else _DATASET[1]


def _ready(_: int) -> int:
    return os.getpid()


def _run(jobs: list[Job]) -> list[ClientUpdate]:
    dataset = worker_dataset()
    assert dataset is not None
    return _train(jobs, dataset)


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


class Workers:
    """``count`` worker processes (spawned, never forked: a forked OpenMP runtime can deadlock),
    one torch thread each, that start in the background as soon as this is made, so that their
    start (Python, torch, the ``warm`` modules) overlaps what the caller does meanwhile. They take
    any dataset: each task names its own (:class:`TrainPool`), loaded once per worker. With
    ``count`` 1, or where processes cannot be started, there are none (:attr:`fallback` says
    why, for the latter) and the pools using them train in the caller's process."""

    def __init__(self, count: int, warm: tuple[str, ...] = ()) -> None:
        self.count = max(1, count)
        self._pool: ProcessPoolExecutor | None = None
        self._starting: list[Future[int]] = []
        self.fallback: str | None = None
        if self.count > 1:
            try:
                self._pool = ProcessPoolExecutor(
                    self.count,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init,
                    initargs=(os.getpid(), warm),
                )
                # one task a worker starts them all now; nothing waits for them here
                self._starting = [self._pool.submit(_ready, i) for i in range(self.count)]
            except (OSError, BrokenProcessPool) as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._pool = None
        self.fallback = f"worker processes unavailable ({exc}); training in-process"

    def ready(self) -> bool:
        """Wait until the workers have started; whether there are any."""
        if self._pool is not None and self._starting:
            try:
                for future in self._starting:
                    future.result()
            except (OSError, BrokenProcessPool) as exc:  # no processes here: train in-process
                self._fail(exc)
            self._starting = []
        return self._pool is not None

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a worker process."""
        if self._pool is None:
            raise RuntimeError("submit needs worker processes")
        return self._pool.submit(fn, *args)

    def abort(self) -> None:
        """Stop every worker now, running tasks included (after an error or a Ctrl-C in this
        process: their partial work is what ``--resume`` redoes). Unusable after."""
        if self._pool is None:
            return
        for process in list(getattr(self._pool, "_processes", {}).values()):
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        """End the workers once their tasks are done. With none left to run they are stopped at
        once: a finished task has committed every file it wrote, so a worker holds nothing that
        its normal exit would save, and that exit (unloading torch) took 0.5 s of every run."""
        if self._pool is None:
            return
        if getattr(self._pool, "_pending_work_items", None):
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        else:
            self.abort()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TrainPool:
    """Trains jobs on one dataset in worker processes (in this process, one thread, when there
    are none): its own ``workers`` processes, or a :class:`Workers` it shares with other pools
    (which outlives it).

    Use as a context manager; processes it started live until it exits.
    """

    def __init__(
        self,
        spec: DataSpec,
        fingerprint: str,
        dataset: Callable[[], Dataset],
        workers: int | Workers,
    ) -> None:
        self.spec = spec
        self.fingerprint = fingerprint
        self._dataset = dataset  # loads the data in this process, only if it trains here
        self._owned = not isinstance(workers, Workers)
        self._workers: Workers | int = workers
        self.fallback: str | None = None  # why the pool trains in-process, if it had to

    @property
    def workers(self) -> int:
        """How many processes train (1: this one)."""
        return self._workers.count if isinstance(self._workers, Workers) else self._workers

    def __enter__(self) -> TrainPool:
        if not isinstance(self._workers, Workers):
            self._workers = Workers(self._workers)
        self._workers.ready()
        self.fallback = self._workers.fallback
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._owned and isinstance(self._workers, Workers):
            self._workers.close()

    def _processes(self) -> Workers | None:
        w = self._workers
        return w if isinstance(w, Workers) and w.ready() else None

    @property
    def parallel(self) -> bool:
        """Whether jobs run in worker processes (else in this process)."""
        return self._processes() is not None

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a worker process, where :func:`worker_dataset` is the pool's
        dataset and torch runs one thread (only when :attr:`parallel`)."""
        workers = self._processes()
        if workers is None:
            raise RuntimeError("submit needs worker processes")
        return workers.submit(_task, self.spec, self.fingerprint, fn, *args)

    def abort(self) -> None:
        """Stop every worker now, running tasks included (after an error or a Ctrl-C in this
        process: their partial work is what ``--resume`` redoes). The pool is unusable after."""
        if isinstance(self._workers, Workers):
            self._workers.abort()

    def run(self, jobs: list[Job]) -> list[ClientUpdate]:
        """Train every job; results in the order of ``jobs``."""
        workers = self._processes()
        if workers is None:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return _train(jobs, self._dataset())
            finally:
                torch.set_num_threads(previous)
        # one cohort a worker: a step's overhead is paid once for all of a worker's clients
        size = -(-len(jobs) // workers.count)
        parts = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        futures = [self.submit(_run, part) for part in parts]
        return [u for future in futures for u in future.result()]
