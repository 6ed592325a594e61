"""``python -m bench [--quick] [--only NAME,...] [--json FILE]``: run the benchmarks, print one table
of ``metric | ours | reference | ratio | target`` and write the rows as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench import (
    flower_bench,
    hf_bench,
    merge_bench,
    moe_bench,
    partition_bench,
    plan_merge_bench,
    round_bench,
    run_bench,
    startup_bench,
    sync_bench,
    topk_bench,
)
from bench.common import Row, copy_bandwidth, fmt, threads

SUITES = {
    "startup": startup_bench.run,
    "partition": partition_bench.run,
    "moe": moe_bench.run,
    "topk": topk_bench.run,
    "sync": sync_bench.run,
    "merge": merge_bench.run,
    "plan-merge": plan_merge_bench.run,
    "hf": hf_bench.run,
    "round": round_bench.run,
    "run": run_bench.run,
    "flower": flower_bench.run,
}


def table(rows: list[Row]) -> str:
    """The result table as Markdown."""
    lines = [
        "| metric | ours | reference | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}×"
        met = "" if r.met is None else ("yes" if r.met else "no")
        ours = fmt(r.ours, r.unit) if r.ours is not None else r.note or "-"
        lines.append(
            f"| {r.metric} | {ours} | {fmt(r.reference, r.unit)} | {ratio} | {r.target} | {met} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, under a minute (CI smoke test)"
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(SUITES)}")
    parser.add_argument(
        "--json", default="bench/results/latest.json", help="where to write the rows"
    )
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SUITES)
    for n in names:
        if n not in SUITES:
            parser.error(f"unknown benchmark '{n}' (choose from {', '.join(SUITES)})")
    threads(os.cpu_count() or 1)
    start = time.perf_counter()
    rows: list[Row] = []
    bw = copy_bandwidth(64 if args.quick else 256)
    for name in names:
        print(f"running {name} …", file=sys.stderr, flush=True)
        rows.extend(SUITES[name](args.quick))
    if args.quick:  # the targets are stated for the full sizes; a smoke run judges none of them
        for r in rows:
            r.target, r.met = "", None
    text = table(rows)
    print(text)
    print(
        f"\nmemory copy bandwidth {bw / 1e9:.1f} GB/s · {os.cpu_count()} cores · torch "
        f"{torch.__version__} · {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "quick": args.quick,
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "copy_bandwidth_bytes_per_s": bw,
        },
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
