"""``aggregate --plan`` on 8 Mixtral-shaped Hugging Face client folders (bfloat16, two shards and an
index each, about 500 MB per client; 8 MiB in ``--quick``): the round's input bytes per second
against a plain sequential read of the same folders in the same run, and the peak extra anonymous
memory against the largest tensor and one client's model.

The folders are written here from a Mixtral config (8 experts, top-2, grouped-query attention),
with random tensors; affinity and plan-sync run first (untimed), then the timed merge runs the
same code as ``fedmoe aggregate --plan`` (Eq. 11 per MoE layer, sample-weighted shared parts).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import Row, cli, copy_time, merge_rows, sequential_read
from bench.round_bench import AnonPeak


def _config(quick: bool) -> dict[str, object]:
    hidden, ffn, vocab, layers = (128, 448, 4000, 2) if quick else (1024, 3584, 32000, 2)
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def _shapes(cfg: dict[str, object]) -> dict[str, tuple[int, ...]]:
    h, f, v = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])  # type: ignore[call-overload]
    kv = h * int(cfg["num_key_value_heads"]) // int(cfg["num_attention_heads"])  # type: ignore[call-overload]
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "model.norm.weight": (h,),
    }
    for b in range(int(cfg["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{b}"
        out |= {
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.block_sparse_moe.gate.weight": (8, h),
        }
        for j in range(8):
            e = f"{p}.block_sparse_moe.experts.{j}"
            out |= {f"{e}.w1.weight": (f, h), f"{e}.w2.weight": (h, f), f"{e}.w3.weight": (f, h)}
    return out


def _make_folders(root: Path, quick: bool, clients: int = 8) -> list[Path]:
    cfg = _config(quick)
    shapes = _shapes(cfg)
    names = sorted(shapes)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()}
    folders = []
    for c in range(clients):
        folder = root / f"client-{c}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(cfg))
        for shard, members in shards.items():
            state = {
                n: (base[n].float() + 0.1 * torch.randn(shapes[n], generator=gen)).to(
                    torch.bfloat16
                )
                for n in members
            }
            meta = {"format": "pt"}
            save_file(state, str(folder / shard), metadata=meta)
        total = sum(2 * torch.Size(s).numel() for s in shapes.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: s for s, members in shards.items() for n in members},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        folders.append(folder)
    return folders


def run(quick: bool) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = _make_folders(root / "r1", quick)
        files = [p for f in folders for p in sorted(f.glob("*.safetensors"))]
        total = sum(p.stat().st_size for p in files)
        samples = ["--num-samples", "*=100"]
        cli("affinity", str(root / "r1"), *samples, "--out", str(root / "aff.json"), "-q")
        cli("plan-sync", str(root / "aff.json"), "--out", str(root / "plan.json"), "-q")
        read_bps = sequential_read(files)

        def merge(i: int) -> None:
            cli(
                "aggregate", "--plan", str(root / "plan.json"), str(root / "r1"), *samples,
                "--out", str(root / f"agg{i}"), "-q",
            )  # fmt: skip

        merge(0)  # warm: the inputs are in the page cache, as for the sequential read
        start = time.perf_counter()
        with AnonPeak() as peak:
            merge(1)
        seconds = time.perf_counter() - start
        copy_s = copy_time(files, root / "copy")  # the floor of writing the same bytes anew
        per_client = total / len(folders)
        largest = max(2 * torch.Size(s).numel() for s in _shapes(_config(quick)).values())
        mb = per_client / 1e6
        label = f"aggregate --plan: 8 Mixtral-shaped HF folders × {mb:.0f} MB (bf16, 2 shards)"
        rows.extend(merge_rows(label, total, seconds, read_bps, copy_s, "shards"))
        rows.append(
            Row(
                "aggregate --plan on HF folders: peak extra anonymous memory",
                float(peak.extra),
                float(largest),
                "B",
                peak.extra / largest,
                "≤ 8 × the largest tensor",
                peak.extra <= 8 * largest,
                f"reference: the largest tensor (one client's model: {per_client / 2**20:.0f} MiB)",
            )
        )
    return rows
