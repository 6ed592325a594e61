"""Start-up: how long ``fedmoe`` takes before it does anything, against a bare ``python -c pass``
in the same run. Each row runs the console script in a fresh process (median of 5).

The project's modules are compiled to bytecode first, as pip does when it installs a wheel: an
editable install compiles each module on its first import and keeps the bytecode, except where
``PYTHONDONTWRITEBYTECODE`` is set (the development machine sets it), and then every start
compiles every module it imports again (about 20–40 ms of a help screen)."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def compile_project() -> None:
    """Bytecode for the ``fedmoe`` and ``fedmoe_cli`` packages, beside their sources."""
    import fedmoe_cli

    import fedmoe

    folders = [str(Path(m.__file__).parent) for m in (fedmoe, fedmoe_cli) if m.__file__]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], check=True)


def run(quick: bool) -> list[Row]:
    repeats = 3 if quick else 5
    compile_project()
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
