"""The server's affinity and plan-sync, end to end, as a user runs them: ``fedmoe affinity`` over N
client checkpoints piped into ``fedmoe plan-sync`` (binary companions, per-client plans), each
command a fresh process. Compared in the same run with the kernel alone (the exact top-k of the
same proxies, in this process) and with the GEMM floor 2·M²·d / the best fp32 GEMM rate measured
(torch and NumPy's BLAS, at the kernel's block shape and at 4096 × d × 4096)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import Row, matmul_flops, median_time, numpy_gemm_flops
from fedmoe.affinity.topk import topk_cosine

EXPERTS = 8
DIM = 128


def write_clients(folder: Path, clients: int) -> np.ndarray:
    """``clients`` checkpoints of the built-in model with H = 128 and 8 experts (small experts: the
    commands read gates only); returns their stacked gate rows, the proxies."""
    from fedmoe.io.atomic import OutputSet
    from fedmoe.io.checkpoint import CheckpointMeta, save_checkpoint
    from fedmoe.model import MoEConfig, init_model, state_of

    cfg = MoEConfig((16,), 4, embed_hidden=8, embed_dim=DIM, num_experts=EXPERTS, expert_hidden=2)
    base = state_of(init_model(cfg, 0))
    gen = torch.Generator().manual_seed(1)
    gates = torch.randn(clients, EXPERTS, DIM, generator=gen)
    with OutputSet() as outputs:
        for c in range(clients):
            state = {**base, "gate.weight": gates[c]}
            meta = CheckpointMeta(cfg, c, 1, 100, 0, "train")
            save_checkpoint(outputs, folder / f"client-{c:05d}.safetensors", state, meta)
    return gates.reshape(clients * EXPERTS, DIM).numpy()


def _fedmoe() -> list[str]:
    exe = shutil.which("fedmoe")
    return [exe] if exe else [sys.executable, "-m", "fedmoe_cli.app"]


# Runs two commands as ``first | second`` and reports each one's peak RSS. A child's ru_maxrss
# counts the pages it shares with its parent right after fork, so the commands are started from
# this small interpreter, not from the benchmark (which holds torch and the proxies).
LAUNCHER = """
import json, os, sys, time
first, second = json.loads(sys.argv[1])
start = time.perf_counter()
read, write = os.pipe()
pids = []
for argv, fd_in, fd_out in ((first, None, write), (second, read, None)):
    pid = os.fork()
    if pid == 0:
        if fd_in is not None:
            os.dup2(fd_in, 0)
        if fd_out is not None:
            os.dup2(fd_out, 1)
        os.close(read)
        os.close(write)
        os.execvp(argv[0], argv)
    pids.append(pid)
os.close(read)
os.close(write)
out = []
for pid in pids:
    _, status, usage = os.wait4(pid, 0)
    out.append([status, usage.ru_maxrss * 1024])
print(json.dumps({"wall": time.perf_counter() - start, "children": out}))
"""


def pipeline(folder: Path) -> tuple[float, int, int]:
    """Run ``affinity | plan-sync`` in ``folder``; (wall seconds, peak RSS of affinity, of
    plan-sync)."""
    import json

    base = _fedmoe()
    first = [*base, "affinity", "clients/", "--arrays", "aff.bin", "-q"]
    second = [*base, "plan-sync", "-", "--top-p", "8", "--arrays", "plan.bin", "--per-client",
              "clients.jsonl", "--out", "plan.json", "-q", "--force"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, json.dumps([first, second])],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (status1, rss1), (status2, rss2) = result["children"]
    if status1 or status2:
        raise RuntimeError(f"affinity | plan-sync failed ({status1}, {status2}): {done.stderr}")
    return float(result["wall"]), int(rss1), int(rss2)


def run(quick: bool) -> list[Row]:
    clients = 512 if quick else 8192
    m = clients * EXPERTS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "clients").mkdir()
        proxies = write_clients(folder / "clients", clients)
        kernel = median_time(lambda: topk_cosine(proxies, 16), repeats=1)
        rates = {"torch 4096×d×4096": matmul_flops(DIM), "NumPy BLAS, kernel block": 0.0}
        rates["NumPy BLAS, kernel block"] = numpy_gemm_flops(m, DIM)
        best = max(rates, key=lambda k: rates[k])
        floor = 2.0 * m * m * DIM / rates[best]
        pipeline(folder)  # warm the page cache and the interpreters' bytecode
        for name in ("aff.bin", "plan.json", "plan.bin", "clients.jsonl"):
            (folder / name).unlink(missing_ok=True)
        wall, rss_aff, rss_plan = pipeline(folder)
        sizes = {n: (folder / n).stat().st_size for n in ("aff.bin", "plan.json", "plan.bin")}
        lines = (folder / "clients.jsonl").read_bytes().splitlines()
        per_client = max(len(line) for line in lines)
    what = f"M={m:,} ({clients:,} clients × {EXPERTS} experts), d={DIM}"
    target = "" if quick else "≤ 1.3× kernel"
    rows.append(
        Row(
            f"affinity piped into plan-sync, end to end (2 processes, arrays + per-client "
            f"plans), {what}",
            wall,
            kernel,
            "s",
            kernel / wall,
            target,
            (wall <= 1.3 * kernel) if target else None,
            f"reference: the exact top-16 kernel alone on the same proxies, this process; "
            f"plan.json {sizes['plan.json'] / 1024:.0f} KiB, companions "
            f"{(sizes['aff.bin'] + sizes['plan.bin']) / 2**20:.1f} MiB, largest client plan "
            f"{per_client / 1024:.1f} KiB",
        )
    )
    mem_target = "" if quick else "≤ 256 MiB"
    peak = max(rss_aff, rss_plan)
    rows.append(
        Row(
            f"affinity piped into plan-sync: peak RSS of either process, {what}",
            float(peak),
            float(256 << 20),
            "B",
            peak / float(256 << 20),
            mem_target,
            (peak <= 256 << 20) if mem_target else None,
            f"affinity {rss_aff / 2**20:.0f} MiB, plan-sync {rss_plan / 2**20:.0f} MiB "
            "(whole process: interpreter, libraries, mapped files)",
        )
    )
    kt = "" if quick else "≥ 0.85× floor"
    rows.append(
        Row(
            f"affinity kernel: exact top-16, {what}",
            kernel,
            floor,
            "s",
            floor / kernel,
            kt,
            (floor / kernel >= 0.85) if kt else None,
            "reference: GEMM floor at the best measured rate ("
            + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items())
            + ")",
        )
    )
    return rows
