"""``fedmoe affinity | fedmoe plan-sync - | fedmoe aggregate --plan -`` on real ``train-round``
checkpoints of the built-in dataset: Eq. 11 against the input checkpoints, the golden plan of a
hand-made affinity artefact, the ledger against real tensor sizes, the refresh interval, the
baselines, and the error paths (exit code, one ``Error:`` line, nothing written)."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import clean_failure, run_in

from fedmoe import __version__
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import CheckpointMeta, open_checkpoint, save_checkpoint
from fedmoe.io.manifest import sha256_bytes, sha256_file
from fedmoe.model import MoEConfig, init_model, state_of
from fedmoe.plan import tensor_sizes

Run = Callable[..., Any]
State = dict[str, torch.Tensor]

GOLDEN = Path(__file__).parent / "golden" / "plan_sync_hand.json"
CLIENTS = (0, 1, 2, 3)
PARTITION = (
    "partition", "--dataset", "digits-rot", "--clients", "4", "--scheme", "domain",
    "--alpha", "0.5", "--seed", "7", "--out", "p.json", "-q",
)  # fmt: skip
INIT = (
    "init", "--partition", "p.json", "--experts", "4", "--embed-dim", "8", "--expert-hidden", "8",
    "--embed-hidden", "8", "--seed", "1", "-q",
)  # fmt: skip
TRAIN = (
    "train-round", "--partition", "p.json", "--epochs", "1", "--batch-size", "64",
    "--workers", "1", "-q",
)  # fmt: skip


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (temp files included), relative and sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """p.json, init.safetensors and round 1 (r1/) of 4 clients with a tiny model, made once."""
    folder = tmp_path_factory.mktemp("agg-base")
    run_in(folder, PARTITION, INIT, (*TRAIN, "--model", "init.safetensors", "--out", "r1"))
    return folder


@pytest.fixture
def work(base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the base run, as the working folder."""
    target = tmp_path / "w"
    shutil.copytree(base_run, target)
    monkeypatch.chdir(target)
    return target


@pytest.fixture
def pipe(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Feed ``text`` to the next command's stdin (what ``|`` does in a shell)."""

    def feed(text: str) -> None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))

    return feed


def inputs(work: Path) -> dict[int, State]:
    return {
        c: open_checkpoint(work / "r1" / f"client-{c:03d}.safetensors").state() for c in CLIENTS
    }


def samples(work: Path) -> dict[int, int]:
    return {
        c: open_checkpoint(work / "r1" / f"client-{c:03d}.safetensors").meta.num_samples
        for c in CLIENTS
    }


def outputs(folder: Path) -> dict[int, State]:
    return {c: open_checkpoint(folder / f"client-{c:03d}.safetensors").state() for c in CLIENTS}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == torch.float32 and torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6)


def pipeline(run_cli: Run, pipe: Callable[[str], None], *plan_args: str) -> tuple[str, str, Any]:
    """affinity → plan-sync → aggregate, each reading the previous one's stdout."""
    r = run_cli("affinity", "r1/train-round.json", "--candidates", "6", "-q")
    assert r.code == 0 and r.err == "", r.err
    affinity = r.out
    pipe(affinity)
    r = run_cli("plan-sync", "-", "--tau", "0.1", *plan_args, "-q")
    assert r.code == 0 and r.err == "", r.err
    plan = r.out
    pipe(plan)
    r = run_cli("aggregate", "--plan", "-", "r1", "--out", "agg")
    return affinity, plan, r


def check_eq11(work: Path, folder: Path, plan: dict[str, Any]) -> None:
    """Every output expert is Σ a θ over the plan's sources (float64 by hand, to 1e-6); the
    embedding is the sample-weighted average; the gate is each client's own (per-client plan)."""
    x, out, n = inputs(work), outputs(folder), samples(work)
    total = sum(n.values())
    for target in plan["targets"]:
        c, j = target["client"], target["expert"]
        for name in ("experts.w1", "experts.b1", "experts.w2", "experts.b2"):
            expected = sum(
                s["weight"] * x[s["client"]][name][s["expert"]].double() for s in target["sources"]
            )
            assert close(out[c][name][j], expected), (c, j, name)
    for c in CLIENTS:
        for name in out[c]:
            if name.startswith("embed."):
                expected = sum(n[k] / total * x[k][name].double() for k in CLIENTS)
                assert close(out[c][name], expected), name
        if plan["gate"] == "per-client":
            assert torch.equal(out[c]["gate.weight"], x[c]["gate.weight"])


# ---------------------------------------------------------------------------------------------
# the pipeline


def test_pipeline_through_stdin(work: Path, run_cli: Run, pipe: Callable[[str], None]) -> None:
    affinity, plan_text, r = pipeline(run_cli, pipe, "--top-p", "2")
    assert (r.code, r.out) == (0, "agg/aggregate.json\n"), r.err
    aff, plan = json.loads(affinity), json.loads(plan_text)
    assert (aff["kind"], plan["kind"]) == ("affinity", "sync-plan")
    assert aff["clients"] == plan["clients"] == list(CLIENTS) and aff["candidates"] == 6
    assert [i["sha256"] for i in aff["inputs"]] == [
        sha256_file(work / "r1" / f"client-{c:03d}.safetensors") for c in CLIENTS
    ]
    assert plan["affinity"] == {"path": "<stdin>", "sha256": sha256_bytes(affinity.encode())}
    assert plan["round"] == plan["matrix_round"] == 1 and plan["refreshed"] is True
    assert plan["top_p"] == 2
    assert files_in(work / "agg") == [
        "aggregate.json", "client-000.safetensors", "client-001.safetensors",
        "client-002.safetensors", "client-003.safetensors", "server.safetensors",
    ]  # fmt: skip
    manifest = json.loads((work / "agg" / "aggregate.json").read_text())
    assert manifest["kind"] == "aggregate" and manifest["method"] == "fedmoe-da"
    assert manifest["gate"] == "per-client"
    assert manifest["plan"]["path"] == "-"
    assert [e["client"] for e in manifest["checkpoints"]] == list(CLIENTS)
    n = samples(work)
    for entry, src in zip(manifest["checkpoints"], manifest["inputs"], strict=True):
        c = entry["client"]
        assert entry["path"] == f"client-{c:03d}.safetensors"
        assert entry["sha256"] == sha256_file(work / "agg" / entry["path"])
        assert entry["num_samples"] == n[c]
        assert src == {
            "client": c,
            "path": f"../r1/client-{c:03d}.safetensors",
            "sha256": sha256_file(work / "r1" / f"client-{c:03d}.safetensors"),
        }
        ck = open_checkpoint(work / "agg" / entry["path"])
        before = open_checkpoint(work / "r1" / entry["path"])
        assert (ck.meta.client_id, ck.meta.round, ck.meta.num_samples) == (c, 1, n[c])
        assert (ck.meta.method, ck.meta.parent_sha256) == ("fedmoe-da", src["sha256"])
        assert ck.meta.routing == before.meta.routing  # metadata is not dropped by the merge
        merge = json.loads(ck.meta.extra["merge"])
        assert merge["method"] == "fedmoe-da"
        assert merge["sources"] == sorted(s["sha256"] for s in manifest["inputs"])
    check_eq11(work, work / "agg", plan)
    # the server's shared parts: the averaged embedding, the same in every client
    server = load_plain(work / "agg" / "server.safetensors")
    assert manifest["server"]["tensors"] == sorted(server)
    assert all(k.startswith("embed.") for k in server)
    out0 = outputs(work / "agg")[0]
    assert all(torch.equal(server[k], out0[k]) for k in server)
    assert manifest["server"]["sha256"] == sha256_file(work / "agg" / "server.safetensors")


def load_plain(path: Path) -> State:
    """A safetensors file that is not a client checkpoint (server.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def test_plan_invariants_and_ledger_against_real_sizes(
    work: Path, run_cli: Run, pipe: Callable[[str], None]
) -> None:
    _, plan_text, r = pipeline(run_cli, pipe, "--top-p", "3")
    assert r.code == 0, r.err
    plan = json.loads(plan_text)
    # the sizes are the real byte sizes of a checkpoint's tensors
    ck = open_checkpoint(work / "r1" / "client-002.safetensors")
    e = ck.config.num_experts
    nbytes = {n: ck.tensor(n).nbytes for n in ck.names}
    embed = sum(v for k, v in nbytes.items() if k.startswith("embed."))
    gate = sum(v for k, v in nbytes.items() if k.startswith("gate."))
    expert = sum(v for k, v in nbytes.items() if k.startswith("experts.")) // e
    assert expert == sum(ck.expert(n, 3).nbytes for n in ck.names if n.startswith("experts."))
    model = sum(nbytes.values())
    assert plan["sizes"] == {
        "embed": embed,
        "gate": gate,
        "expert": expert,
        "num_experts": e,
        "model": model,
    }
    # every target: itself first, at least P + 1 sources, weights summing to 1
    assert len(plan["targets"]) == 4 * e
    for t in plan["targets"]:
        assert math.isclose(sum(s["weight"] for s in t["sources"]), 1.0, abs_tol=1e-12)
        own = [s for s in t["sources"] if (s["client"], s["expert"]) == (t["client"], t["expert"])]
        assert len(own) == 1 and own[0]["similarity"] == 1.0  # itself, at the top
        assert len(t["sources"]) >= 4
        sims = [s["similarity"] for s in t["sources"]]
        assert sims == sorted(sims, reverse=True)
    # transfers: each remote source once per (sender, receiver); bytes = count × expert bytes
    needed: dict[tuple[int, int], set[int]] = {}
    for t in plan["targets"]:
        for s in t["sources"]:
            if s["client"] != t["client"]:
                needed.setdefault((s["client"], t["client"]), set()).add(s["expert"])
    assert plan["transfers"] == [
        {"from": a, "to": b, "experts": sorted(x), "bytes": len(x) * expert}
        for (a, b), x in sorted(needed.items())
    ]
    p2p = sum(len(x) for x in needed.values()) * expert
    per_client = {
        c: len(json.dumps([t for t in plan["targets"] if t["client"] == c],
                          separators=(",", ":")).encode())
        for c in CLIENTS
    }  # fmt: skip
    server_total = 4 * (embed + gate) + 4 * embed + sum(per_client.values())
    assert plan["ledger"] == {
        "clients": 4,
        "server_up": 4 * (embed + gate),
        "server_down": 4 * embed,  # per-client gate: only the embedding comes back
        "plan_down": sum(per_client.values()),
        "server_total": server_total,
        "p2p": p2p,
        "max_client_p2p_in": max(
            sum(len(x) for (a, b), x in needed.items() if b == c) * expert for c in CLIENTS
        ),
        "fedavg_equivalent": 2 * 4 * model,
        "server_vs_fedavg": round(server_total / (8 * model), 6),
        "total_vs_fedavg": round((server_total + p2p) / (8 * model), 6),
    }


def test_shared_gate_plan(work: Path, run_cli: Run, pipe: Callable[[str], None]) -> None:
    _, plan_text, r = pipeline(run_cli, pipe, "--top-p", "1", "--gate", "shared")
    assert r.code == 0, r.err
    plan = json.loads(plan_text)
    assert plan["gate"] == "shared"
    assert plan["ledger"]["server_down"] == 4 * (plan["sizes"]["embed"] + plan["sizes"]["gate"])
    manifest = json.loads((work / "agg" / "aggregate.json").read_text())
    assert manifest["gate"] == "shared"
    x, out, n = inputs(work), outputs(work / "agg"), samples(work)
    total = sum(n.values())
    expected = sum(n[k] / total * x[k]["gate.weight"].double() for k in CLIENTS)
    assert all(close(out[c]["gate.weight"], expected) for c in CLIENTS)
    assert "gate.weight" in load_plain(work / "agg" / "server.safetensors")
    check_eq11(work, work / "agg", plan)


def test_eq11_with_other_expert_indices_and_own_experts(
    work: Path, run_cli: Run, pipe: Callable[[str], None]
) -> None:
    """A plan edited by hand so that targets draw on other expert indices, on the client's own
    other experts, and not on themselves at all."""
    _, plan_text, _ = pipeline(run_cli, pipe, "--top-p", "1")
    plan = json.loads(plan_text)
    edits = {
        (0, 0): [(0, 0, 0.5), (2, 3, 0.3), (0, 2, 0.2)],
        (1, 2): [(1, 0, 0.625), (3, 1, 0.375)],  # not itself
        (3, 3): [(3, 3, 0.1), (0, 1, 0.2), (1, 1, 0.3), (2, 0, 0.4)],
    }
    for t in plan["targets"]:
        if (t["client"], t["expert"]) in edits:
            t["sources"] = [
                {"client": c, "expert": j, "weight": w, "similarity": None}
                for c, j, w in edits[(t["client"], t["expert"])]
            ]
    (work / "plan.json").write_text(json.dumps(plan))
    r = run_cli("aggregate", "--plan", "plan.json", "r1/train-round.json", "--out", "agg2", "-q")
    assert (r.code, r.out) == (0, "agg2/aggregate.json\n"), r.err
    check_eq11(work, work / "agg2", plan)
    x, out = inputs(work), outputs(work / "agg2")
    hand = 0.625 * x[1]["experts.w2"][0].double() + 0.375 * x[3]["experts.w2"][1].double()
    assert close(out[1]["experts.w2"][2], hand)
    manifest = json.loads((work / "agg2" / "aggregate.json").read_text())
    assert manifest["plan"] == {"path": "../plan.json", "sha256": sha256_file(work / "plan.json")}
    for entry in manifest["checkpoints"]:
        ck = open_checkpoint(work / "agg2" / entry["path"])
        assert json.loads(ck.meta.extra["merge"])["plan_sha256"] == sha256_file(work / "plan.json")


def test_client_order_on_the_command_line_changes_nothing(
    work: Path, run_cli: Run, pipe: Callable[[str], None]
) -> None:
    _, plan_text, r = pipeline(run_cli, pipe, "--top-p", "2")
    assert r.code == 0
    (work / "plan.json").write_text(plan_text)
    files = [f"r1/client-{c:03d}.safetensors" for c in (2, 0, 3, 1)]
    r = run_cli("aggregate", "--plan", "plan.json", *files, "--out", "shuffled", "-q")
    assert r.code == 0, r.err
    for c in CLIENTS:
        name = f"client-{c:03d}.safetensors"
        a, b = outputs(work / "agg")[c], outputs(work / "shuffled")[c]
        assert all(torch.equal(a[k], b[k]) for k in a)
        meta_a = open_checkpoint(work / "agg" / name).meta
        meta_b = open_checkpoint(work / "shuffled" / name).meta
        assert (
            (meta_a.client_id, meta_a.routing)
            == (meta_b.client_id, meta_b.routing)
            == (
                c,
                meta_a.routing,
            )
        )
    manifest = json.loads((work / "shuffled" / "aggregate.json").read_text())
    assert [e["client"] for e in manifest["checkpoints"]] == list(CLIENTS)
    assert [e["client"] for e in manifest["inputs"]] == list(CLIENTS)


def test_aggregate_output_feeds_the_next_round(
    work: Path, run_cli: Run, pipe: Callable[[str], None]
) -> None:
    _, _, r = pipeline(run_cli, pipe, "--top-p", "2")
    assert r.code == 0
    r = run_cli(*TRAIN, "--model", "agg/aggregate.json", "--out", "r2")
    assert (r.code, r.out) == (0, "r2/train-round.json\n"), r.err
    manifest = json.loads((work / "r2" / "train-round.json").read_text())
    assert manifest["round"] == 2
    assert [i["path"] for i in manifest["inputs"]] == [
        f"../agg/client-{c:03d}.safetensors" for c in CLIENTS
    ]


# ---------------------------------------------------------------------------------------------
# the golden plan of a hand-made affinity artefact

HAND_CONFIG = {
    "input_shape": [4], "num_classes": 2, "embed": "mlp", "embed_hidden": 4, "embed_dim": 2,
    "num_experts": 2, "top_k": 1, "expert_hidden": 3, "gate_bias": False,
}  # fmt: skip
# m = position·E + j over clients (0, 1, 2), E = 2; rows sorted by decreasing similarity
HAND_ROWS = [
    [[0, 1.0], [3, 0.75], [5, 0.75], [1, 0.5]],
    [[1, 1.0], [0, 0.5], [3, 0.5], [2, 0.25]],
    [[2, 1.0], [4, 0.75], [1, 0.25], [0, 0.0]],
    [[3, 1.0], [0, 0.75], [1, 0.5], [5, 0.25]],
    [[4, 1.0], [2, 0.75], [3, 0.0], [5, -0.5]],
    [[5, 1.0], [0, 0.75], [3, 0.5], [1, 0.0]],
]
# the config's tensors: embed 4·4+4 + 4·2+2 = 30 values, gate 2·2 = 4, experts
# 2·(4·... ) = w1 2·2·3 + b1 2·3 + w2 2·3·2 + b2 2·2 = 34 values; 4 bytes each
HAND_SIZES = {"embed": 120, "gate": 16, "expert": 68, "num_experts": 2, "model": 272}


def hand_affinity() -> dict[str, Any]:
    """A fresh copy of the hand-made artefact (tests edit it)."""
    return copy.deepcopy(
        {
            "schema_version": 1,
            "kind": "affinity",
            "fedmoe_version": __version__,
            "round": 3,
            "candidates": 4,
            "model_config": HAND_CONFIG,
            "sizes": HAND_SIZES,
            "inputs": [],
            "clients": [0, 1, 2],
            "num_experts": 2,
            "neighbours": HAND_ROWS,
            "expert_domain": {"names": ["a", "b"], "shares": [[1.0, 0.0]] * 6},
            "expert_label": {"names": ["0", "1"], "shares": [[0.5, 0.5]] * 6},
        }
    )


def test_hand_sizes_are_the_configs() -> None:
    sizes = tensor_sizes(MoEConfig.from_dict(HAND_CONFIG))
    assert {**sizes.__dict__, "model": sizes.model} == HAND_SIZES


def test_golden_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run) -> None:
    """The on-disk plan, byte for byte. Regenerate with ``FEDMOE_UPDATE_GOLDEN=1``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--tau", "0.25", "--out", "plan.json")
    assert (r.code, r.out) == (0, "plan.json\n"), r.err
    text = (tmp_path / "plan.json").read_text(encoding="utf-8")
    if os.environ.get("FEDMOE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    golden = GOLDEN.read_text(encoding="utf-8")
    old = json.dumps(json.loads(golden)["fedmoe_version"])  # a release bump alone is no change
    text = text.replace(f'"fedmoe_version": {json.dumps(__version__)}', f'"fedmoe_version": {old}')
    assert text == golden
    # through a pipe, the same plan on stdout (only the affinity's path differs)
    monkeypatch.setattr(sys, "stdin", io.StringIO((tmp_path / "aff.json").read_text()))
    r = run_cli("plan-sync", "-", "--top-p", "2", "--tau", "0.25", "-q")
    assert r.code == 0
    piped, written = json.loads(r.out), json.loads(text)
    assert piped.pop("affinity")["path"] == "<stdin>"
    assert written.pop("affinity")["path"] == "aff.json"
    assert piped == written


def test_golden_plan_content() -> None:
    """What the golden plan records, checked by hand (Eq. 9–10 with P = 2, τ = 1/4)."""
    plan = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert (plan["kind"], plan["schema_version"]) == ("sync-plan", 1)
    assert plan["round"] == plan["matrix_round"] == 3 and plan["refreshed"] is True
    assert (plan["top_p"], plan["tau"], plan["gate"]) == (2, 0.25, "per-client")
    assert plan["affinity"]["path"] == "aff.json" and len(plan["affinity"]["sha256"]) == 64
    assert plan["model_config"] == HAND_CONFIG and plan["sizes"] == HAND_SIZES
    kept = [[0, 3, 5], [1, 0, 3], [2, 4, 1], [3, 0, 1], [4, 2, 3], [5, 0, 3]]
    for m, t in enumerate(plan["targets"]):
        assert (t["client"], t["expert"]) == divmod(m, 2)
        assert [s["client"] * 2 + s["expert"] for s in t["sources"]] == kept[m]
        sims = dict((c, v) for c, v in HAND_ROWS[m])
        expo = [math.exp(sims[k] / 0.25) for k in kept[m]]
        for s, x in zip(t["sources"], expo, strict=True):
            assert s["weight"] == pytest.approx(x / sum(expo), abs=1e-12)
            assert s["similarity"] == sims[s["client"] * 2 + s["expert"]]
    assert plan["transfers"] == [
        {"from": 0, "to": 1, "experts": [0, 1], "bytes": 136},
        {"from": 0, "to": 2, "experts": [0], "bytes": 68},
        {"from": 1, "to": 0, "experts": [1], "bytes": 68},
        {"from": 1, "to": 2, "experts": [0, 1], "bytes": 136},
        {"from": 2, "to": 0, "experts": [1], "bytes": 68},
        {"from": 2, "to": 1, "experts": [0], "bytes": 68},
    ]
    led = plan["ledger"]
    assert (led["server_up"], led["server_down"], led["p2p"]) == (3 * 136, 3 * 120, 8 * 68)
    assert (led["max_client_p2p_in"], led["fedavg_equivalent"]) == (3 * 68, 2 * 3 * 272)
    rows = {c: [t for t in plan["targets"] if t["client"] == c] for c in (0, 1, 2)}
    assert led["plan_down"] == sum(
        len(json.dumps(r, separators=(",", ":")).encode()) for r in rows.values()
    )


def test_plan_sync_json_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "1", "--out", "p.json", "--json", "-q")
    assert r.code == 0 and r.out.count("\n") == 1
    payload = json.loads(r.out)
    plan = json.loads((tmp_path / "p.json").read_text())
    assert payload == {
        "ok": True,
        "path": "p.json",
        "sha256": sha256_file(tmp_path / "p.json"),
        "ledger": plan["ledger"],
    }
    r = run_cli("plan-sync", "aff.json", "--top-p", "1", "--out", "p.json")
    assert "p.json exists" in clean_failure(r, 4)
    r = run_cli("plan-sync", "aff.json", "--top-p", "4", "--out", "q.json")
    assert "--top-p 4 needs 5 candidates per row but the affinity kept 4" in clean_failure(r, 2)
    r = run_cli("plan-sync", "aff.json", "--tau", "0", "--out", "q.json")
    assert "--tau must be > 0" in clean_failure(r, 2)
    r = run_cli("plan-sync", "aff.json", "--gate", "both", "--out", "q.json")
    assert "--gate must be one of per-client, shared" in clean_failure(r, 2)
    assert not (tmp_path / "q.json").exists()


def test_plan_records_the_affinity_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "p.json", "-q")
    assert r.code == 0, r.err
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["affinity"]["path"] == "aff.json"
    assert plan["affinity"]["sha256"] == sha256_file(tmp_path / "aff.json")


def test_plan_from_stdin_keeps_its_sha256(
    work: Path, run_cli: Run, pipe: Callable[[str], None]
) -> None:
    from fedmoe.io.manifest import sha256_bytes

    _, plan_text, r = pipeline(run_cli, pipe, "--top-p", "2")
    assert r.code == 0
    manifest = json.loads((work / "agg" / "aggregate.json").read_text())
    assert manifest["plan"]["sha256"] == sha256_bytes(plan_text.encode())


@pytest.mark.parametrize(
    ("what", "edit"),
    [
        ("affinity", lambda m: m.__setitem__("sizes", {})),
        ("affinity", lambda m: m["neighbours"][0].__setitem__(0, ["x", 1.0])),
        ("affinity", lambda m: m["neighbours"][0].__setitem__(0, [0, "abc"])),
        ("affinity", lambda m: m["model_config"].__setitem__("num_experts", 0)),
        ("previous", lambda m: m.pop("matrix_round")),
        ("previous", lambda m: m.pop("model_config")),
    ],
    ids=[
        "no-sizes",
        "bad-column",
        "bad-similarity",
        "bad-config",
        "no-matrix-round",
        "no-model-config",
    ],
)
def test_malformed_manifests_are_invalid_input(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Run,
    what: str,
    edit: Callable[[dict[str, Any]], Any],
) -> None:
    monkeypatch.chdir(tmp_path)
    aff = hand_affinity()
    if what == "affinity":
        edit(aff)
        (tmp_path / "aff.json").write_text(json.dumps(aff))
        r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "p.json")
    else:
        (tmp_path / "aff.json").write_text(json.dumps(aff))
        assert run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "p.json", "-q").code == 0
        plan = json.loads((tmp_path / "p.json").read_text())
        edit(plan)
        (tmp_path / "p.json").write_text(json.dumps(plan))
        r = run_cli("plan-sync", "--previous-plan", "p.json", "--refresh-interval", "2",
                    "--out", "q.json")  # fmt: skip
    clean_failure(r, 3)
    assert not (tmp_path / "q.json").exists()


# ---------------------------------------------------------------------------------------------
# the refresh interval


def test_refresh_interval_reuses_then_recomputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--tau", "0.25", "--round", "1",
                "--refresh-interval", "3", "--out", "plan1.json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    plan1 = json.loads((tmp_path / "plan1.json").read_text())
    # rounds 2 and 3: within the interval, reused (its own P and τ, whatever is asked now)
    for rnd in ("2", "3"):
        r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", rnd, "--top-p", "1",
                    "--tau", "9", "--refresh-interval", "3", "--out", f"plan{rnd}.json")  # fmt: skip
        assert r.code == 0, r.err
        assert "reused from round" in r.err  # the table on stderr says so
        plan = json.loads((tmp_path / f"plan{rnd}.json").read_text())
        assert (plan["round"], plan["matrix_round"], plan["refreshed"]) == (int(rnd), 1, False)
        assert (plan["top_p"], plan["tau"], plan["affinity"]) == (2, 0.25, None)
        assert plan["targets"] == plan1["targets"]
        assert plan["transfers"] == plan1["transfers"] and plan["ledger"] == plan1["ledger"]
    # no --round: the round after the previous plan's
    r = run_cli("plan-sync", "--previous-plan", "plan2.json", "--refresh-interval", "3", "-q")
    assert r.code == 0 and json.loads(r.out)["round"] == 3 and not json.loads(r.out)["refreshed"]
    # round 4: outside the interval, the matrix must be recomputed from an affinity artefact
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", "4",
                "--refresh-interval", "3", "--out", "plan4.json")  # fmt: skip
    assert "an affinity artefact is needed to compute the matrix this round" in clean_failure(r, 2)
    assert not (tmp_path / "plan4.json").exists()
    r = run_cli("plan-sync", "aff.json", "--previous-plan", "plan1.json", "--round", "4",
                "--top-p", "1", "--refresh-interval", "3", "--out", "plan4.json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    plan4 = json.loads((tmp_path / "plan4.json").read_text())
    assert plan4["round"] == plan4["matrix_round"] == 4
    assert plan4["refreshed"] is True and plan4["top_p"] == 1
    assert [len(t["sources"]) for t in plan4["targets"]] == [3, 3, 2, 2, 2, 2]  # P = 1, ties
    assert plan4["targets"] != plan1["targets"]
    # interval 1 (the default): never reused
    r = run_cli("plan-sync", "aff.json", "--previous-plan", "plan1.json", "--round", "2",
                "--top-p", "2", "-q")  # fmt: skip
    assert r.code == 0, r.err
    assert json.loads(r.out)["refreshed"] is True and json.loads(r.out)["matrix_round"] == 2
    r = run_cli("plan-sync", "aff.json", "--refresh-interval", "0")
    assert "--refresh-interval must be >= 1" in clean_failure(r, 2)


def test_reused_plan_aggregates_like_the_original(
    work: Path, run_cli: Run, pipe: Callable[[str], None]
) -> None:
    r = run_cli("affinity", "r1", "--candidates", "4", "--out", "aff.json", "-q")
    assert (r.code, r.out) == (0, "aff.json\n")
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--refresh-interval", "2",
                "--out", "plan1.json", "-q")  # fmt: skip
    assert r.code == 0
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--refresh-interval", "2",
                "--out", "plan2.json", "-q")  # fmt: skip
    assert r.code == 0
    assert json.loads((work / "plan2.json").read_text())["refreshed"] is False
    for p in ("plan1", "plan2"):
        r = run_cli("aggregate", "--plan", f"{p}.json", "r1", "--out", p, "-q")
        assert r.code == 0, r.err
    a, b = outputs(work / "plan1"), outputs(work / "plan2")
    assert all(torch.equal(a[c][k], b[c][k]) for c in CLIENTS for k in a[c])


# ---------------------------------------------------------------------------------------------
# the baselines


@pytest.mark.parametrize("method", ["fedavg", "naive-moe", "local", "oracle-domain"])
def test_baselines(work: Path, run_cli: Run, method: str) -> None:
    r = run_cli("aggregate", "--method", method, "--partition", "p.json", "r1/train-round.json",
                "--out", method)  # fmt: skip
    assert (r.code, r.out) == (0, f"{method}/aggregate.json\n"), r.err
    manifest = json.loads((work / method / "aggregate.json").read_text())
    assert (manifest["method"], manifest["plan"]) == (method, None)
    x, out, n = inputs(work), outputs(work / method), samples(work)
    routing = {
        c: open_checkpoint(work / "r1" / f"client-{c:03d}.safetensors").meta.routing
        for c in CLIENTS
    }

    def avg(name: str, w: dict[int, float]) -> torch.Tensor:
        total = sum(w.values())
        if total == 0:  # an expert nobody routed to: a plain mean
            w, total = dict.fromkeys(w, 1.0), len(w)
        return sum(w[k] / total * x[k][name].double() for k in w)  # type: ignore[return-value]

    names = list(x[0])
    if method == "local":
        assert manifest["gate"] == "per-client" and manifest["server"] is None
        assert all(torch.equal(out[c][k], x[c][k]) for c in CLIENTS for k in names)
    elif method == "fedavg":
        assert manifest["gate"] == "shared"
        for k in names:
            assert all(close(out[c][k], avg(k, n)) for c in CLIENTS), k
    elif method == "naive-moe":
        for k in names:
            if k.startswith("experts."):
                for j in range(4):
                    load = {c: routing[c]["topk_count"][j] for c in CLIENTS}
                    assert all(close(out[c][k][j], avg(k, load)[j]) for c in CLIENTS), (k, j)
            else:
                assert all(close(out[c][k], avg(k, n)) for c in CLIENTS), k
    else:  # oracle-domain: groups are the clients' dominant true domains
        part = json.loads((work / "p.json").read_text())
        dom = [c["domain_counts"] for c in part["clients"]]
        group = {c: max(range(len(dom[c])), key=lambda d: dom[c][d]) for c in CLIENTS}
        for c in CLIENTS:
            members = {k: n[k] for k in CLIENTS if group[k] == group[c]}
            assert all(close(out[c][k], avg(k, members)) for k in names), c
    for entry in manifest["checkpoints"]:
        ck = open_checkpoint(work / method / entry["path"])
        assert ck.meta.method == method and entry["sha256"] == sha256_file(ck.path)


def test_oracle_needs_the_partition(work: Path, run_cli: Run) -> None:
    r = run_cli("aggregate", "--method", "oracle-domain", "r1", "--out", "o")
    assert "oracle-domain needs each client's true domain group" in clean_failure(r, 2)
    assert not (work / "o").exists()


# ---------------------------------------------------------------------------------------------
# errors: exit code, one line, nothing written


def make_plan(work: Path, run_cli: Run) -> dict[str, Any]:
    assert run_cli("affinity", "r1", "--candidates", "4", "--out", "aff.json", "-q").code == 0
    assert run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "plan.json", "-q").code == 0
    return json.loads((work / "plan.json").read_text())


def test_plan_whose_weights_do_not_sum_to_one(work: Path, run_cli: Run) -> None:
    plan = make_plan(work, run_cli)
    plan["targets"][5]["sources"][0]["weight"] += 0.01
    (work / "bad.json").write_text(json.dumps(plan))
    before = files_in(work)
    r = run_cli("aggregate", "--plan", "bad.json", "r1", "--out", "agg")
    line = clean_failure(r, 3)
    assert line.startswith("Error: bad.json: weights of target client 1 expert 1 sum to 1.01")
    assert line.endswith(", not 1")
    assert files_in(work) == before and not (work / "agg").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["targets"][0]["sources"].__setitem__(0, {"client": 9, "expert": 0,
                                                                "weight": 1.0}),
         "bad.json: source client 9 expert 0 of target client 0 expert 0 is unknown"),
        (lambda p: p["targets"][0]["sources"].__setitem__(0, {"client": 1, "expert": 4,
                                                                "weight": 1.0}),
         "bad.json: source client 1 expert 4 of target client 0 expert 0 is unknown"),
        (lambda p: p["targets"][3].__setitem__("client", 7),
         "bad.json: target client 7 expert 3 is not in the plan's clients [0, 1, 2, 3]"),
        (lambda p: p["targets"].pop(), "bad.json: no row for target client 3 expert 3"),
        (lambda p: p["targets"][0]["sources"][0].__setitem__("weight", -0.5),
         "bad.json: weight -0.5 of target client 0 expert 0"),
        (lambda p: p.__setitem__("kind", "affinity"),
         "bad.json: is a 'affinity' manifest, expected 'sync-plan'"),
        (lambda p: p["model_config"].__setitem__("embed_dim", 9),
         "the sync plan was made for a different model_config than the checkpoints"),
    ],
    ids=["unknown-client", "unknown-expert", "unknown-target", "missing-row", "negative-weight",
         "wrong-kind", "other-config"],
)  # fmt: skip
def test_bad_plans(
    work: Path, run_cli: Run, edit: Callable[[dict[str, Any]], Any], message: str
) -> None:
    plan = make_plan(work, run_cli)
    edit(plan)
    (work / "bad.json").write_text(json.dumps(plan))
    before = files_in(work)
    r = run_cli("aggregate", "--plan", "bad.json", "r1", "--out", "agg")
    assert message in clean_failure(r, 3)
    assert files_in(work) == before and not (work / "agg").exists()


def test_plan_for_other_clients_than_the_checkpoints(work: Path, run_cli: Run) -> None:
    make_plan(work, run_cli)
    before = files_in(work)
    r = run_cli("aggregate", "--plan", "plan.json", "r1/client-000.safetensors",
                "r1/client-001.safetensors", "r1/client-002.safetensors", "--out", "agg")  # fmt: skip
    line = clean_failure(r, 3)
    assert "the sync plan covers clients [0, 1, 2, 3], the checkpoints [0, 1, 2]" in line
    assert files_in(work) == before


def test_checkpoints_of_different_model_configs(work: Path, run_cli: Run) -> None:
    other = MoEConfig((1, 8, 8), 10, embed_hidden=8, embed_dim=6, num_experts=4, expert_hidden=8)
    with OutputSet() as out:
        save_checkpoint(
            out,
            work / "x" / "client-003.safetensors",
            state_of(init_model(other, 0)),
            CheckpointMeta(other, 3, 1, 50, 0, "train"),
        )
    before = files_in(work)
    args = [f"r1/client-{c:03d}.safetensors" for c in (0, 1, 2)] + ["x/client-003.safetensors"]
    r = run_cli("aggregate", "--method", "fedavg", *args, "--out", "agg")
    line = clean_failure(r, 3)
    assert "x/client-003.safetensors has a different model_config than" in line
    assert files_in(work) == before


@pytest.fixture
def nan_round(work: Path) -> Path:
    """r1 with a NaN in client 2's expert 1 (no manifest: its sha256 would refuse the change)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    (work / "r1" / "train-round.json").unlink()
    path = work / "r1" / "client-002.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state["experts.w1"][1, 0, 0] = float("nan")
    save_file(state, str(path), metadata=meta)
    return path


def test_nan_in_a_checkpoint(work: Path, nan_round: Path, run_cli: Run) -> None:
    before = files_in(work)
    r = run_cli("aggregate", "--method", "naive-moe", "r1", "--out", "agg")
    assert clean_failure(r, 3) == (
        "Error: r1/client-002.safetensors: tensor experts.w1 expert 1 contains NaN or Inf"
    )
    assert files_in(work) == before  # no checkpoint, no manifest, no temp file
    r = run_cli("affinity", "r1", "--candidates", "4", "--out", "aff.json", "-q")
    assert r.code == 0  # the gate is finite: affinity reads only gates
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "plan.json", "-q")
    assert r.code == 0
    r = run_cli("aggregate", "--plan", "plan.json", "r1", "--out", "agg2")
    line = clean_failure(r, 3)
    assert "r1/client-002.safetensors: tensor experts.w1 expert 1 contains NaN or Inf" in line


def test_failed_aggregate_leaves_no_empty_folder(work: Path, nan_round: Path, run_cli: Run) -> None:
    r = run_cli("aggregate", "--method", "fedavg", "r1", "--out", "agg")
    assert r.code == 3
    assert not (work / "agg").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--plan", "plan.json", "--method", "fedavg"),
         "--plan is the fedmoe-da merge; it cannot be combined with --method fedavg"),
        (("--method", "fedmoe-da"), "fedmoe-da needs --plan PLAN"),
        (("--method", "fedprox"), "federated --method must be one of fedmoe-da, fedavg, naive-moe, "
         "local, oracle-domain, got 'fedprox'"),
        ((), "federated --method must be one of"),
        (("--method", "fedavg", "--weights", "1,1,1,1"), "--weights is for a plain merge"),
        (("--plan", "plan.json", "--gate", "both"), "--gate must be 'per-client' or 'shared'"),
    ],
)  # fmt: skip
def test_usage_errors(work: Path, run_cli: Run, args: tuple[str, ...], message: str) -> None:
    make_plan(work, run_cli)
    before = files_in(work)
    r = run_cli("aggregate", *args, "r1", "--out", "agg")
    assert message in clean_failure(r, 2)
    assert files_in(work) == before


def test_plan_and_checkpoints_cannot_both_come_from_stdin(
    work: Path, run_cli: Run, pipe: Callable[[str], None]
) -> None:
    pipe((work / "r1" / "train-round.json").read_text())
    r = run_cli("aggregate", "--plan", "-", "-", "--out", "agg")
    assert "only one of the plan and the checkpoints can come from stdin" in clean_failure(r, 2)


def test_existing_output_is_refused_without_force(work: Path, run_cli: Run) -> None:
    (work / "agg").mkdir()
    (work / "agg" / "client-002.safetensors").write_text("keep\n")
    r = run_cli("aggregate", "--method", "local", "r1", "--out", "agg")
    assert clean_failure(r, 4) == (
        "Error: agg/client-002.safetensors exists; pass --force to replace it or choose another --out"
    )
    assert files_in(work / "agg") == ["client-002.safetensors"]
    r = run_cli("aggregate", "--method", "local", "r1", "--out", "agg", "--force", "-q")
    assert r.code == 0 and len(files_in(work / "agg")) == 5  # local: no server file


def test_affinity_errors(work: Path, run_cli: Run) -> None:
    r = run_cli("affinity", "r1", "--candidates", "0")
    assert "--candidates must be >= 1" in clean_failure(r, 2)
    r = run_cli("affinity", "init.safetensors")
    line = clean_failure(r, 2)
    assert "init.safetensors is a global model; affinity compares client checkpoints" in line
    shutil.copy(work / "r1" / "client-000.safetensors", work / "r1" / "client-001.safetensors")
    r = run_cli("affinity", "r1/train-round.json")
    assert "client-001.safetensors: sha256 differs" in clean_failure(r, 3)
