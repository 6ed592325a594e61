"""Start-up: how long ``fedmoe`` takes before it does anything, against a bare ``python -c pass``
in the same run. Each row runs the console script in a fresh process (median of 5)."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

from bench.common import Row

COMMANDS = (
    ("fedmoe --version", ["--version"]),
    ("fedmoe --help", ["--help"]),
    ("fedmoe partition --help", ["partition", "--help"]),
    ("fedmoe plan-sync --help", ["plan-sync", "--help"]),
    ("fedmoe report --help", ["report", "--help"]),
    ("fedmoe run --help", ["run", "--help"]),
)


def _median(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool) -> list[Row]:
    repeats = 3 if quick else 5
    exe = shutil.which("fedmoe")
    base = [sys.executable, "-m", "fedmoe_cli.app"] if exe is None else [exe]
    bare = _median([sys.executable, "-c", "pass"], repeats)
    rows = []
    for label, args in COMMANDS:
        t = _median([*base, *args], repeats)
        target = "" if quick else "≤ 0.3 s"
        rows.append(
            Row(
                f"start-up: {label}",
                t,
                bare,
                "s",
                bare / t,
                target,
                (t <= 0.3) if target else None,
                "reference: python -c pass in the same run",
            )
        )
    return rows
