"""``aggregate --plan`` on fedmoe checkpoints: the Eq. 11 engine that ``fedmoe run`` and the hand-run
round use (FedMoE-DA, arXiv 2411.02115: FedAvg of the shared parts, each target expert a weighted
sum of its sources), timed as the command a user runs, against the memory and disk it must move.

Eight clients of a two-MoE-layer model (H = 256, experts of width 1024, 8 experts a layer; about
25 MB each, 1 MB in ``--quick``) are written here from one initial model plus per-client noise, so
that the gates differ and the matrices have real sources. affinity and plan-sync run first
(untimed); a first merge warms the page cache (as the sequential read is warm); the second is
timed. References measured in the same run: a sequential read of the same files (memory
bandwidth, page cache) and copying them to new files (read + write, synced, as our outputs are).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.common import Row, cli, copy_time, merge_rows, sequential_read
from bench.round_bench import AnonPeak
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import CheckpointMeta, save_checkpoint
from fedmoe.model import MoEConfig, init_model, state_of


def _config(quick: bool) -> MoEConfig:
    dim, width = (64, 256) if quick else (256, 1024)
    return MoEConfig(
        (dim,), 10, embed_hidden=dim, embed_dim=dim, num_experts=8, expert_hidden=width,
        moe_layers=2,
    )  # fmt: skip


def _write_clients(folder: Path, cfg: MoEConfig, n: int) -> list[Path]:
    base = state_of(init_model(cfg, 0))
    gen = torch.Generator().manual_seed(1)
    paths = []
    folder.mkdir()
    with OutputSet() as outputs:
        for c in range(n):
            state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
            path = folder / f"client-{c:03d}.safetensors"
            save_checkpoint(outputs, path, state, CheckpointMeta(cfg, c, 1, 50 + 7 * c, 0, "train"))
            paths.append(path)
    return paths


def run(quick: bool) -> list[Row]:
    n = 8
    cfg = _config(quick)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = _write_clients(root / "r1", cfg, n)
        total = sum(p.stat().st_size for p in files)
        cli("affinity", str(root / "r1"), "--out", str(root / "aff.json"), "-q")
        cli("plan-sync", str(root / "aff.json"), "--top-p", "3", "--out", str(root / "plan.json"),
            "-q")  # fmt: skip
        read_bps = sequential_read(files)

        def merge(i: int) -> None:
            cli("aggregate", "--plan", str(root / "plan.json"), str(root / "r1"),
                "--out", str(root / f"agg{i}"), "-q")  # fmt: skip

        merge(0)  # warm
        start = time.perf_counter()
        with AnonPeak() as peak:
            merge(1)
        seconds = time.perf_counter() - start
        copy_s = copy_time(files, root / "copy")
    mb = total / n / 1e6
    label = f"aggregate --plan (Eq. 11): 8 fedmoe checkpoints × {mb:.1f} MB, 2 MoE layers, top-3"
    largest = max(v.numel() * 4 for v in state_of(init_model(cfg, 0)).values())
    return [
        *merge_rows(label, total, seconds, read_bps, copy_s, "files"),
        Row(
            "aggregate --plan on fedmoe checkpoints: peak extra anonymous memory",
            float(peak.extra),
            float(largest),
            "B",
            peak.extra / largest,
            "",
            None,
            f"reference: the largest tensor ({largest / 2**20:.1f} MiB); one client's model is "
            f"{total / n / 2**20:.0f} MiB",
        ),
    ]
