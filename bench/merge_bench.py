"""A weighted merge of 8 safetensors files (warm page cache): input GB/s and peak extra memory,
against a plain sequential read of the same files in the same run, and a mergekit-style
stack-then-sum merge (load every file, stack, weighted sum, save) written here."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.common import Row, peak_bytes, peak_in_subprocess, reset_peak, rss_bytes, sequential_read
from fedmoe.io.linear_merge import MappedFile, plan_linear, write_linear


def _make_files(folder: Path, count: int, mib: int) -> list[Path]:
    paths = []
    gen = torch.Generator().manual_seed(0)
    per = (mib << 20) // 4 // 4  # four float32 tensors per file
    for i in range(count):
        tensors = {f"layer{j}.weight": torch.randn(per, generator=gen) for j in range(4)}
        path = folder / f"in{i}.safetensors"
        save_file(tensors, str(path), metadata={"num_samples": str(100 + i)})
        paths.append(path)
    return paths


def memory_probe(paths: list[str]) -> float | None:
    """Peak extra memory of one merge (run by :func:`peak_in_subprocess`)."""
    files = [MappedFile(Path(p)) for p in paths]
    specs = plan_linear(files, "error")
    out = Path(paths[0]).parent / "probe.safetensors"
    if not reset_peak():
        return None
    base = rss_bytes()
    with open(out, "wb") as handle:
        write_linear(handle, files, [1.0 / len(files)] * len(files), specs, {})
    extra = peak_bytes() - base
    out.unlink()
    return extra


def run(quick: bool) -> list[Row]:
    count, mib = (8, 8) if quick else (8, 128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = _make_files(folder, count, mib)
        weights = [1.0 / count] * count
        read_bps = sequential_read(paths)
        total = sum(p.stat().st_size for p in paths)

        def ours(i: int) -> None:
            files = [MappedFile(p) for p in paths]
            specs = plan_linear(files, "error")
            with open(folder / f"out{i}.safetensors", "wb") as handle:
                write_linear(handle, files, weights, specs, {})
            for f in files:
                f.close()

        ours(0)  # warm
        times = []
        for i in range(1, 4):
            start = time.perf_counter()
            ours(i)
            times.append(time.perf_counter() - start)
            (folder / f"out{i}.safetensors").unlink()
        extra = peak_in_subprocess("bench.merge_bench", "memory_probe", [str(p) for p in paths])
        seconds = sorted(times)[1]
        out_size = mib << 20
        rows.append(
            Row(
                f"aggregate: weighted merge of {count} × {mib} MiB safetensors",
                total / seconds,
                read_bps,
                "B/s",
                total / seconds / read_bps,
                "≥ 10 GB/s input",
                total / seconds >= 10e9,
                "reference: sequential read of the same files",
            )
        )
        rows.append(
            Row(
                "aggregate: peak extra memory",
                extra,
                float(out_size),
                "B",
                (extra / out_size) if extra else None,
                "≤ output + 16 MiB",
                (extra is not None and extra <= out_size + (16 << 20)),
                "reference: the output size",
            )
        )

        def stack_then_sum() -> None:
            loaded = [load_file(str(p)) for p in paths]
            merged = {
                k: torch.tensordot(
                    torch.tensor(weights), torch.stack([t[k] for t in loaded]), dims=1
                )
                for k in loaded[0]
            }
            save_file(merged, str(folder / "peer.safetensors"))

        stack_then_sum()
        start = time.perf_counter()
        stack_then_sum()
        peer = time.perf_counter() - start
        rows.append(
            Row(
                "peer: mergekit-style stack-then-sum of the same files",
                total / seconds,
                total / peer,
                "B/s",
                peer / seconds,
                note="ratio = peer time / ours",
            )
        )
    return rows
