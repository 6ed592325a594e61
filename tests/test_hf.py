"""Hugging Face MoE model folders on the server side: tiny Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE
models built offline from their ``transformers`` configs, four clients each, through the real CLI
(affinity → plan-sync → aggregate --plan); every merged expert of every MoE layer checked against
Eq. 11 computed here, every output folder loaded back with ``AutoModelForCausalLM``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import clean_failure

transformers = pytest.importorskip("transformers")

Run = Callable[..., Any]
SAMPLES = {0: 100, 1: 250, 2: 300, 3: 350}
COMMON = dict(
    vocab_size=48,
    hidden_size=16,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    num_experts_per_tok=2,
)


def _config(family: str) -> Any:
    if family == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=12, num_hidden_layers=2, num_local_experts=4, **COMMON
        )
    if family == "qwen2_moe":  # MoE in blocks 1 and 3, dense blocks 0 and 2; a shared expert
        return transformers.Qwen2MoeConfig(
            intermediate_size=20, moe_intermediate_size=8, shared_expert_intermediate_size=12,
            num_hidden_layers=4, decoder_sparse_step=2, num_experts=4, **COMMON,
        )  # fmt: skip
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            intermediate_size=20, moe_intermediate_size=8, num_hidden_layers=2, num_experts=4,
            head_dim=8, **COMMON,
        )  # fmt: skip
    return transformers.OlmoeConfig(
        intermediate_size=12, num_hidden_layers=2, num_experts=4, **COMMON
    )


def _moe_blocks(family: str) -> list[int]:
    return [1, 3] if family == "qwen2_moe" else [0, 1]


def _expert_slots(family: str, block: int) -> list[str]:
    if family == "mixtral":
        return [
            f"model.layers.{block}.block_sparse_moe.experts.{{j}}.{w}.weight"
            for w in ("w1", "w2", "w3")
        ]
    return [
        f"model.layers.{block}.mlp.experts.{{j}}.{w}_proj.weight" for w in ("gate", "up", "down")
    ]


def _make_clients(root: Path, family: str, stacked: bool = False) -> Path:
    """Four client folders client-0..3 of one family, differently initialised; clients 1 and 3
    sharded (an index and several shards)."""
    transformers.logging.set_verbosity_error()
    folder = root / family / "r1"
    for c in range(4):
        torch.manual_seed(c)
        model = transformers.AutoModelForCausalLM.from_config(_config(family))
        dest = folder / f"client-{c}"
        if stacked:  # the layout transformers holds in memory, saved as is
            dest.mkdir(parents=True)
            model.config.save_pretrained(dest)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
        else:
            model.save_pretrained(dest, max_shard_size="20KB" if c % 2 else "1GB")
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    return out


def _server_steps(run_cli: Run, folder: Path, out: Path) -> dict[str, Any]:
    samples = [f"--num-samples={c}={n}" for c, n in SAMPLES.items()]
    r = run_cli("affinity", str(folder), *samples, "--out", str(out / "aff.json"), "-q")
    assert r.code == 0, r.err
    r = run_cli(
        "plan-sync", str(out / "aff.json"), "--top-p", "3", "--out", str(out / "plan.json"), "-q"
    )
    assert r.code == 0, r.err
    r = run_cli(
        "aggregate", "--plan", str(out / "plan.json"), str(folder), *samples,
        "--out", str(out / "agg"), "-q",
    )  # fmt: skip
    assert r.code == 0, r.err
    plan: dict[str, Any] = json.loads((out / "plan.json").read_text())
    return plan


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_eq11_on_every_expert_of_every_layer(tmp_path: Path, run_cli: Run, family: str) -> None:
    folder = _make_clients(tmp_path, family)
    plan = _server_steps(run_cli, folder, tmp_path)
    inputs = {c: _tensors(folder / f"client-{c}") for c in range(4)}
    blocks = _moe_blocks(family)
    assert len(plan["layers"]) == len(blocks)  # MoE layers by rank, dense blocks skipped
    checked = 0
    for c in range(4):
        out = tmp_path / "agg" / f"client-{c:03d}"
        merged = _tensors(out)
        assert set(merged) == set(inputs[c])
        # Eq. 11 by hand: θ_(i,j) ← Σ a_(i,j),(i',j') θ_(i',j'), per MoE layer
        for layer, block in enumerate(blocks):
            for target in plan["layers"][layer]["targets"]:
                if target["client"] != c:
                    continue
                for slot in _expert_slots(family, block):
                    want = sum(
                        s["weight"] * inputs[s["client"]][slot.format(j=s["expert"])].double()
                        for s in target["sources"]
                    )
                    got = merged[slot.format(j=target["expert"])]
                    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
                    checked += 1
        # shared tensors: the sample-weighted mean; routers stay the client's own (per-client gate)
        total = sum(SAMPLES.values())
        for name in (
            "model.embed_tokens.weight",
            f"model.layers.{blocks[0]}.self_attn.q_proj.weight",
        ):
            want = sum(SAMPLES[k] / total * inputs[k][name].double() for k in range(4))
            torch.testing.assert_close(merged[name], want.float(), rtol=0, atol=1e-6)
        router = next(
            n
            for n in merged
            if n.endswith("gate.weight") and "experts" not in n and "shared" not in n
        )
        assert torch.equal(merged[router], inputs[c][router])
        # same sharding, same config, provenance in the metadata; transformers loads it
        src = folder / f"client-{c}"
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
        assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as h:
            meta = h.metadata()
        assert meta["format"] == "pt" and meta["client_id"] == str(c)
        assert meta["num_samples"] == str(SAMPLES[c]) and meta["method"] == "fedmoe-da"
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        assert logits.shape == (1, 4, 48) and bool(torch.isfinite(logits).all())
    assert checked == 4 * 4 * len(blocks) * 3


def test_qwen2_shared_expert_is_a_shared_part(tmp_path: Path, run_cli: Run) -> None:
    folder = _make_clients(tmp_path, "qwen2_moe")
    _server_steps(run_cli, folder, tmp_path)
    inputs = {c: _tensors(folder / f"client-{c}") for c in range(4)}
    total = sum(SAMPLES.values())
    names = ["model.layers.1.mlp.shared_expert.up_proj.weight", "model.layers.1.mlp.shared_expert_gate.weight",
             "model.layers.0.mlp.up_proj.weight"]  # fmt: skip
    for name in names:
        want = sum(SAMPLES[k] / total * inputs[k][name].double() for k in range(4))
        for c in range(4):
            got = _tensors(tmp_path / "agg" / f"client-{c:03d}")[name]
            torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)


def test_stacked_layout_and_a_second_round(tmp_path: Path, run_cli: Run) -> None:
    """transformers' in-memory stacked layout (experts.gate_up_proj (E, 2F, H)) read and written;
    the merged folders, which carry fedmoe's metadata, go through a second round as they are."""
    folder = _make_clients(tmp_path, "mixtral", stacked=True)
    plan = _server_steps(run_cli, folder, tmp_path)
    inputs = {c: _tensors(folder / f"client-{c}") for c in range(4)}
    for layer in range(2):
        for target in plan["layers"][layer]["targets"]:
            merged = _tensors(tmp_path / "agg" / f"client-{target['client']:03d}")
            for w in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{w}"
                want = sum(
                    s["weight"] * inputs[s["client"]][name][s["expert"]].double()
                    for s in target["sources"]
                )
                torch.testing.assert_close(
                    merged[name][target["expert"]], want.float(), rtol=0, atol=1e-6
                )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "agg" / "client-002")
    assert bool(torch.isfinite(model(torch.tensor([[5, 6]])).logits).all())
    # round 2 over the outputs: client ids and sample counts now come from the metadata
    r = run_cli(
        "aggregate",
        "--method",
        "fedavg",
        str(tmp_path / "agg"),
        "--out",
        str(tmp_path / "agg2"),
        "-q",
    )
    assert r.code == 0, r.err
    manifest = json.loads((tmp_path / "agg2" / "aggregate.json").read_text())
    assert [e["num_samples"] for e in manifest["checkpoints"]] == [SAMPLES[c] for c in range(4)]
    first = _tensors(tmp_path / "agg2" / "client-000")
    name = "model.layers.0.mlp.experts.down_proj"
    total = sum(SAMPLES.values())
    agg = {c: _tensors(tmp_path / "agg" / f"client-{c:03d}") for c in range(4)}
    want = sum(SAMPLES[c] / total * agg[c][name].double() for c in range(4))
    torch.testing.assert_close(first[name], want.float(), rtol=0, atol=1e-6)


def test_custom_layout_file(tmp_path: Path, run_cli: Run) -> None:
    """An architecture with no built-in layout: refused with the option to declare it; declared in
    YAML, it runs."""
    folder = _make_clients(tmp_path, "olmoe")
    for c in range(4):
        cfg = folder / f"client-{c}" / "config.json"
        data = json.loads(cfg.read_text())
        data["model_type"] = "my_moe"
        cfg.write_text(json.dumps(data))
    out = tmp_path / "agg"
    r = run_cli(
        "aggregate", "--method", "fedavg", str(folder), "--num-samples", "*=1", "--out", str(out)
    )
    line = clean_failure(r, 3)
    assert "model_type 'my_moe' has no built-in layout" in line and "--layout" in r.err
    assert not out.exists()
    layout = tmp_path / "layout.yaml"
    layout.write_text(
        "name: my-moe\nexperts_key: num_experts\nrules:\n"
        "  - {pattern: 'model.layers.{layer}.mlp.gate.weight', role: gate, proxy: true}\n"
        "  - {pattern: 'model.layers.{layer}.mlp.experts.{expert}.{name}', role: expert}\n"
        "  - {pattern: 'model.layers.{index}.self_attn.{name}', role: shared}\n"
    )
    r = run_cli("aggregate", "--method", "fedavg", str(folder), "--num-samples", "*=1",
                "--layout", str(layout), "--out", str(out))  # fmt: skip
    line = clean_failure(r, 3)  # norms and embeddings are in no rule: named
    assert "match no rule" in line and "model.embed_tokens.weight" in line and "--layout" in r.err
    layout.write_text(layout.read_text() + "  - {pattern: '{name}', role: shared}\n")
    r = run_cli("aggregate", "--method", "fedavg", str(folder), "--num-samples", "*=1",
                "--layout", str(layout), "--out", str(out), "-q")  # fmt: skip
    assert r.code == 0, r.err
    assert len(list(out.glob("client-*"))) == 4


# --- hostile folders: exit 3, one line naming the file and tensor, no output -----------------


@pytest.fixture(scope="module")
def mixtral_clients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_clients(tmp_path_factory.mktemp("hf"), "mixtral")


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _refused(run_cli: Run, folder: Path, out: Path) -> str:
    r = run_cli(
        "aggregate", "--method", "fedavg", str(folder), "--num-samples", "*=1", "--out", str(out)
    )
    line = clean_failure(r, 3)
    assert not out.exists()
    return line


def test_truncated_shard(tmp_path: Path, run_cli: Run, mixtral_clients: Path) -> None:
    folder = _copy(mixtral_clients, tmp_path / "r1")
    shard = sorted((folder / "client-1").glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    line = _refused(run_cli, folder, tmp_path / "out")
    assert str(shard) in line and "truncated" in line + "the shard may be truncated"


def test_missing_index_entry(tmp_path: Path, run_cli: Run, mixtral_clients: Path) -> None:
    folder = _copy(mixtral_clients, tmp_path / "r1")
    index = folder / "client-3" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    del data["weight_map"][name]
    index.write_text(json.dumps(data))
    line = _refused(run_cli, folder, tmp_path / "out")
    assert name in line and "missing index entry" in line and "client-3" in line


def test_missing_expert_tensor(tmp_path: Path, run_cli: Run, mixtral_clients: Path) -> None:
    folder = _copy(mixtral_clients, tmp_path / "r1")
    shard = folder / "client-0" / "model.safetensors"
    state = _tensors(folder / "client-0")
    del state["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, str(shard), metadata={"format": "pt"})
    line = _refused(run_cli, folder, tmp_path / "out")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight is missing" in line
    assert "client-0" in line


def test_router_of_the_wrong_shape(tmp_path: Path, run_cli: Run, mixtral_clients: Path) -> None:
    folder = _copy(mixtral_clients, tmp_path / "r1")
    shard = folder / "client-2" / "model.safetensors"
    state = _tensors(folder / "client-2")
    name = "model.layers.1.block_sparse_moe.gate.weight"
    state[name] = torch.zeros(4, 8)  # (E, H/2)
    save_file(state, str(shard), metadata={"format": "pt"})
    line = _refused(run_cli, folder, tmp_path / "out")
    assert name in line and str(shard) in line and "[4, 8]" in line


def test_mixed_architectures_and_expert_counts(
    tmp_path: Path, run_cli: Run, mixtral_clients: Path
) -> None:
    folder = _copy(mixtral_clients, tmp_path / "r1")
    shutil.rmtree(folder / "client-3")
    other = _make_clients(tmp_path / "other", "olmoe")
    shutil.copytree(other / "client-3", folder / "client-3")
    line = _refused(run_cli, folder, tmp_path / "out")
    assert "client-3" in line and "different config.json" in line
    # the same family with 8 experts instead of 4
    shutil.rmtree(folder / "client-3")
    transformers.logging.set_verbosity_error()
    cfg = _config("mixtral")
    cfg.num_local_experts = 8
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "client-3")
    line = _refused(run_cli, folder, tmp_path / "out")
    assert "client-3" in line and "num_local_experts: 8 vs 4" in line


def test_user_folders_need_sample_counts_and_ids(
    tmp_path: Path, run_cli: Run, mixtral_clients: Path
) -> None:
    out = tmp_path / "out"
    r = run_cli("aggregate", "--method", "fedavg", str(mixtral_clients), "--out", str(out))
    line = clean_failure(r, 3)
    assert "no sample count for client 0" in line and "--num-samples 0=N" in r.err
    folder = _copy(mixtral_clients, tmp_path / "r1")
    (folder / "client-2").rename(folder / "site")
    line = _refused(run_cli, folder, out)
    assert "site" in line and "no client id" in line
    r = run_cli(
        "aggregate",
        "--method",
        "fedavg",
        str(mixtral_clients),
        "--num-samples",
        "x=3",
        "--out",
        str(out),
    )
    clean_failure(r, 2)


def test_tampered_folder_under_a_manifest(
    tmp_path: Path, run_cli: Run, mixtral_clients: Path
) -> None:
    """aggregate.json records each output folder's digest: a changed shard is refused."""
    r = run_cli("aggregate", "--method", "fedavg", str(mixtral_clients), "--num-samples", "*=1",
                "--out", str(tmp_path / "agg"), "-q")  # fmt: skip
    assert r.code == 0, r.err
    shard = sorted((tmp_path / "agg" / "client-001").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    r = run_cli(
        "affinity", str(tmp_path / "agg" / "aggregate.json"), "--out", str(tmp_path / "a.json")
    )
    line = clean_failure(r, 3)
    assert "client-001" in line and "sha256 differs" in line


def test_force_over_an_output_folder_leaves_no_stale_file(
    tmp_path: Path, run_cli: Run, mixtral_clients: Path
) -> None:
    """A folder replaced with --force is the new model only: a shard or file of the model it
    replaces (another sharding, a tokenizer the new one lacks) does not survive beside it."""
    args = ("aggregate", "--method", "fedavg", str(mixtral_clients), "--num-samples", "*=1",
            "--out", str(tmp_path / "agg"), "-q")  # fmt: skip
    assert run_cli(*args).code == 0
    folder = tmp_path / "agg" / "client-000"
    first = sorted(p.name for p in folder.iterdir())
    (folder / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    (folder / "tokenizer.json").write_text("{}")
    r = run_cli(*args, "--force")
    assert r.code == 0, r.err
    assert sorted(p.name for p in folder.iterdir()) == first
    r = run_cli("affinity", str(tmp_path / "agg" / "aggregate.json"), "--out", str(tmp_path / "a"))
    assert r.code == 0, r.err  # the recorded digests are the folders' as they now are


def test_pooled_layers_one_matrix_from_every_layers_gate_rows(tmp_path: Path, run_cli: Run) -> None:
    """--pool-layers: expert j of a client is compared over every MoE layer at once (cosine =
    mean over layers of the per-layer cosines), every layer gets the same matrix, and the merge
    applies it to each layer's experts."""
    folder = _make_clients(tmp_path, "mixtral")
    samples = [f"--num-samples={c}={n}" for c, n in SAMPLES.items()]
    aff_path, plan_path = tmp_path / "aff.json", tmp_path / "plan.json"
    r = run_cli("affinity", str(folder), *samples, "--pool-layers", "--out", str(aff_path), "-q")
    assert r.code == 0, r.err
    aff = json.loads(aff_path.read_text())
    assert aff["pooled"] is True and len(aff["layers"]) == 2
    assert aff["layers"][0]["neighbours"] == aff["layers"][1]["neighbours"]
    # the pooled similarity by hand, from the routers of both layers
    routers = {
        c: [_tensors(folder / f"client-{c}")[f"model.layers.{b}.block_sparse_moe.gate.weight"]
            for b in _moe_blocks("mixtral")]
        for c in range(4)
    }  # fmt: skip
    e = routers[0][0].shape[0]
    for m, row in enumerate(aff["layers"][0]["neighbours"]):
        for m2, sim in row:
            (c1, j1), (c2, j2) = divmod(m, e), divmod(m2, e)
            want = sum(
                float(torch.nn.functional.cosine_similarity(g1[j1], g2[j2], dim=0))
                for g1, g2 in zip(routers[c1], routers[c2], strict=True)
            ) / len(routers[c1])
            assert abs(sim - want) < 1e-5
    r = run_cli("plan-sync", str(aff_path), "--top-p", "3", "--out", str(plan_path), "-q")
    assert r.code == 0, r.err
    plan = json.loads(plan_path.read_text())
    assert plan["layers"][0]["targets"] == plan["layers"][1]["targets"]
    r = run_cli("aggregate", "--plan", str(plan_path), str(folder), *samples,
                "--out", str(tmp_path / "agg"), "-q")  # fmt: skip
    assert r.code == 0, r.err
    inputs = {c: _tensors(folder / f"client-{c}") for c in range(4)}
    target = plan["layers"][1]["targets"][5]  # the second layer merged by the pooled rows
    slot = _expert_slots("mixtral", _moe_blocks("mixtral")[1])[0]
    want = sum(
        s["weight"] * inputs[s["client"]][slot.format(j=s["expert"])].double()
        for s in target["sources"]
    )
    got = _tensors(tmp_path / "agg" / f"client-{target['client']:03d}")[
        slot.format(j=target["expert"])
    ]
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)


def test_plain_merge_of_whole_model_folders(
    tmp_path: Path, run_cli: Run, mixtral_clients: Path
) -> None:
    """mergekit's linear merge on model folders: every tensor is Σ w_f · folder_f, written in the
    first folder's sharding (client-1 is sharded, client-0 is one file), with its config copied;
    transformers loads the result."""
    folders = [mixtral_clients / f"client-{c}" for c in (1, 0, 2)]
    out = tmp_path / "merged"
    r = run_cli("aggregate", *map(str, folders), "--weights", "0.5,0.3,0.2", "--out", str(out),
                "-q")  # fmt: skip
    assert r.code == 0, r.err
    src = [_tensors(f) for f in folders]
    got = _tensors(out)
    assert set(got) == set(src[0])
    for name, t in got.items():
        want = 0.5 * src[0][name].double() + 0.3 * src[1][name].double() + 0.2 * src[2][name]
        torch.testing.assert_close(t, want.float(), rtol=0, atol=2e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folders[0].iterdir())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"]
        == json.loads((folders[0] / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert (out / "config.json").read_bytes() == (folders[0] / "config.json").read_bytes()
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as h:
        meta = h.metadata()
    assert meta["format"] == "pt"
    assert [s["weight"] for s in json.loads(meta["fedmoe_merge"])["sources"]] == [0.5, 0.3, 0.2]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert bool(torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all())
    # --method mean into a folder that exists needs --force, and then holds only the new model
    r = run_cli("aggregate", str(folders[1]), str(folders[2]), "--method", "mean",
                "--out", str(out), "-q")  # fmt: skip
    assert "exists" in clean_failure(r, 4)
    r = run_cli("aggregate", str(folders[1]), str(folders[2]), "--method", "mean",
                "--out", str(out), "-q", "--force")  # fmt: skip
    assert r.code == 0, r.err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folders[1].iterdir())
    mean = _tensors(out)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(mean[name], (src[1][name] + src[2][name]) / 2, rtol=0, atol=1e-6)
