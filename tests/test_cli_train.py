"""``fedmoe init``, ``train-round`` and ``evaluate`` chained on the built-in dataset: streams, files,
determinism, continuation between rounds, exit codes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import clean_failure, run_in

from fedmoe.io.checkpoint import open_checkpoint
from fedmoe.io.manifest import sha256_file

Run = Callable[..., Any]

PARTITION = (
    "partition", "--dataset", "digits-rot", "--clients", "4", "--scheme", "domain",
    "--alpha", "0.5", "--seed", "7", "--out", "p.json", "-q",
)  # fmt: skip
INIT = (
    "init", "--partition", "p.json", "--experts", "4", "--embed-dim", "16",
    "--expert-hidden", "16", "--embed-hidden", "16", "--seed", "1",
)  # fmt: skip
TRAIN = (
    "train-round", "--partition", "p.json", "--epochs", "1", "--batch-size", "64",
    "--workers", "1",
)  # fmt: skip
EVAL_KEYS = {
    "mean_local_acc", "worst_local_acc", "mean_global_acc", "local_acc_by_domain",
    "global_acc_by_domain", "clients",
}  # fmt: skip


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (temp files included), relative and sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def files_in_base() -> list[str]:
    """What the base run holds."""
    return [
        "init.safetensors", "p.json", "r1/client-000.safetensors", "r1/client-001.safetensors",
        "r1/client-002.safetensors", "r1/client-003.safetensors", "r1/train-round.json",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding p.json, init.safetensors and round 1 (r1/), made once for the module."""
    folder = tmp_path_factory.mktemp("base")
    run_in(
        folder,
        PARTITION,
        (*INIT, "-q"),
        (*TRAIN, "--model", "init.safetensors", "--out", "r1", "-q"),
    )
    assert files_in(folder) == files_in_base()
    return folder


@pytest.fixture
def work(base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the base run, as the working folder."""
    target = tmp_path / "w"
    shutil.copytree(base_run, target)
    monkeypatch.chdir(target)
    return target


# ---------------------------------------------------------------------------------------------
# the chain, from nothing


def test_chain_partition_init_train_evaluate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    r = run_cli(*PARTITION)
    assert (r.code, r.out) == (0, "p.json\n")
    r = run_cli(*INIT)
    assert (r.code, r.out) == (0, "init.safetensors\n"), r.err
    assert "initial model:" in r.err and "in 4 experts" in r.err
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "all", "--out", "r1")
    assert (r.code, r.out) == (0, "r1/train-round.json\n"), r.err
    assert "train-round 1" in r.err  # the table goes to stderr
    assert files_in(tmp_path) == [
        "init.safetensors", "p.json",
        "r1/client-000.safetensors", "r1/client-001.safetensors",
        "r1/client-002.safetensors", "r1/client-003.safetensors",
        "r1/train-round.json",
    ]  # fmt: skip
    r = run_cli("evaluate", "--partition", "p.json", "r1/train-round.json")
    assert r.code == 0, r.err
    report = json.loads(r.out)  # the evaluation manifest on stdout
    assert report["kind"] == "evaluation" and report["schema_version"] == 1
    assert report.keys() >= EVAL_KEYS
    assert [c["id"] for c in report["clients"]] == [0, 1, 2, 3]
    assert report["domain_names"] == ["rot0", "rot90", "rot180", "rot270"]
    assert len(report["local_acc_by_domain"]) == len(report["global_acc_by_domain"]) == 4
    assert files_in(tmp_path)[-1] == "r1/train-round.json"  # evaluate wrote nothing


def test_init_checkpoint_and_json(work: Path, run_cli: Run) -> None:
    ck = open_checkpoint(work / "init.safetensors")
    assert (ck.meta.client_id, ck.meta.round, ck.meta.num_samples) == (None, 0, 0)
    assert (ck.meta.seed, ck.meta.method) == (1, "init")
    assert ck.meta.parent_sha256 == sha256_file(work / "p.json")
    cfg = ck.config
    assert (cfg.input_shape, cfg.num_classes) == ((1, 8, 8), 10)
    assert (cfg.num_experts, cfg.top_k, cfg.embed_dim, cfg.expert_hidden) == (4, 2, 16, 16)
    r = run_cli(*INIT, "--out", "again.safetensors", "--json")
    assert r.code == 0
    assert r.out.count("\n") == 1
    payload = json.loads(r.out)
    assert payload == {
        "ok": True,
        "path": "again.safetensors",
        "sha256": sha256_file(work / "again.safetensors"),
        "parameters": sum(t.numel() for t in ck.state().values()),
        "model_config": cfg.to_json(),
    }
    # same seed, same bytes; another seed, other bytes
    assert (work / "again.safetensors").read_bytes() == (work / "init.safetensors").read_bytes()
    assert run_cli(*INIT, "--seed", "2", "--out", "other.safetensors", "-q").code == 0
    assert (work / "other.safetensors").read_bytes() != (work / "init.safetensors").read_bytes()


def test_init_from_a_recipe(work: Path, run_cli: Run) -> None:
    (work / "recipe.yaml").write_text("model:\n  num_experts: 3\n  top_k: 1\n  embed: cnn\n")
    r = run_cli("init", "--config", "recipe.yaml", "--partition", "p.json", "--out", "c.st", "-q")
    assert (r.code, r.out) == (0, "c.st\n"), r.err
    cfg = open_checkpoint(work / "c.st").config
    assert (cfg.num_experts, cfg.top_k, cfg.embed, cfg.input_shape) == (3, 1, "cnn", (1, 8, 8))
    (work / "bad.yaml").write_text("model:\n  num_expert: 3\n")
    r = run_cli("init", "--config", "bad.yaml", "--partition", "p.json", "--out", "d.st")
    assert "unknown key 'model.num_expert' (did you mean 'num_experts'?)" in clean_failure(r, 2)
    assert not (work / "d.st").exists()


def test_init_recipe_value_of_the_wrong_type(work: Path, run_cli: Run) -> None:
    (work / "bad.yaml").write_text("model:\n  num_experts: four\n")
    r = run_cli("init", "--config", "bad.yaml", "--partition", "p.json", "--out", "d.st")
    assert "num_experts" in clean_failure(r, 2)


def test_init_needs_a_shape(work: Path, run_cli: Run) -> None:
    r = run_cli("init", "--num-classes", "3", "--out", "x.safetensors")
    assert "needs an input shape and a class count" in clean_failure(r, 2)
    r = run_cli("init", "--input-shape", "1,x", "--num-classes", "3", "--out", "x.safetensors")
    assert "--input-shape '1,x'" in clean_failure(r, 2)
    r = run_cli("init", "--partition", "p.json", "--experts", "2", "--top-k", "3")
    assert "--top-k must be at most num_experts = 2, got 3" in clean_failure(r, 2)
    assert not (work / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# train-round outputs


def test_round_manifest_and_checkpoints(work: Path) -> None:
    manifest = json.loads((work / "r1" / "train-round.json").read_text())
    part = json.loads((work / "p.json").read_text())
    init_sha = sha256_file(work / "init.safetensors")
    assert (manifest["kind"], manifest["round"], manifest["seed"]) == ("train-round", 1, 0)
    assert manifest["threads_per_client"] == 1
    assert manifest["train_config"]["epochs"] == 1 and manifest["train_config"]["batch_size"] == 64
    assert manifest["partition"] == {"path": "../p.json", "sha256": sha256_file(work / "p.json")}
    assert manifest["inputs"] == [{"path": "../init.safetensors", "sha256": init_sha}]
    assert [c["client"] for c in manifest["checkpoints"]] == [0, 1, 2, 3]
    for entry, row, client in zip(
        manifest["checkpoints"], manifest["clients"], part["clients"], strict=True
    ):
        path = work / "r1" / entry["path"]
        assert entry["path"] == f"client-{entry['client']:03d}.safetensors"
        assert entry["sha256"] == sha256_file(path)
        assert entry["num_samples"] == row["num_samples"] == client["num_train"]
        assert len(row["epoch_loss"]) == 1 and row["steps"] == -(-client["num_train"] // 64)
        ck = open_checkpoint(path)
        m = ck.meta
        assert (m.client_id, m.round, m.num_samples) == (entry["client"], 1, client["num_train"])
        assert (m.seed, m.method, m.parent_sha256) == (0, "train", init_sha)
        assert m.routing is not None and m.routing["num_samples"] == client["num_train"]
        assert sum(m.routing["layers"][0]["topk_count"]) == 2 * client["num_train"]
        assert [sum(col) for col in zip(*m.routing["layers"][0]["by_label"], strict=True)] == [
            2 * n for n in client_train_label_counts(work, entry["client"])
        ]


def client_train_label_counts(work: Path, cid: int) -> list[int]:
    from fedmoe.io.partition_file import load_partition

    part = load_partition(work / "p.json")
    labels = part.dataset.y[part.clients[cid].train]
    return [int((labels == c).sum()) for c in range(10)]


def test_json_prints_the_manifest(work: Path, run_cli: Run) -> None:
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--out", "r", "--json", "-q")
    assert r.code == 0 and r.err == ""
    assert r.out.count("\n") == 1
    assert json.loads(r.out) == json.loads((work / "r" / "train-round.json").read_text())


def test_same_seed_same_bytes_other_seed_other_bytes(work: Path, run_cli: Run) -> None:
    assert run_cli(*TRAIN, "--model", "init.safetensors", "--out", "again", "-q").code == 0
    assert run_cli(*TRAIN, "--model", "init.safetensors", "--out", "s1", "--seed", "1").code == 0
    for cid in range(4):
        name = f"client-{cid:03d}.safetensors"
        assert (work / "again" / name).read_bytes() == (work / "r1" / name).read_bytes()
        assert (work / "s1" / name).read_bytes() != (work / "r1" / name).read_bytes()
    a = json.loads((work / "again" / "train-round.json").read_text())
    b = json.loads((work / "r1" / "train-round.json").read_text())
    assert a["checkpoints"] == b["checkpoints"]


def test_worker_processes_give_the_same_bytes(work: Path, run_cli: Run) -> None:
    """Two spawned training processes (one thread each) write exactly what one in-process run
    wrote: each client's training depends on (seed, round, client) alone."""
    train = tuple(
        a if a != "1" or TRAIN[i - 1] != "--workers" else "2" for i, a in enumerate(TRAIN)
    )
    assert "2" in train
    r = run_cli(*train, "--model", "init.safetensors", "--out", "w2", "-q")
    assert r.code == 0, r.err
    for cid in range(4):
        name = f"client-{cid:03d}.safetensors"
        assert (work / "w2" / name).read_bytes() == (work / "r1" / name).read_bytes()


def test_second_round_continues_from_the_first(work: Path, run_cli: Run) -> None:
    r = run_cli(*TRAIN, "--model", "r1/train-round.json", "--out", "r2", "-q")
    assert (r.code, r.out) == (0, "r2/train-round.json\n"), r.err
    manifest = json.loads((work / "r2" / "train-round.json").read_text())
    assert manifest["round"] == 2
    names = [f"client-{c:03d}.safetensors" for c in range(4)]
    assert manifest["inputs"] == [
        {"path": f"../r1/{name}", "sha256": sha256_file(work / "r1" / name)} for name in names
    ]
    for c in range(4):
        name = f"client-{c:03d}.safetensors"
        m = open_checkpoint(work / "r2" / name).meta
        assert (m.client_id, m.round) == (c, 2)
        assert m.parent_sha256 == sha256_file(work / "r1" / name)
    # a folder of client checkpoints works the same
    r = run_cli(*TRAIN, "--model", "r1", "--out", "r2b", "-q")
    assert r.code == 0, r.err
    for c in range(4):
        name = f"client-{c:03d}.safetensors"
        assert (work / "r2b" / name).read_bytes() == (work / "r2" / name).read_bytes()
    # --round overrides the number
    r = run_cli(*TRAIN, "--model", "r1", "--client", "0", "--round", "9", "--out", "c.safetensors")
    assert r.code == 0 and open_checkpoint(work / "c.safetensors").meta.round == 9


def test_single_client(work: Path, run_cli: Run) -> None:
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "2", "--out", "c2.safetensors")
    assert (r.code, r.out) == (0, "c2.json\n"), r.err
    new = sorted(set(files_in(work)) - set(files_in_base()))
    assert new == ["c2.json", "c2.safetensors"]
    manifest = json.loads((work / "c2.json").read_text())
    assert manifest["checkpoints"] == [
        {
            "client": 2,
            "path": "c2.safetensors",
            "sha256": sha256_file(work / "c2.safetensors"),
            "num_samples": open_checkpoint(work / "c2.safetensors").meta.num_samples,
        }
    ]
    assert open_checkpoint(work / "c2.safetensors").meta.client_id == 2
    # one client alone trains exactly as it does among all
    assert (work / "c2.safetensors").read_bytes() == (
        work / "r1" / "client-002.safetensors"
    ).read_bytes()
    # its manifest is a checkpoint set too
    r = run_cli(*TRAIN, "--model", "c2.json", "--client", "2", "--out", "c2r2.safetensors", "-q")
    assert r.code == 0 and open_checkpoint(work / "c2r2.safetensors").meta.round == 2


def test_bf16_precision_is_recorded_and_trains_other_bits(work: Path, run_cli: Run) -> None:
    """--precision bf16 reaches training (other bytes than fp32's, float32 tensors still) and
    the manifest's train_config; a CPU without bfloat16 units gets a note on stderr."""
    from fedmoe.train.local import bf16_native

    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "2", "--out", "b.safetensors",
                "--precision", "bf16")  # fmt: skip
    assert r.code == 0, r.err
    assert json.loads((work / "b.json").read_text())["train_config"]["precision"] == "bf16"
    assert ("no bfloat16 matrix units" in r.err) is not bf16_native()
    bf16, fp32 = (
        open_checkpoint(work / "b.safetensors"),
        open_checkpoint(work / "r1" / "client-002.safetensors"),
    )
    assert all(t.dtype == torch.float32 for t in bf16.state().values())
    assert (work / "b.safetensors").read_bytes() != (
        work / "r1" / "client-002.safetensors"
    ).read_bytes()
    assert fp32.meta.round == bf16.meta.round


def test_quiet_keeps_stderr_empty(work: Path, run_cli: Run) -> None:
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "1", "--out", "c.safetensors")
    assert r.code == 0 and "train-round 1" in r.err
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "1", "--out", "d.safetensors",
                "--quiet")  # fmt: skip
    assert (r.code, r.out, r.err) == (0, "d.json\n", "")


# ---------------------------------------------------------------------------------------------
# train-round errors: exit code, one line, no output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--client", "7", "--out", "c.safetensors"), 3, "p.json: no client 7 (the partition has "
         "clients 0..3)"),
        (("--client", "-1", "--out", "c.safetensors"), 3, "no client -1"),
        (("--client", "two", "--out", "c.safetensors"), 2, "--client 'two': expected 'all', an id or ids like 0,3,5"),
        (("--client", "2", "--out", "c2.bin"), 2, "with one --client, give a .safetensors file"),
        (("--client", "1", "--out", "x/c.safetensors", "--optimizer", "lion"), 2,
         "--optimizer must be one of adam, adamw, sgd, got 'lion'"),
        (("--client", "1", "--out", "x/c.safetensors", "--epochs", "-1"), 2, "epochs must be"),
        (("--client", "1", "--out", "x/c.safetensors", "--precision", "fp16"), 2,
         "--precision must be one of fp32, bf16, got 'fp16'"),
    ],
)  # fmt: skip
def test_bad_arguments(
    work: Path, run_cli: Run, args: tuple[str, ...], code: int, message: str
) -> None:
    before = files_in(work)
    r = run_cli(*TRAIN, "--model", "init.safetensors", *args)
    assert message in clean_failure(r, code)
    assert files_in(work) == before


@pytest.mark.parametrize(
    ("shape", "classes", "message"),
    [
        ("1,4,4", "10", "the model takes inputs of shape [1, 4, 4], the data has [1, 8, 8]"),
        ("1,8,8", "3", "the model has 3 classes, the data 10"),
    ],
)
def test_checkpoint_that_does_not_fit_the_partition(
    work: Path, run_cli: Run, shape: str, classes: str, message: str
) -> None:
    r = run_cli("init", "--input-shape", shape, "--num-classes", classes, "--out", "m.st", "-q")
    assert r.code == 0
    before = files_in(work)
    r = run_cli(*TRAIN, "--model", "m.st", "--out", "r")
    assert clean_failure(r, 3) == f"Error: p.json: {message}"
    assert files_in(work) == before
    r = run_cli("evaluate", "--partition", "p.json", "m.st")
    assert clean_failure(r, 3) == f"Error: p.json: {message}"


@pytest.mark.parametrize("target", ["init.safetensors", "r1/client-003.safetensors"])
def test_truncated_checkpoint(work: Path, run_cli: Run, target: str) -> None:
    path = work / target
    path.write_bytes(path.read_bytes()[:-100])
    truncated = path.read_bytes()
    before = files_in(work)
    model = "init.safetensors" if target == "init.safetensors" else "r1"
    r = run_cli(*TRAIN, "--model", model, "--out", "r2")
    line = clean_failure(r, 3)
    assert line.startswith(f"Error: {target}: not a readable safetensors file")
    assert files_in(work) == before and path.read_bytes() == truncated
    r = run_cli("evaluate", "--partition", "p.json", model)
    assert clean_failure(r, 3) == line


def test_changed_checkpoint_under_a_manifest(work: Path, run_cli: Run) -> None:
    shutil.copy(work / "r1" / "client-000.safetensors", work / "r1" / "client-001.safetensors")
    r = run_cli(*TRAIN, "--model", "r1/train-round.json", "--out", "r2")
    line = clean_failure(r, 3)
    assert "client-001.safetensors: sha256 differs from the one r1/train-round.json" in line
    assert not (work / "r2").exists()


def test_missing_client_checkpoint(work: Path, run_cli: Run) -> None:
    r = run_cli(*TRAIN, "--model", "r1/client-001.safetensors", "--client", "2",
                "--out", "c.safetensors")  # fmt: skip
    assert "no checkpoint for client 2 (the models given cover clients [1])" in (
        clean_failure(r, 3)
    )
    assert not (work / "c.safetensors").exists()


@pytest.mark.parametrize("existing", ["r1/train-round.json", "r1/client-002.safetensors"])
def test_existing_output_is_refused_without_force(work: Path, run_cli: Run, existing: str) -> None:
    shutil.rmtree(work / "r1")
    (work / "r1").mkdir()
    (work / existing).write_text("keep me\n")
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--out", "r1")
    line = clean_failure(r, 4)
    assert line == f"Error: {existing} exists; pass --force to replace it or choose another --out"
    assert (work / existing).read_text() == "keep me\n"
    assert files_in(work / "r1") == [existing.split("/")[1]]
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--out", "r1", "--force", "-q")
    assert r.code == 0
    assert len(files_in(work / "r1")) == 5


def test_single_client_output_exists(work: Path, run_cli: Run) -> None:
    (work / "c.json").write_text("keep\n")
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "0", "--out", "c.safetensors")
    assert "c.json exists" in clean_failure(r, 4)
    assert not (work / "c.safetensors").exists() and (work / "c.json").read_text() == "keep\n"


def test_all_clients_into_a_safetensors_path_is_a_usage_error(work: Path, run_cli: Run) -> None:
    before = files_in(work)
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "all", "--out", "x.safetensors")
    assert "--out x.safetensors" in clean_failure(r, 2)
    assert files_in(work) == before


def test_all_clients_into_an_existing_file(work: Path, run_cli: Run) -> None:
    """--out names a file that exists (e.g. an earlier single-client checkpoint)."""
    (work / "x.safetensors").write_text("keep\n")
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "all", "--out", "x.safetensors")
    assert "several clients write one checkpoint each into a folder" in clean_failure(r, 2)
    assert (work / "x.safetensors").read_text() == "keep\n"


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_streams_and_out(work: Path, run_cli: Run) -> None:
    r = run_cli("evaluate", "--partition", "p.json", "r1/train-round.json")
    assert r.code == 0 and "evaluation (accuracy %)" in r.err
    pretty = json.loads(r.out)
    r = run_cli("evaluate", "--partition", "p.json", "r1/train-round.json", "--json", "-q")
    assert (r.code, r.err) == (0, "") and r.out.count("\n") == 1
    assert json.loads(r.out) == pretty
    r = run_cli("evaluate", "--partition", "p.json", "r1", "--out", "e.json", "-q")
    assert (r.code, r.out) == (0, "e.json\n")
    assert json.loads((work / "e.json").read_text()) == pretty
    r = run_cli("evaluate", "--partition", "p.json", "r1", "--out", "e.json", "-q")
    assert "e.json exists" in clean_failure(r, 4)


def test_evaluate_report(work: Path, run_cli: Run) -> None:
    r = run_cli("evaluate", "--partition", "p.json", "r1", "--json", "-q")
    report = json.loads(r.out)
    assert report["kind"] == "evaluation" and report.keys() >= EVAL_KEYS
    part = json.loads((work / "p.json").read_text())
    rows = report["clients"]
    assert [row["local_n"] for row in rows] == [c["num_test"] for c in part["clients"]]
    accs = [row["local_acc"] for row in rows]
    assert report["mean_local_acc"] == pytest.approx(sum(accs) / 4, abs=1e-6)
    assert report["worst_local_acc"] == min(accs)
    assert report["mean_global_acc"] == pytest.approx(
        sum(row["global_acc"] for row in rows) / 4, abs=1e-6
    )
    assert all(0.0 <= a <= 1.0 for a in accs)


def test_evaluate_a_global_model_as_every_client(work: Path, run_cli: Run) -> None:
    r = run_cli("evaluate", "--partition", "p.json", "init.safetensors", "--json", "-q")
    report = json.loads(r.out)
    assert [row["id"] for row in report["clients"]] == [0, 1, 2, 3]
    assert len({row["global_acc"] for row in report["clients"]}) == 1  # one model


def test_evaluate_a_subset_of_clients(work: Path, run_cli: Run) -> None:
    r = run_cli("evaluate", "--partition", "p.json", "r1/client-001.safetensors",
                "r1/client-003.safetensors", "--json", "-q")  # fmt: skip
    assert r.code == 0
    assert [row["id"] for row in json.loads(r.out)["clients"]] == [1, 3]


def test_evaluate_client_outside_the_partition(work: Path, run_cli: Run) -> None:
    r = run_cli("partition", "--dataset", "digits-rot", "--clients", "2", "--scheme", "iid",
                "--out", "p2.json", "-q")  # fmt: skip
    assert r.code == 0
    r = run_cli("evaluate", "--partition", "p2.json", "r1")
    line = clean_failure(r, 3)
    assert line == "Error: checkpoint for client 2 but the partition has clients 0..1"
