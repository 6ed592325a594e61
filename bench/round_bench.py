"""A FedAvg round over N clients through the round core and the merge engine: the uploads read from
N checkpoint files, the merge spec (one group), and every client's output model, against the
physical floor of reading every client's tensors once from the same files.

FedAvg is one group whose result every member receives, so the work is O(N) and the memory is one
model (plus float64 accumulators), whatever N. The memory row counts the process's anonymous
memory, sampled every millisecond (mapped file pages, which the kernel can drop, are left out).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import torch

from bench.common import Row, median_time
from fedmoe.aggregate import FedAvg, RoundInputs
from fedmoe.aggregate.engine import Merger
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import Checkpoint, CheckpointMeta, open_checkpoint, save_checkpoint
from fedmoe.io.checkpoint_set import CheckpointSource
from fedmoe.model import MoEConfig, init_model, schema_for, state_of
from fedmoe.round import plan_round

# the quickstart's model: 8×8 digits, 10 classes, embedding 64 → 32, 8 experts of width 64
CONFIG = MoEConfig((1, 8, 8), 10, embed_hidden=64, embed_dim=32, num_experts=8, expert_hidden=64)


def _anon() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """The peak of anonymous resident memory above its value at start, sampled in a thread."""

    def __enter__(self) -> AnonPeak:
        self.base = _anon()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon())

    @property
    def extra(self) -> int:
        """Peak bytes above the start."""
        return self.peak - self.base


def _write_clients(folder: Path, n: int) -> list[Path]:
    """N client checkpoints of the quickstart model (different tensors, different sample counts)."""
    base = state_of(init_model(CONFIG, 0))
    gen = torch.Generator().manual_seed(1)
    paths = []
    with OutputSet() as outputs:
        for c in range(n):
            state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
            path = folder / f"client-{c:04d}.safetensors"
            meta = CheckpointMeta(CONFIG, c, 1, 20 + c % 7, 0, "train")
            save_checkpoint(outputs, path, state, meta)
            paths.append(path)
    return paths


def _read_all(paths: list[Path]) -> None:
    """The floor: open every checkpoint and read each of its tensors once."""
    for p in paths:
        ck = open_checkpoint(p)
        for name in ck.names:
            ck.tensor(name)


def _round(paths: list[Path]) -> dict[int, dict[str, torch.Tensor]]:
    """Uploads → spec → every client's output model (in memory)."""
    models: dict[int, Checkpoint] = {}
    for p in paths:
        ck = open_checkpoint(p)
        models[int(ck.meta.client_id or 0)] = ck
    schema = schema_for(CONFIG)
    ids = tuple(sorted(models))
    inputs = RoundInputs(1, schema, ids, {c: k.upload(proxies=False) for c, k in models.items()})
    spec = plan_round(inputs, FedAvg()).spec
    first = models[ids[0]]
    merger = Merger(
        spec, schema, CheckpointSource(models), {n: first.dtype(n) for n in first.names}
    )
    return {c: dict(merger.client(c)) for c in ids}


def _peak(n: int) -> int:
    """Peak extra anonymous memory of one round over ``n`` fresh client files."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_clients(Path(tmp), n)
        _round(paths)  # warm: imports, allocator pools
        with AnonPeak() as peak:
            out = _round(paths)
        del out
    return peak.extra


def run(quick: bool) -> list[Row]:
    n = 100 if quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_clients(Path(tmp), n)
        floor = median_time(lambda: _read_all(paths), repeats=3)
        ours = median_time(lambda: _round(paths), repeats=3)
    model_bytes = schema_for(CONFIG).sizes().model
    rows = [
        Row(
            f"FedAvg round, N = {n:,} quickstart clients: uploads + spec + every client's model",
            ours,
            floor,
            "s",
            floor / ours,
            "" if quick else "≥ 0.5× (within 2×)",
            None if quick else floor / ours >= 0.5,
            "reference: reading every client's tensors once from the same files",
        )
    ]
    for size in (n // 10, n):
        extra = _peak(size)
        rows.append(
            Row(
                f"FedAvg round, N = {size:,}: peak extra anonymous memory",
                float(extra),
                float(model_bytes),
                "B",
                extra / model_bytes,
                "",
                None,
                f"reference: one model ({model_bytes / 2**10:.0f} KiB); ratio in models "
                f"(mapped file pages excluded), {os.cpu_count()} cores",
            )
        )
    return rows
