"""FedMoE-DA on Flower's Simulation Engine at 1,000 clients (5 % participation, a small model):
the time of a round and the server's memory, against the same run at 200 clients (same
participants per round), so that what grows with the number of clients shows.

Each size runs in a fresh process (``python -m bench.flower_bench --clients N``), so its peak RSS
is its own. The data are synthetic (four domains, each a shift of ten class prototypes), written
to a temporary ``.npz``: 20 samples per client, as cross-device federations have."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Row

RECIPE = """
seed: 0
rounds: {rounds}
participation: {participation}
eval_every: {rounds}
methods: [fedmoe-da]
data:
  dataset: {data}
partition:
  scheme: domain
  clients: {clients}
  domains_per_client: 1
  global_test: 0.05
  local_test: 0.2
model:
  embed: mlp
  embed_hidden: 32
  embed_dim: 16
  num_experts: 8
  top_k: 2
  expert_hidden: 32
train:
  epochs: 1
  batch_size: 16
fedmoe:
  top_p: 4
  candidates: 8
"""


def _data(path: Path, clients: int, per_client: int = 20, features: int = 32) -> None:
    rng = np.random.default_rng(0)
    n = clients * per_client
    protos = rng.normal(size=(10, features))
    shifts = rng.normal(scale=1.5, size=(4, features))
    y = rng.integers(0, 10, size=n)
    d = rng.integers(0, 4, size=n)
    x = protos[y] + shifts[d] + rng.normal(scale=0.8, size=(n, features))
    np.savez(path, x=x.astype(np.float32), y=y, domain=d)


def _one(clients: int, per_round: int, rounds: int) -> dict[str, Any]:
    """One simulation in this process; its per-round seconds, server state and peak RSS."""
    from fedmoe.flower.client import ClientSettings
    from fedmoe.flower.launch import simulate
    from fedmoe.flower.server import ServerSettings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _data(root / "data.npz", clients)
        recipe = root / "recipe.yaml"
        recipe.write_text(
            RECIPE.format(
                rounds=rounds,
                participation=per_round / clients,
                data=root / "data.npz",
                clients=clients,
            )
        )
        start = time.perf_counter()
        folder = simulate(
            ServerSettings(str(recipe), str(root / "run")),
            ClientSettings(str(root / "exchange"), str(root / "clients")),
            clients,
        )
        total = time.perf_counter() - start
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    with open("/proc/self/status") as handle:
        hwm = next(int(x.split()[1]) * 1024 for x in handle if x.startswith("VmHWM"))
    return {
        "clients": clients,
        "round_s": [r["seconds"] for r in rows],
        "state": max(r["server_state_bytes"] for r in rows),
        "moved_server": [r["moved_server_bytes"] for r in rows],
        "peak_rss": hwm,
        "total_s": total,
    }


def _spawn(clients: int, per_round: int, rounds: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.flower_bench", "--clients", str(clients),
         "--per-round", str(per_round), "--rounds", str(rounds)],
        capture_output=True, text=True, check=True, env={**os.environ, "RAY_DEDUP_LOGS": "1"},
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool) -> list[Row]:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return [Row("Flower simulation", None, None, "s", None,
                    note="skipped: flwr not installed (pip install 'fedmoe[flower]')")]  # fmt: skip
    big, small, per_round, rounds = (40, 20, 4, 3) if quick else (1000, 200, 50, 5)
    a = _spawn(small, per_round, rounds)
    b = _spawn(big, per_round, rounds)
    # rounds 2 .. R-1: the first also starts Ray's workers, the last evaluates every client
    steady_b = statistics.median(b["round_s"][1:-1])
    steady_a = statistics.median(a["round_s"][1:-1])
    mib = 1 << 20
    return [
        Row(
            f"Flower simulation, {big} clients × {per_round} per round: a round (median of rounds"
            f" 2-{rounds - 1}, no evaluation)",
            steady_b,
            steady_a,
            "s",
            steady_a / steady_b,
            note=f"reference: the same with {small} clients (same participants per round)",
        ),
        Row(
            f"Flower simulation, {big} clients: the last round (every client evaluates: grows with"
            " N by design)",
            b["round_s"][-1],
            a["round_s"][-1],
            "s",
            a["round_s"][-1] / b["round_s"][-1],
            note=f"reference: {small} clients",
        ),
        Row(
            f"Flower server state, {big} clients (undelivered results, kept proxies, the round's"
            " small parts)",
            b["state"] / mib,
            a["state"] / mib,
            "MiB",
            a["state"] / b["state"],
            note=f"reference: {small} clients; the kept proxies grow with N by design",
        ),
        Row(
            f"Flower server process peak RSS, {big} clients (Ray driver included)",
            b["peak_rss"] / mib,
            a["peak_rss"] / mib,
            "MiB",
            a["peak_rss"] / b["peak_rss"],
            target="≤ 1.25× the small run's",
            met=b["peak_rss"] <= 1.25 * a["peak_rss"],
            note=f"reference: {small} clients, same participants per round",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--per-round", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(_one(args.clients, args.per_round, args.rounds)))
