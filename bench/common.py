"""Timing, peak memory, the physical references (copy bandwidth, matmul FLOP/s, sequential read),
and the result table shared by every benchmark."""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Row:
    """One line of the result table."""

    metric: str  # what is measured
    ours: float | None  # our figure
    reference: float | None  # the limit or peer it is compared with
    unit: str  # unit of ours / reference
    ratio: float | None  # ours relative to the reference (higher is better unless stated)
    target: str = ""  # the target, as text
    met: bool | None = None  # whether the target is met (None: no target or not measurable)
    note: str = ""  # how the reference was measured, or why something was skipped
    extra: dict[str, Any] = field(default_factory=dict)


def skipped(metric: str, package: str) -> Row:
    """The row of a peer that is not installed: reported as skipped, never faked."""
    return Row(
        metric,
        None,
        None,
        "s",
        None,
        note=f"skipped: {package} not installed (pip install 'fedmoe[bench]')",
    )


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """Current resident memory."""
    return _status("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak`."""
    return _status("VmHWM")


def peak_in_subprocess(module: str, func: str, *args: object) -> float | None:
    """Peak extra resident memory of ``module.func(*args)`` in a fresh interpreter.

    The function does its own setup, then calls :func:`reset_peak` and records :func:`rss_bytes`
    as the baseline, runs the work, and returns ``peak_bytes() - baseline``. A fresh process sees no
    memory freed by earlier work, so every page the work touches is counted.
    """
    import json
    import subprocess
    import sys

    code = (
        "import json, sys; from " + module + " import " + func + " as f; "
        "print(json.dumps(f(*json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None
    value = json.loads(done.stdout.strip().splitlines()[-1])
    return None if value is None else float(value)


def copy_bandwidth(size_mib: int = 256) -> float:
    """Memory copy bandwidth in bytes/s (bytes read + written by one tensor copy)."""
    src = torch.ones(size_mib << 18)  # float32
    dst = torch.empty_like(src)
    dt = median_time(lambda: dst.copy_(src), repeats=5)
    return 2 * src.numel() * 4 / dt


def matmul_flops(d: int, n: int = 4096) -> float:
    """fp32 FLOP/s of an (n × d) @ (d × n) product into a preallocated output."""
    a, b = torch.randn(n, d), torch.randn(d, n)
    out = torch.empty(n, n)
    dt = median_time(lambda: torch.mm(a, b, out=out), repeats=5)
    return 2.0 * n * n * d / dt


def numpy_gemm_flops(m: int, d: int, block: int = 256) -> float:
    """fp32 FLOP/s of NumPy's BLAS at the top-k kernel's shape: (block × d) @ (d × m) into a
    reused buffer, over 8 blocks."""
    import numpy as np

    u = np.random.default_rng(0).standard_normal((m, d), dtype=np.float32)
    out = np.empty((block, m), dtype=np.float32)
    rows = min(m, 8 * block)
    dt = median_time(
        lambda: [np.matmul(u[r : r + block], u.T, out=out) for r in range(0, rows, block)],
        repeats=3,
    )
    return 2.0 * rows * m * d / dt


def sequential_read(paths: list[Path], chunk: int = 1 << 22) -> float:
    """Bytes/s of reading ``paths`` start to end into one reused buffer (warm page cache)."""
    buf = bytearray(chunk)
    view = memoryview(buf)

    def read() -> int:
        total = 0
        for p in paths:
            with open(p, "rb", buffering=0) as handle:
                while n := handle.readinto(view):
                    total += n
        return total

    read()
    size = sum(p.stat().st_size for p in paths)
    return size / median_time(read, repeats=3)


def threads(n: int) -> None:
    """Set torch's intra-op threads (never more than the machine has)."""
    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))


def fmt(v: float | None, unit: str) -> str:
    """A number with its unit, scaled for reading."""
    if v is None:
        return "-"
    if unit == "B":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(v) >= scale:
                return f"{v / scale:.2f} {name}"
        return f"{v:.0f} B"
    if unit == "B/s":
        return f"{v / 1e9:.2f} GB/s"
    if unit == "s":
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "FLOP/s":
        return f"{v / 1e9:.0f} GFLOP/s"
    if unit == "1/s":
        return f"{v:,.0f}/s"
    return f"{v:.3g} {unit}".strip()


def copy_time(files: list[Path], dest: Path) -> float:
    """Seconds to copy ``files`` to new files under ``dest``, each synced to disk (then removed)."""
    dest.mkdir()
    start = time.perf_counter()
    for i, f in enumerate(files):
        target = dest / f"{i}-{f.name}"
        shutil.copyfile(f, target)
        with open(target, "rb+") as handle:  # durable, as fedmoe's outputs are
            os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(dest)
    return seconds


def cli(*argv: str) -> None:
    """Run ``fedmoe ARGV`` in this process (stdout discarded); a non-zero exit raises."""
    import contextlib
    import io

    from fedmoe_cli.app import main

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the output paths: not the table's
            main(list(argv))
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"fedmoe {argv[0]} exited {exc.code}") from None


def merge_rows(
    label: str, total: int, seconds: float, read_bps: float, copy_s: float, files: str
) -> list[Row]:
    """A merge command's input bytes per second against a sequential read of the same ``files``
    (page cache) and against copying them to new files, both measured in the same run."""
    return [
        Row(
            label,
            total / seconds,
            read_bps,
            "B/s",
            total / seconds / read_bps,
            note=f"reference: sequential read of the same {files} (page cache); the merge also "
            "writes as many bytes to disk",
        ),
        Row(
            f"{label}, against copying the {files}",
            total / seconds,
            total / copy_s,
            "B/s",
            copy_s / seconds,
            "≥ 0.5× the copy",
            copy_s / seconds >= 0.5,
            f"reference: the same {files} copied to new files in the same run (read + write)",
        ),
    ]
