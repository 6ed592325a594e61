"""A weighted merge of 8 safetensors files (warm page cache): input GB/s and peak extra memory,
against a plain sequential read of the same files in the same run, and a stack-then-sum merge
(load every file, stack, weighted sum, save) written here, labelled as such. Then the commands
users run on model folders: ``fedmoe aggregate A/ B/ C/ --weights ... --out merged/`` against the
real mergekit's ``mergekit-yaml`` linear merge of the same Mixtral-shaped folders (when
installed), each timed as a process with its own peak RSS, and their outputs compared."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.common import (
    Row,
    peak_bytes,
    peak_in_subprocess,
    reset_peak,
    rss_bytes,
    sequential_read,
    skipped,
)
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
                "peer: stack-then-sum written in this benchmark (load all, stack, sum), same files",
                total / seconds,
                total / peer,
                "B/s",
                peer / seconds,
                note="ratio = peer time / ours",
            )
        )
    rows.extend(_folders_vs_mergekit(quick))
    return rows


_LAUNCH = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss * 1024, status)
"""


def _timed(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command run as its own process. A small launcher
    process starts it: a process forked from this one would inherit this benchmark's peak RSS
    (Linux folds the forked memory's high-water mark into the exec'd command's)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCH, *cmd], cwd=cwd, env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    seconds, rss, status = done.stdout.split()[-3:]
    if int(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed (status {status})")
    return float(seconds), int(rss)


def _folders_vs_mergekit(quick: bool) -> list[Row]:
    import shutil
    import sys

    label = "model folders: fedmoe aggregate --weights into a folder vs mergekit-yaml linear"
    if shutil.which("mergekit-yaml") is None:
        return [skipped(f"peer: {label}", "mergekit")]
    try:
        import transformers
    except ImportError:
        return [skipped(f"peer: {label}", "transformers")]
    transformers.logging.set_verbosity_error()
    hidden, ffn, vocab = (128, 256, 2000) if quick else (512, 1024, 8000)
    cfg = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
        num_local_experts=8, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=256,
    )  # fmt: skip
    weights = [0.5, 0.3, 0.2]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = []
        for c in range(3):
            torch.manual_seed(c)
            model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
            model.save_pretrained(root / f"m{c}", max_shard_size="60MB")
            folders.append(root / f"m{c}")
        size = sum(p.stat().st_size for f in folders for p in f.glob("*.safetensors"))
        yml = root / "linear.yml"
        yml.write_text(
            "merge_method: linear\ndtype: bfloat16\nmodels:\n"
            + "".join(f"  - model: {f}\n    parameters: {{weight: {w}}}\n"
                      for f, w in zip(folders, weights, strict=True))
        )  # fmt: skip
        fedmoe = [sys.executable, "-m", "fedmoe_cli.app", "aggregate", *map(str, folders),
                  "--weights", ",".join(map(str, weights)), "-q"]  # fmt: skip
        mergekit = [str(Path(shutil.which("mergekit-yaml") or "")), str(yml)]
        ours_s, ours_rss = _timed([*fedmoe, "--out", str(root / "warm-f")], root)
        peer_s, peer_rss = _timed([*mergekit, str(root / "warm-m"), "--lazy-unpickle"], root)
        ours_s, ours_rss = _timed([*fedmoe, "--out", str(root / "f")], root)
        peer_s, peer_rss = _timed([*mergekit, str(root / "m"), "--lazy-unpickle"], root)
        same = _same_linear_merge(root / "f", root / "m")
    what = f"3 Mixtral-shaped bf16 folders × {size / 3 / (1 << 20):.0f} MiB"
    return [
        Row(
            f"peer: {label}, {what}: time (outputs bit-identical: {'yes' if same else 'NO'})",
            ours_s,
            peer_s,
            "s",
            peer_s / ours_s,
            note="ratio = mergekit time / ours",
        ),
        Row(
            f"peer: {label}, {what}: peak RSS",
            float(ours_rss),
            float(peer_rss),
            "B",
            peer_rss / ours_rss,
            note="each command's own process; ratio = mergekit / ours",
        ),
    ]


def _same_linear_merge(ours: Path, peer: Path) -> bool:
    """Whether two merged folders hold the same values: mergekit writes transformers 5's
    stacked expert layout (gate_up_proj, down_proj), ours keeps the inputs' per-expert one."""
    from safetensors import safe_open

    def load(folder: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out |= {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
        return out

    a, b = load(ours), load(peer)
    for layer in range(2):
        pre = f"model.layers.{layer}"
        w = {n: torch.stack([a.pop(f"{pre}.block_sparse_moe.experts.{j}.{n}.weight")
                             for j in range(8)]) for n in ("w1", "w2", "w3")}  # fmt: skip
        a[f"{pre}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
        a[f"{pre}.mlp.experts.down_proj"] = w["w2"]
        a[f"{pre}.mlp.gate.weight"] = a.pop(f"{pre}.block_sparse_moe.gate.weight")
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
