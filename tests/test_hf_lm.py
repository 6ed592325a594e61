"""The client side for Hugging Face MoE language models: text datasets as byte windows, a tiny
model made offline (init --hf), local rounds of next-byte training with the router's balancing
loss (train-round), per-domain perplexity (evaluate), and the whole chain through the real CLI."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedmoe.data import DataSpec
from fedmoe.data.text import WINDOW
from fedmoe.io.datasets import load_dataset
from tests.helpers import clean_failure, run_in

transformers = pytest.importorskip("transformers")

Run = Callable[..., Any]
TINY = ("--embed-dim", "16", "--expert-hidden", "16", "--experts", "4", "--top-k", "2")


def test_text_mix_is_three_domains_of_byte_windows() -> None:
    a = load_dataset(DataSpec("text-mix"))
    b = load_dataset(DataSpec("text-mix"))
    assert a.fingerprint() == b.fingerprint()  # fixed offsets: the same bytes every time
    assert a.domain_names == ("code", "prose", "data") and a.class_names == a.domain_names
    assert a.x.shape == (3600, WINDOW + 1)
    assert np.array_equal(a.y, a.domain)
    assert np.array_equal(np.bincount(a.domain), [1200, 1200, 1200])
    assert a.x.min() >= 0 and a.x.max() <= 255 and np.array_equal(a.x, np.round(a.x))
    data = bytes(a.x[a.domain == 2].astype(np.uint8).reshape(-1))
    assert data.count(b",") > len(data) // 10  # CSV tables


def test_jsonl_and_text_folder(tmp_path: Path) -> None:
    lines = [{"text": "alpha " * 200, "domain": "a"}, {"text": "beta! " * 300, "domain": "b"}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    d = load_dataset(DataSpec(str(path)))
    assert d.domain_names == ("a", "b") and d.has_domains
    for row, dom in zip(d.x.astype(np.uint8), d.domain, strict=True):
        window = bytes(row).decode()
        assert window in (lines[dom]["text"] * 2)  # a contiguous piece of its domain's text
    assert np.array_equal(np.bincount(d.domain), [1200 // 65, 1800 // 65])  # non-overlapping
    folder = tmp_path / "corpus"
    (folder / "news").mkdir(parents=True)
    (folder / "code").mkdir()
    (folder / "news" / "1.txt").write_text("the news of the day " * 40)
    (folder / "code" / "x.py").write_text("def f(x):\n    return x\n" * 40)
    d = load_dataset(DataSpec(str(folder)))
    assert d.domain_names == ("code", "news")
    assert (
        bytes(d.x[d.domain == 0][0].astype(np.uint8)).decode() in "def f(x):\n    return x\n" * 41
    )


def test_too_little_text_is_an_input_error(tmp_path: Path, run_cli: Run) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "short", "domain": "a"}) + "\n")
    r = run_cli(
        "partition", "--dataset", str(path), "--clients", "2", "--out", str(tmp_path / "p.json")
    )
    line = clean_failure(r, 3)
    assert "domain 'a' has 5 bytes of text" in line
    path.write_text("not json\n")
    assert "t.jsonl:1: not a JSON object" in clean_failure(
        run_cli(
            "partition", "--dataset", str(path), "--clients", "2", "--out", str(tmp_path / "p.json")
        ),
        3,
    )


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-client federation of a tiny OLMoE on text-mix: init, one round, FedMoE-DA's server steps
    and FedAvg's, and every evaluation."""
    folder = tmp_path_factory.mktemp("lm")
    run_in(
        folder,
        ("partition", "--dataset", "text-mix", "--clients", "3", "--scheme", "domain", "--alpha",
         "0.1", "--seed", "1", "--out", "p.json", "-q"),
        ("init", "--hf", "olmoe", *TINY, "--partition", "p.json", "--out", "init", "-q"),
        ("evaluate", "--partition", "p.json", "init", "--out", "e0.json", "-q"),
        ("train-round", "--partition", "p.json", "--model", "init", "--epochs", "1",
         "--batch-size", "64", "--out", "r1", "-q"),
        ("affinity", "r1/train-round.json", "--partition", "p.json", "--out", "aff.json", "-q"),
        ("plan-sync", "aff.json", "--top-p", "2", "--out", "plan.json", "-q"),
        ("aggregate", "--plan", "plan.json", "r1/train-round.json", "--out", "agg", "-q"),
        ("evaluate", "--partition", "p.json", "agg", "--out", "e1.json", "-q"),
    )  # fmt: skip
    return folder


def test_training_lowers_perplexity_and_records_routing_by_domain(lm_run: Path) -> None:
    before = json.loads((lm_run / "e0.json").read_text())
    after = json.loads((lm_run / "e1.json").read_text())
    assert after["mean_local_ppl"] < 0.5 * before["mean_local_ppl"]  # random: about 256
    assert before["mean_local_ppl"] > 100
    assert all(v is not None and v > 1 for v in after["local_ppl_by_domain"])
    manifest = json.loads((lm_run / "r1" / "train-round.json").read_text())
    part = json.loads((lm_run / "p.json").read_text())
    for entry in manifest["checkpoints"]:
        c = entry["client"]
        shard = lm_run / "r1" / entry["path"] / "model.safetensors"
        with safe_open(str(shard), "pt") as h:
            meta = h.metadata()
        routing = json.loads(meta["routing"])
        n_train = len(part["clients"][c]["train"])
        assert entry["num_samples"] == n_train == int(meta["num_samples"])
        for layer in routing["layers"]:  # every byte position routes to top-2 of 4 experts
            by_domain = np.array(layer["by_domain"])
            assert by_domain.shape == (4, 3)
            assert by_domain.sum(axis=1).tolist() == layer["topk_count"]
            assert sum(layer["topk_count"]) == n_train * WINDOW * 2
    aff = json.loads((lm_run / "aff.json").read_text())
    assert aff["layers"][0]["expert_domain"]["names"] == ["code", "prose", "data"]


def test_merged_models_load_and_sum_to_eq11(lm_run: Path) -> None:
    plan = json.loads((lm_run / "plan.json").read_text())
    name = "model.layers.1.mlp.experts.{j}.down_proj.weight"

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(folder / "model.safetensors"), "pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118

    trained = {c: tensors(lm_run / "r1" / f"client-{c:03d}") for c in range(3)}
    for target in plan["layers"][1]["targets"]:
        merged = tensors(lm_run / "agg" / f"client-{target['client']:03d}")
        want = sum(
            s["weight"] * trained[s["client"]][name.format(j=s["expert"])].double()
            for s in target["sources"]
        )
        torch.testing.assert_close(
            merged[name.format(j=target["expert"])], want.float(), rtol=0, atol=1e-6
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_run / "agg" / "client-001")
    assert bool(torch.isfinite(model(torch.tensor([[104, 105]])).logits).all())


def test_train_experts_only_keeps_the_shared_tensors(lm_run: Path, tmp_path: Path) -> None:
    shutil.copytree(lm_run, tmp_path / "w", dirs_exist_ok=True)
    run_in(
        tmp_path / "w",
        ("train-round", "--partition", "p.json", "--model", "init", "--client", "0,1",
         "--epochs", "1", "--train", "experts", "--out", "x1", "-q"),
    )  # fmt: skip
    with safe_open(str(tmp_path / "w" / "init" / "model.safetensors"), "pt") as h:
        init = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    with safe_open(str(tmp_path / "w" / "x1" / "client-000" / "model.safetensors"), "pt") as h:
        out = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    assert torch.equal(out["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    assert torch.equal(
        out["model.layers.0.self_attn.q_proj.weight"],
        init["model.layers.0.self_attn.q_proj.weight"],
    )
    assert not torch.equal(
        out["model.layers.0.mlp.gate.weight"], init["model.layers.0.mlp.gate.weight"]
    )
    assert not torch.equal(
        out["model.layers.0.mlp.experts.0.up_proj.weight"],
        init["model.layers.0.mlp.experts.0.up_proj.weight"],
    )


def test_a_classifier_dataset_is_refused_for_a_language_model(
    lm_run: Path, tmp_path: Path, run_cli: Run
) -> None:
    shutil.copytree(lm_run / "init", tmp_path / "init")
    run_in(tmp_path, ("partition", "--clients", "2", "--out", "pd.json", "-q"))
    r = run_cli("train-round", "--partition", str(tmp_path / "pd.json"), "--model", str(tmp_path / "init"),
                "--out", str(tmp_path / "r"))  # fmt: skip
    assert "not byte windows" in clean_failure(r, 3)
    assert not (tmp_path / "r").exists()
