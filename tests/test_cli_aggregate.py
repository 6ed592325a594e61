"""``fedmoe affinity | fedmoe plan-sync - | fedmoe aggregate --plan -`` on real ``train-round``
checkpoints of the built-in dataset: Eq. 11 against the input checkpoints (one and two MoE layers),
the golden plan of a hand-made affinity artefact, the ledger against real tensor sizes, the refresh
interval, partial participation (listed clients, clients that sat out, stale uploads), the
baselines and their reduce kinds, schema-1 artefacts, and the error paths (exit code, one
``Error:`` line, nothing on stdout, nothing written, inputs unchanged)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import clean_failure, run_in
from safetensors.torch import load_file

from fedmoe import __version__
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import CheckpointMeta, open_checkpoint, save_checkpoint
from fedmoe.io.manifest import sha256_bytes, sha256_file
from fedmoe.model import MoEConfig, init_model, schema_for, state_of
from fedmoe.model.schema import PartSizes

Run = Callable[..., Any]
Pipe = Callable[[str], None]
State = dict[str, torch.Tensor]

GOLDEN = Path(__file__).parent / "golden" / "plan_sync_hand.json"  # a schema-1 plan (read only)
CLIENTS = (0, 1, 2, 3)
PARTITION = (
    "partition", "--dataset", "digits-rot", "--clients", "4", "--scheme", "domain",
    "--alpha", "0.5", "--seed", "7", "--out", "p.json", "-q",
)  # fmt: skip
INIT = (
    "init", "--partition", "p.json", "--experts", "4", "--embed-dim", "4", "--expert-hidden", "8",
    "--embed-hidden", "8", "--seed", "1", "-q",
)  # fmt: skip
TRAIN = (
    "train-round", "--partition", "p.json", "--epochs", "1", "--batch-size", "64",
    "--workers", "1", "-q",
)  # fmt: skip
EXPERT_PARTS = ("b1", "b2", "w1", "w2")


# ---------------------------------------------------------------------------------------------
# fixtures: tiny federations, built once per module


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """p.json, init.safetensors and round 1 (r1/) of 4 clients with a tiny model, made once."""
    folder = tmp_path_factory.mktemp("agg-base")
    run_in(folder, PARTITION, INIT, (*TRAIN, "--model", "init.safetensors", "--out", "r1"))
    return folder


@pytest.fixture(scope="module")
def partial_run(base_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base run plus two rounds of partial participation: round 1 with clients {0, 2}
    (pr1/, merged into pagg1/ with the initial model for the others), round 2 with clients
    {0, 1, 3} (pr2/, from pagg1/): client 2 sits round 2 out, its round-1 upload is stale."""
    folder = tmp_path_factory.mktemp("agg-partial")
    shutil.copytree(base_run, folder, dirs_exist_ok=True)
    run_in(
        folder,
        (*TRAIN, "--model", "init.safetensors", "--client", "0,2", "--out", "pr1"),
        ("affinity", "pr1/train-round.json", "--candidates", "6", "--out", "paff1.json", "-q"),
        ("plan-sync", "paff1.json", "--participants", "0,2", "--top-p", "2", "--tau", "0.1",
         "--out", "pplan1.json", "-q"),
        ("aggregate", "--plan", "pplan1.json", "pr1/", "--previous", "init.safetensors",
         "--partition", "p.json", "--out", "pagg1", "-q"),
        (*TRAIN, "--model", "pagg1/aggregate.json", "--client", "0,1,3", "--out", "pr2"),
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def multi_run(base_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with two MoE layers (init --moe-layers 2) and its round 1 (m1/), made once."""
    folder = tmp_path_factory.mktemp("agg-multi")
    shutil.copy(base_run / "p.json", folder / "p.json")
    run_in(
        folder,
        (*INIT, "--moe-layers", "2", "--out", "init2.safetensors"),
        (*TRAIN, "--model", "init2.safetensors", "--out", "m1"),
    )
    return folder


def private_copy(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    target = tmp_path / "w"
    shutil.copytree(source, target)
    monkeypatch.chdir(target)
    return target


@pytest.fixture
def work(base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the base run, as the working folder."""
    return private_copy(base_run, tmp_path, monkeypatch)


@pytest.fixture
def partial(partial_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the partial-participation run, as the working folder."""
    return private_copy(partial_run, tmp_path, monkeypatch)


@pytest.fixture
def multi(multi_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the two-layer run, as the working folder."""
    return private_copy(multi_run, tmp_path, monkeypatch)


@pytest.fixture
def pipe(monkeypatch: pytest.MonkeyPatch) -> Pipe:
    """Feed ``text`` to the next command's stdin (what ``|`` does in a shell)."""

    def feed(text: str) -> None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))

    return feed


# ---------------------------------------------------------------------------------------------
# helpers: read outputs with safetensors itself, compute the expectations by hand


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (temp files included), relative and sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes (to prove nothing changed)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def name(c: int) -> str:
    return f"client-{c:03d}.safetensors"


def states(folder: Path, clients: tuple[int, ...] | list[int] = CLIENTS) -> dict[int, State]:
    """Client checkpoints' tensors, read with safetensors."""
    return {c: load_file(str(folder / name(c))) for c in clients}


def samples(folder: Path) -> dict[int, int]:
    """num_samples of each checkpoint a train-round manifest lists."""
    manifest = json.loads((folder / "train-round.json").read_text())
    return {e["client"]: e["num_samples"] for e in manifest["checkpoints"]}


def read(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == torch.float32 and torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6)


def expert_names(state: State, layer: int, num_layers: int) -> list[str]:
    """The stacked expert tensors of MoE layer ``layer`` (the last one is ``experts.*``)."""
    prefix = "experts." if layer == num_layers - 1 else f"blocks.{layer}.experts."
    names = sorted(n for n in state if n.startswith(prefix))
    assert [n.rsplit(".", 1)[1] for n in names] == list(EXPERT_PARTS), names
    return names


def eq11(x: dict[int, State], row: dict[str, Any], tensor: str, present: set[int]) -> torch.Tensor:
    """Σ a θ over ``row``'s sources among ``present``, weights renormalised, in float64."""
    sources = [s for s in row["sources"] if s["client"] in present]
    total = sum(s["weight"] for s in sources)
    return sum(  # type: ignore[return-value]
        s["weight"] / total * x[s["client"]][tensor][s["expert"]].double() for s in sources
    )


def weighted(x: dict[int, State], tensor: str, n: dict[int, int]) -> torch.Tensor:
    total = sum(n.values())
    return sum(n[k] / total * x[k][tensor].double() for k in n)  # type: ignore[return-value]


def check_eq11(x: dict[int, State], out: dict[int, State], plan: dict[str, Any]) -> int:
    """Every participant's output expert, in every MoE layer, is Eq. 11 over the plan's row
    (sources among the participants, renormalised); returns how many experts were checked."""
    present = set(plan["participants"])
    num_layers = len(plan["layers"])
    checked = 0
    for layer in plan["layers"]:
        tensors = expert_names(next(iter(out.values())), layer["layer"], num_layers)
        for row in layer["targets"]:
            c, j = row["client"], row["expert"]
            if c not in present:
                continue
            for t in tensors:
                assert close(out[c][t][j], eq11(x, row, t, present)), (layer["layer"], c, j, t)
            checked += 1
    return checked


def check_shared(x: dict[int, State], out: dict[int, State], n: dict[int, int]) -> None:
    """Every output's embedding is the participants' sample-weighted average (one tensor)."""
    embed = [t for t in next(iter(x.values())) if t.startswith("embed.")]
    assert len(embed) == 4
    first = next(iter(out.values()))
    for t in embed:
        assert close(first[t], weighted(x, t, n)), t
        assert all(torch.equal(o[t], first[t]) for o in out.values()), t


def pipeline(run_cli: Run, pipe: Pipe, *plan_args: str) -> tuple[str, str, Any]:
    """affinity → plan-sync → aggregate on r1, each reading the previous one's stdout."""
    r = run_cli("affinity", "r1/train-round.json", "--candidates", "6", "-q")
    assert r.code == 0 and r.err == "", r.err
    affinity = r.out
    pipe(affinity)
    r = run_cli("plan-sync", "-", "--tau", "0.1", *plan_args, "-q")
    assert r.code == 0 and r.err == "", r.err
    plan = r.out
    pipe(plan)
    r = run_cli("aggregate", "--plan", "-", "r1/train-round.json", "--out", "agg")
    return affinity, plan, r


# ---------------------------------------------------------------------------------------------
# the pipeline on a full round


def test_pipeline_through_stdin(work: Path, run_cli: Run, pipe: Pipe) -> None:
    affinity, plan_text, r = pipeline(run_cli, pipe, "--top-p", "2")
    assert (r.code, r.out) == (0, "agg/aggregate.json\n"), r.err
    aff, plan = json.loads(affinity), json.loads(plan_text)
    assert (aff["kind"], aff["schema_version"]) == ("affinity", 2)
    assert (plan["kind"], plan["schema_version"]) == ("sync-plan", 2)
    assert aff["clients"] == plan["clients"] == plan["participants"] == list(CLIENTS)
    assert aff["candidates"] == 6 and aff["stale"] == [] and aff["round"] == 1
    assert [(i["client"], i["round"], i["stale"]) for i in aff["inputs"]] == [
        (c, 1, False) for c in CLIENTS
    ]
    assert [i["sha256"] for i in aff["inputs"]] == [
        sha256_file(work / "r1" / name(c)) for c in CLIENTS
    ]
    assert [(la["layer"], la["num_experts"], len(la["neighbours"])) for la in aff["layers"]] == [
        (0, 4, 16)
    ]
    assert plan["affinity"] == {"path": "<stdin>", "sha256": sha256_bytes(affinity.encode())}
    assert plan["round"] == plan["matrix_round"] == 1 and plan["refreshed"] is True
    assert plan["merges_experts"] is True and plan["previous_plan"] is None
    assert (plan["top_p"], plan["tau"], plan["gate"]) == (2, 0.1, "per-client")
    assert plan["params"]["top_p"] == 2 and plan["params"]["interval"] == "matrix"
    assert [(la["layer"], la["num_experts"]) for la in plan["layers"]] == [(0, 4)]
    assert {t["layer"] for t in plan["transfers"]} == {0}
    assert files_in(work / "agg") == [
        "aggregate.json",
        name(0),
        name(1),
        name(2),
        name(3),
        "server.safetensors",
    ]
    manifest = read(work / "agg" / "aggregate.json")
    assert manifest["kind"] == "aggregate" and manifest["method"] == "fedmoe-da"
    assert manifest["gate"] == "per-client" and manifest["round"] == 1
    assert manifest["params"] == plan["params"] and manifest["ledger"] == plan["ledger"]
    assert manifest["plan"] == {"path": "-", "sha256": sha256_bytes(plan_text.encode())}
    assert manifest["carried"] == []
    assert [e["client"] for e in manifest["checkpoints"]] == list(CLIENTS)
    n = samples(work / "r1")
    for entry, src in zip(manifest["checkpoints"], manifest["inputs"], strict=True):
        c = entry["client"]
        assert entry == {
            "client": c,
            "path": name(c),
            "sha256": sha256_file(work / "agg" / name(c)),
            "num_samples": n[c],
            "trained": True,
        }
        assert src == {
            "client": c,
            "path": f"../r1/{name(c)}",
            "sha256": sha256_file(work / "r1" / name(c)),
        }
        ck = open_checkpoint(work / "agg" / name(c))
        before = open_checkpoint(work / "r1" / name(c))
        assert (ck.meta.client_id, ck.meta.round, ck.meta.num_samples) == (c, 1, n[c])
        assert (ck.meta.method, ck.meta.parent_sha256) == ("fedmoe-da", src["sha256"])
        assert ck.meta.routing == before.meta.routing  # metadata is not dropped by the merge
        merge = json.loads(ck.meta.extra["merge"])
        assert merge == {
            "method": "fedmoe-da",
            "plan_sha256": sha256_bytes(plan_text.encode()),
            "sources": sorted(s["sha256"] for s in manifest["inputs"]),
        }
    x, out = states(work / "r1"), states(work / "agg")
    assert check_eq11(x, out, plan) == 16
    check_shared(x, out, n)
    assert all(torch.equal(out[c]["gate.weight"], x[c]["gate.weight"]) for c in CLIENTS)
    # the server's shared parts: the averaged embedding, the same in every client
    server = load_file(str(work / "agg" / "server.safetensors"))
    assert manifest["server"]["tensors"] == sorted(server)
    assert sorted(server) == sorted(t for t in x[0] if t.startswith("embed."))
    assert all(torch.equal(server[k], out[0][k]) for k in server)
    assert manifest["server"]["sha256"] == sha256_file(work / "agg" / "server.safetensors")


def test_plan_invariants_and_ledger_against_real_sizes(
    work: Path, run_cli: Run, pipe: Pipe
) -> None:
    _, plan_text, r = pipeline(run_cli, pipe, "--top-p", "3")
    assert r.code == 0, r.err
    plan = json.loads(plan_text)
    # the sizes are the real byte sizes of a checkpoint's tensors
    state = load_file(str(work / "r1" / name(2)))
    nbytes = {k: t.numel() * t.element_size() for k, t in state.items()}
    shared = sum(v for k, v in nbytes.items() if k.startswith("embed."))
    gate = sum(v for k, v in nbytes.items() if k.startswith("gate."))
    expert = sum(state[f"experts.{p}"][3].numel() * 4 for p in EXPERT_PARTS)
    model = sum(nbytes.values())
    assert model == shared + gate + 4 * expert
    values = sum(state[f"experts.{p}"][3].numel() for p in EXPERT_PARTS)
    assert plan["sizes"] == {
        "shared": shared, "gate": gate, "expert": [expert], "num_experts": [4], "model": model,
        "expert_values": [values],
    }  # fmt: skip
    # every target: itself first, at least P + 1 sources, weights summing to 1
    targets = plan["layers"][0]["targets"]
    assert [(t["client"], t["expert"]) for t in targets] == [
        (c, j) for c in CLIENTS for j in range(4)
    ]
    for t in targets:
        assert math.isclose(sum(s["weight"] for s in t["sources"]), 1.0, abs_tol=1e-12)
        own = [s for s in t["sources"] if (s["client"], s["expert"]) == (t["client"], t["expert"])]
        assert len(own) == 1 and own[0]["similarity"] == 1.0  # itself, at the top
        assert len(t["sources"]) >= 4
        sims = [s["similarity"] for s in t["sources"]]
        assert sims == sorted(sims, reverse=True)
    # transfers: each remote source once per (sender, receiver); bytes = count × expert bytes
    needed: dict[tuple[int, int], set[int]] = {}
    for t in targets:
        for s in t["sources"]:
            if s["client"] != t["client"]:
                needed.setdefault((s["client"], t["client"]), set()).add(s["expert"])
    assert plan["transfers"] == [
        {"from": a, "to": b, "layer": 0, "experts": sorted(x), "bytes": len(x) * expert}
        for (a, b), x in sorted(needed.items())
    ]
    p2p = sum(len(x) for x in needed.values()) * expert
    # what the server sends each client: its rows, [layer, expert, source client, source expert,
    # weight] as compact JSON
    plan_down = sum(
        len(json.dumps([[0, t["expert"], s["client"], s["expert"], s["weight"]]
                        for t in targets if t["client"] == c for s in t["sources"]],
                       separators=(",", ":")))
        for c in CLIENTS
    )  # fmt: skip
    server_total = 4 * (shared + gate) + 4 * shared + plan_down
    assert plan["ledger"] == {
        "clients": 4,
        "server_up": 4 * (shared + gate),
        "server_down": 4 * shared,  # per-client gate: only the embedding comes back
        "plan_down": plan_down,
        "server_total": server_total,
        "p2p": p2p,
        "max_client_p2p_in": max(
            sum(len(x) for (a, b), x in needed.items() if b == c) * expert for c in CLIENTS
        ),
        "fedavg_equivalent": 2 * 4 * model,
        "server_vs_fedavg": round(server_total / (8 * model), 6),
        "total_vs_fedavg": round((server_total + p2p) / (8 * model), 6),
    }


def test_shared_gate_plan(work: Path, run_cli: Run, pipe: Pipe) -> None:
    _, plan_text, r = pipeline(run_cli, pipe, "--top-p", "1", "--gate", "shared")
    assert r.code == 0, r.err
    plan = json.loads(plan_text)
    assert plan["gate"] == "shared" and plan["params"]["gate"] == "shared"
    assert plan["ledger"]["server_down"] == 4 * (plan["sizes"]["shared"] + plan["sizes"]["gate"])
    manifest = read(work / "agg" / "aggregate.json")
    assert manifest["gate"] == "shared"
    x, out, n = states(work / "r1"), states(work / "agg"), samples(work / "r1")
    expected = weighted(x, "gate.weight", n)
    assert all(close(out[c]["gate.weight"], expected) for c in CLIENTS)
    assert "gate.weight" in load_file(str(work / "agg" / "server.safetensors"))
    assert check_eq11(x, out, plan) == 16
    check_shared(x, out, n)


def test_eq11_with_other_expert_indices_and_own_experts(
    work: Path, run_cli: Run, pipe: Pipe
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
    for t in plan["layers"][0]["targets"]:
        if (t["client"], t["expert"]) in edits:
            t["sources"] = [
                {"client": c, "expert": j, "weight": w, "similarity": None}
                for c, j, w in edits[(t["client"], t["expert"])]
            ]
    (work / "plan.json").write_text(json.dumps(plan))
    r = run_cli("aggregate", "--plan", "plan.json", "r1/train-round.json", "--out", "agg2", "-q")
    assert (r.code, r.out) == (0, "agg2/aggregate.json\n"), r.err
    x, out = states(work / "r1"), states(work / "agg2")
    assert check_eq11(x, out, plan) == 16
    hand = 0.625 * x[1]["experts.w2"][0].double() + 0.375 * x[3]["experts.w2"][1].double()
    assert close(out[1]["experts.w2"][2], hand)
    manifest = read(work / "agg2" / "aggregate.json")
    assert manifest["plan"] == {"path": "../plan.json", "sha256": sha256_file(work / "plan.json")}
    for entry in manifest["checkpoints"]:
        ck = open_checkpoint(work / "agg2" / entry["path"])
        assert json.loads(ck.meta.extra["merge"])["plan_sha256"] == sha256_file(work / "plan.json")


def test_client_order_on_the_command_line_changes_nothing(
    work: Path, run_cli: Run, pipe: Pipe
) -> None:
    _, plan_text, r = pipeline(run_cli, pipe, "--top-p", "2")
    assert r.code == 0
    (work / "plan.json").write_text(plan_text)
    files = [f"r1/{name(c)}" for c in (2, 0, 3, 1)]
    r = run_cli("aggregate", "--plan", "plan.json", *files, "--out", "shuffled", "-q")
    assert r.code == 0, r.err
    a, b = states(work / "agg"), states(work / "shuffled")
    for c in CLIENTS:
        assert sorted(a[c]) == sorted(b[c]) and all(torch.equal(a[c][k], b[c][k]) for k in a[c])
        meta_a = open_checkpoint(work / "agg" / name(c)).meta
        meta_b = open_checkpoint(work / "shuffled" / name(c)).meta
        assert (meta_a.client_id, meta_a.routing) == (meta_b.client_id, meta_b.routing)
        assert meta_a.client_id == c
    manifest = read(work / "shuffled" / "aggregate.json")
    assert [e["client"] for e in manifest["checkpoints"]] == list(CLIENTS)
    assert [e["client"] for e in manifest["inputs"]] == list(CLIENTS)


def test_aggregate_output_feeds_the_next_round(work: Path, run_cli: Run, pipe: Pipe) -> None:
    _, _, r = pipeline(run_cli, pipe, "--top-p", "2")
    assert r.code == 0
    r = run_cli(*TRAIN, "--model", "agg/aggregate.json", "--out", "r2")
    assert (r.code, r.out) == (0, "r2/train-round.json\n"), r.err
    manifest = read(work / "r2" / "train-round.json")
    assert manifest["round"] == 2
    assert [i["path"] for i in manifest["inputs"]] == [f"../agg/{name(c)}" for c in CLIENTS]
    assert [open_checkpoint(work / "r2" / name(c)).meta.parent_sha256 for c in CLIENTS] == [
        sha256_file(work / "agg" / name(c)) for c in CLIENTS
    ]


# ---------------------------------------------------------------------------------------------
# the golden plan of a hand-made affinity artefact (schema 1, as older fedmoe wrote it)

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
# the config's tensors: embed 4·4+4 + 4·2+2 = 30 values, gate 2·2 = 4, one expert
# w1 2·3 + b1 3 + w2 3·2 + b2 2 = 17 values; 4 bytes each
HAND_SIZES_V1 = {"embed": 120, "gate": 16, "expert": 68, "num_experts": 2, "model": 272}
HAND_SIZES = {"shared": 120, "gate": 16, "expert": [68], "num_experts": [2], "model": 272}
HAND_KEPT = [[0, 3, 5], [1, 0, 3], [2, 4, 1], [3, 0, 1], [4, 2, 3], [5, 0, 3]]  # P = 2, ties


def hand_affinity() -> dict[str, Any]:
    """A fresh copy of the hand-made schema-1 artefact (tests edit it)."""
    return copy.deepcopy(
        {
            "schema_version": 1,
            "kind": "affinity",
            "fedmoe_version": __version__,
            "round": 3,
            "candidates": 4,
            "model_config": HAND_CONFIG,
            "sizes": HAND_SIZES_V1,
            "inputs": [],
            "clients": [0, 1, 2],
            "num_experts": 2,
            "neighbours": HAND_ROWS,
            "expert_domain": {"names": ["a", "b"], "shares": [[1.0, 0.0]] * 6},
            "expert_label": {"names": ["0", "1"], "shares": [[0.5, 0.5]] * 6},
        }
    )


def hand_affinity_v2() -> dict[str, Any]:
    """The same artefact in the schema-2 layout (per-layer ``layers``)."""
    v1 = hand_affinity()
    layer = {k: v1.pop(k) for k in ("num_experts", "neighbours", "expert_domain", "expert_label")}
    return {**v1, "schema_version": 2, "sizes": HAND_SIZES, "stale": [],
            "layers": [{"layer": 0, **layer}]}  # fmt: skip


def test_hand_sizes_are_the_configs() -> None:
    sizes = schema_for(MoEConfig.from_dict(HAND_CONFIG)).sizes()
    assert sizes == PartSizes(120, 16, (68,), (2,), (17,)) and sizes.model == 272
    assert sizes.to_dict() == {**HAND_SIZES, "expert_values": [17]}  # 68 bytes: 17 float32s
    old = dataclasses.replace(sizes, expert_values=())
    assert PartSizes.from_dict(HAND_SIZES_V1) == old  # schema 1's sizes are still read
    assert PartSizes.from_dict(HAND_SIZES) == old  # and schema 2's, without value counts


def test_golden_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run, pipe: Pipe
) -> None:
    """The plan of the hand-made affinity is the golden (schema-1) plan, in the schema-2 layout:
    the same rows, weights and transfers; and the same bytes every time."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--tau", "0.25", "--out", "plan.json")
    assert (r.code, r.out) == (0, "plan.json\n"), r.err
    text = (tmp_path / "plan.json").read_text(encoding="utf-8")
    plan, golden = json.loads(text), json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert golden["schema_version"] == 1 and plan["schema_version"] == 2
    assert plan["layers"] == [{"layer": 0, "num_experts": 2, "targets": golden["targets"]}]
    assert plan["transfers"] == [{**t, "layer": 0} for t in golden["transfers"]]
    for key in ("clients", "server_up", "server_down", "p2p", "max_client_p2p_in",
                "fedavg_equivalent"):  # fmt: skip
        assert plan["ledger"][key] == golden["ledger"][key], key
    for key in ("round", "matrix_round", "refreshed", "top_p", "tau", "refresh_interval", "gate",
                "clients"):  # fmt: skip
        assert plan[key] == golden[key], key
    assert plan["participants"] == [0, 1, 2] and plan["sizes"] == HAND_SIZES
    assert plan["model_config"] == {**HAND_CONFIG, "moe_layers": 1}
    assert plan["affinity"] == {"path": "aff.json", "sha256": sha256_file(tmp_path / "aff.json")}
    # the same inputs give the same bytes
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--tau", "0.25", "--out", "again.json")
    assert r.code == 0 and (tmp_path / "again.json").read_text(encoding="utf-8") == text
    # the schema-2 layout of the same artefact gives the same plan
    (tmp_path / "aff2.json").write_text(json.dumps(hand_affinity_v2()))
    r = run_cli("plan-sync", "aff2.json", "--top-p", "2", "--tau", "0.25", "-q")
    assert r.code == 0, r.err
    v2 = json.loads(r.out)
    assert v2.pop("affinity")["path"] == "aff2.json"
    assert v2 == {k: v for k, v in plan.items() if k != "affinity"}
    # through a pipe, the same plan on stdout (only the affinity's path differs)
    pipe((tmp_path / "aff.json").read_text())
    r = run_cli("plan-sync", "-", "--top-p", "2", "--tau", "0.25", "-q")
    assert r.code == 0
    piped, written = json.loads(r.out), json.loads(text)
    assert piped.pop("affinity")["path"] == "<stdin>"
    assert written.pop("affinity")["path"] == "aff.json"
    assert piped == written


def test_golden_plan_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run) -> None:
    """What the plan records, checked by hand (Eq. 9–10 with P = 2, τ = 1/4)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--tau", "0.25", "-q")
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert (plan["kind"], plan["schema_version"]) == ("sync-plan", 2)
    assert plan["round"] == plan["matrix_round"] == 3 and plan["refreshed"] is True
    assert (plan["top_p"], plan["tau"], plan["gate"]) == (2, 0.25, "per-client")
    targets = plan["layers"][0]["targets"]
    for m, t in enumerate(targets):
        assert (t["client"], t["expert"]) == divmod(m, 2)
        assert [s["client"] * 2 + s["expert"] for s in t["sources"]] == HAND_KEPT[m]
        sims = dict((c, v) for c, v in HAND_ROWS[m])
        expo = [math.exp(sims[k] / 0.25) for k in HAND_KEPT[m]]
        for s, x in zip(t["sources"], expo, strict=True):
            assert s["weight"] == pytest.approx(x / sum(expo), abs=1e-12)
            assert s["similarity"] == sims[s["client"] * 2 + s["expert"]]
    assert plan["transfers"] == [
        {"from": 0, "to": 1, "layer": 0, "experts": [0, 1], "bytes": 136},
        {"from": 0, "to": 2, "layer": 0, "experts": [0], "bytes": 68},
        {"from": 1, "to": 0, "layer": 0, "experts": [1], "bytes": 68},
        {"from": 1, "to": 2, "layer": 0, "experts": [0, 1], "bytes": 136},
        {"from": 2, "to": 0, "layer": 0, "experts": [1], "bytes": 68},
        {"from": 2, "to": 1, "layer": 0, "experts": [0], "bytes": 68},
    ]
    led = plan["ledger"]
    assert (led["server_up"], led["server_down"], led["p2p"]) == (3 * 136, 3 * 120, 8 * 68)
    assert (led["max_client_p2p_in"], led["fedavg_equivalent"]) == (3 * 68, 2 * 3 * 272)
    rows = {
        c: [[0, t["expert"], s["client"], s["expert"], s["weight"]]
            for t in targets if t["client"] == c for s in t["sources"]]
        for c in (0, 1, 2)
    }  # fmt: skip
    assert led["plan_down"] == sum(len(json.dumps(r, separators=(",", ":"))) for r in rows.values())


def test_plan_sync_json_summary_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "1", "--out", "p.json", "--json", "-q")
    assert r.code == 0 and r.out.count("\n") == 1
    payload = json.loads(r.out)
    plan = read(tmp_path / "p.json")
    assert payload == {
        "ok": True,
        "path": "p.json",
        "sha256": sha256_file(tmp_path / "p.json"),
        "ledger": plan["ledger"],
    }
    before = snapshot(tmp_path)
    r = run_cli("plan-sync", "aff.json", "--top-p", "1", "--out", "p.json")
    assert "p.json exists" in clean_failure(r, 4)
    r = run_cli("plan-sync", "aff.json", "--top-p", "4", "--out", "q.json")
    assert "--top-p 4 needs 5 candidates per row but the affinity kept 4" in clean_failure(r, 2)
    r = run_cli("plan-sync", "aff.json", "--tau", "0", "--out", "q.json")
    assert "--tau must be > 0" in clean_failure(r, 2)
    r = run_cli("plan-sync", "aff.json", "--gate", "both", "--out", "q.json")
    assert "--gate must be one of per-client, shared, got 'both'" in clean_failure(r, 2)
    r = run_cli("plan-sync", "aff.json", "--interval", "never", "--out", "q.json")
    assert "--interval must be one of matrix, sync" in clean_failure(r, 2)
    r = run_cli("plan-sync", "aff.json", "--participants", "0,x", "--out", "q.json")
    assert "--participants '0,x': expected ids like 0,3,5" in clean_failure(r, 2)
    r = run_cli("plan-sync", "--out", "q.json")
    assert "give --round, an affinity artefact or a previous plan" in clean_failure(r, 2)
    assert snapshot(tmp_path) == before


def test_top_p_error_is_worded_as_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run, pipe: Pipe
) -> None:
    monkeypatch.chdir(tmp_path)
    pipe(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "-", "--top-p", "-1")
    assert clean_failure(r, 2) == "Error: --top-p must be >= 0, got -1"
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    ("what", "edit", "message"),
    [
        ("affinity", lambda m: m.__setitem__("sizes", {}), "malformed affinity artefact"),
        ("affinity", lambda m: m["neighbours"][0].__setitem__(0, ["x", 1.0]),
         "malformed affinity artefact"),
        ("affinity", lambda m: m["neighbours"][0].__setitem__(0, [0, "abc"]),
         "malformed affinity artefact"),
        ("affinity", lambda m: m["neighbours"][0].__setitem__(0, [6, 1.0]),
         "neighbour row 0 has a malformed entry [6, 1.0]"),
        ("affinity", lambda m: m["neighbours"][1].reverse(),
         "neighbour row 1 is not sorted by decreasing similarity"),
        ("affinity", lambda m: m["model_config"].__setitem__("num_experts", 0),
         "bad model_config"),
        ("affinity", lambda m: m.__setitem__("schema_version", 4),
         "schema_version 4 is not supported"),
        ("affinity", lambda m: m.__setitem__("schema_version", 3), "missing key 'arrays'"),
        ("affinity-v2", lambda m: m.pop("layers"), "missing key 'layers'"),
        ("affinity-v2", lambda m: m["layers"][0]["neighbours"].pop(),
         "layer 0 has 5 neighbour rows for 6 client-experts"),
        ("previous", lambda m: m.pop("matrix_round"), "missing key 'matrix_round'"),
        ("previous", lambda m: m.pop("model_config"), "missing key 'model_config'"),
        ("previous", lambda m: m.pop("participants"), "missing key 'participants'"),
    ],
    ids=["no-sizes", "bad-column", "bad-similarity", "column-out-of-range", "unsorted-row",
         "bad-config", "schema-4", "schema-3-no-arrays", "v2-no-layers", "v2-missing-row", "no-matrix-round",
         "no-model-config", "no-participants"],
)  # fmt: skip
def test_malformed_manifests_are_invalid_input(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Run,
    what: str,
    edit: Callable[[dict[str, Any]], Any],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    aff = hand_affinity_v2() if what == "affinity-v2" else hand_affinity()
    if what.startswith("affinity"):
        edit(aff)
        (tmp_path / "aff.json").write_text(json.dumps(aff))
        before = snapshot(tmp_path)
        r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "q.json")
    else:
        (tmp_path / "aff.json").write_text(json.dumps(aff))
        assert run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "p.json", "-q").code == 0
        plan = read(tmp_path / "p.json")
        edit(plan)
        (tmp_path / "p.json").write_text(json.dumps(plan))
        before = snapshot(tmp_path)
        r = run_cli("plan-sync", "--previous-plan", "p.json", "--refresh-interval", "2",
                    "--participants", "0,1,2", "--out", "q.json")  # fmt: skip
    assert message in clean_failure(r, 3)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# the refresh interval


SAME_P = ("--top-p", "2", "--tau", "0.25")  # what plan1 was made with


def test_refresh_interval_reuses_then_recomputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--tau", "0.25", "--round", "1",
                "--refresh-interval", "3", "--out", "plan1.json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    plan1 = read(tmp_path / "plan1.json")
    sha1 = sha256_file(tmp_path / "plan1.json")
    # rounds 2 and 3: within the interval, the matrices are reused; no affinity is needed
    for rnd in ("2", "3"):
        r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", rnd, *SAME_P,
                    "--refresh-interval", "3", "--participants", "0,1,2",
                    "--out", f"plan{rnd}.json")  # fmt: skip
        assert (r.code, r.out) == (0, f"plan{rnd}.json\n"), r.err
        assert "reused from round" in r.err  # the table on stderr says so
        plan = read(tmp_path / f"plan{rnd}.json")
        assert (plan["round"], plan["matrix_round"], plan["refreshed"]) == (int(rnd), 1, False)
        assert plan["affinity"] is None
        assert plan["previous_plan"] == {"path": "plan1.json", "sha256": sha1, "reused": True}
        assert plan["layers"] == plan1["layers"] and plan["participants"] == [0, 1, 2]
        assert plan["transfers"] == plan1["transfers"] and plan["ledger"] == plan1["ledger"]
    # no --round: the round after the previous plan's
    r = run_cli("plan-sync", "--previous-plan", "plan2.json", "--refresh-interval", "3", *SAME_P,
                "--participants", "0,1,2", "-q")  # fmt: skip
    assert r.code == 0 and json.loads(r.out)["round"] == 3 and not json.loads(r.out)["refreshed"]
    # reusing the matrices, the participants must be named (there is no affinity to read them)
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", "2", *SAME_P,
                "--refresh-interval", "3", "--out", "q.json")  # fmt: skip
    assert "say which clients take part in this round" in clean_failure(r, 2)
    # round 4: outside the interval, the matrices must be recomputed from an affinity artefact
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", "4",
                "--refresh-interval", "3", "--participants", "0,1,2",
                "--out", "plan4.json")  # fmt: skip
    assert "an affinity artefact is needed to compute the matrix this round" in clean_failure(r, 2)
    assert not (tmp_path / "plan4.json").exists()
    r = run_cli("plan-sync", "aff.json", "--previous-plan", "plan1.json", "--round", "4",
                "--top-p", "1", "--refresh-interval", "3", "--out", "plan4.json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    plan4 = read(tmp_path / "plan4.json")
    assert plan4["round"] == plan4["matrix_round"] == 4
    assert plan4["refreshed"] is True and plan4["top_p"] == 1
    assert plan4["previous_plan"]["reused"] is False and plan4["affinity"] is not None
    assert [len(t["sources"]) for t in plan4["layers"][0]["targets"]] == [3, 3, 2, 2, 2, 2]  # ties
    assert plan4["layers"] != plan1["layers"]
    # interval 1 (the default): never reused, and without an affinity a usage error
    r = run_cli("plan-sync", "aff.json", "--previous-plan", "plan1.json", "--round", "2",
                "--top-p", "2", "-q")  # fmt: skip
    assert r.code == 0, r.err
    assert json.loads(r.out)["refreshed"] is True and json.loads(r.out)["matrix_round"] == 2
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", "2",
                "--refresh-interval", "1", "--participants", "0,1,2",
                "--out", "q.json")  # fmt: skip
    assert "an affinity artefact is needed" in clean_failure(r, 2)
    r = run_cli("plan-sync", "aff.json", "--refresh-interval", "0")
    assert clean_failure(r, 2) == "Error: --refresh-interval must be >= 1, got 0"
    assert not (tmp_path / "q.json").exists()


def test_reused_plan_keeps_its_own_p_and_tau(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--tau", "0.25", "--round", "1",
                "--refresh-interval", "3", "--out", "plan1.json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", "2", "--top-p", "1",
                "--tau", "9", "--refresh-interval", "3", "--participants", "0,1,2",
                "-q")  # fmt: skip
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["layers"] == read(tmp_path / "plan1.json")["layers"]  # P = 2 rows, τ = 1/4 weights
    assert (plan["top_p"], plan["tau"]) == (2, 0.25)
    assert (plan["params"]["top_p"], plan["params"]["tau"]) == (2, 0.25)


def test_reuse_needs_no_p_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aff.json").write_text(json.dumps(hand_affinity()))
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--tau", "0.25", "--round", "1",
                "--refresh-interval", "3", "--out", "plan1.json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", "2",
                "--refresh-interval", "3", "--participants", "0,1,2", "-q")  # fmt: skip
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["refreshed"] is False
    assert plan["layers"] == read(tmp_path / "plan1.json")["layers"]


def test_reused_plan_aggregates_like_the_original(work: Path, run_cli: Run) -> None:
    r = run_cli("affinity", "r1", "--candidates", "4", "--out", "aff.json", "-q")
    assert (r.code, r.out) == (0, "aff.json\n")
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--refresh-interval", "2",
                "--out", "plan1.json", "-q")  # fmt: skip
    assert r.code == 0
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", "2", "--top-p", "2",
                "--refresh-interval", "2", "--participants", "0,1,2,3", "--out", "plan2.json",
                "-q")  # fmt: skip
    assert r.code == 0, r.err
    plan2 = read(work / "plan2.json")
    assert (plan2["refreshed"], plan2["matrix_round"], plan2["round"]) == (False, 1, 2)
    assert plan2["previous_plan"]["reused"] is True and plan2["affinity"] is None
    assert read(work / "plan1.json")["layers"] == plan2["layers"]  # the same matrices
    r = run_cli("aggregate", "--plan", "plan1.json", "r1", "--out", "plan1", "-q")
    assert r.code == 0, r.err
    # a reused plan carries no uploads to check; it is bound to its round instead
    r = run_cli("aggregate", "--plan", "plan2.json", "r1", "--out", "plan2")
    assert "a checkpoint of round 1, but plan2.json is the plan of round 2" in clean_failure(r, 3)
    assert not (work / "plan2").exists()


# ---------------------------------------------------------------------------------------------
# partial participation: listed clients, clients that sat out, stale uploads


def test_train_round_of_listed_clients(partial: Path, run_cli: Run) -> None:
    """--client 2,0 trains exactly clients 0 and 2 into a folder, byte-identical to their
    checkpoints in a round of every client (each client's training depends on its own seed)."""
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "2,0", "--out", "again")
    assert (r.code, r.out) == (0, "again/train-round.json\n"), r.err
    assert files_in(partial / "again") == [name(0), name(2), "train-round.json"]
    manifest = read(partial / "again" / "train-round.json")
    assert manifest["round"] == 1
    assert [c["client"] for c in manifest["clients"]] == [0, 2]
    assert manifest["checkpoints"] == [
        {"client": c, "path": name(c), "sha256": sha256_file(partial / "r1" / name(c)),
         "num_samples": samples(partial / "r1")[c]}
        for c in (0, 2)
    ]  # fmt: skip
    for c in (0, 2):
        assert (partial / "again" / name(c)).read_bytes() == (
            partial / "pr1" / name(c)
        ).read_bytes()
        assert open_checkpoint(partial / "again" / name(c)).meta.client_id == c
    before = snapshot(partial)
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "0,2", "--out", "x.safetensors")
    assert "several clients write one checkpoint each into a folder" in clean_failure(r, 2)
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "0,x", "--out", "bad")
    assert "--client '0,x': expected 'all', an id or ids like 0,3,5" in clean_failure(r, 2)
    r = run_cli(*TRAIN, "--model", "init.safetensors", "--client", "0,7", "--out", "bad")
    assert clean_failure(r, 3).startswith("Error: ")
    assert snapshot(partial) == before


def test_partial_round_gives_every_client_a_model(partial: Path, run_cli: Run, pipe: Pipe) -> None:
    """Round 1 with participants {0, 2} of 4: the clients that sat out (1, 3) carry the initial
    experts and gate and receive the participants' new embedding."""
    r = run_cli("affinity", "pr1/train-round.json", "--candidates", "6", "-q")
    assert r.code == 0, r.err
    aff = json.loads(r.out)
    assert aff["clients"] == [0, 2] and aff["stale"] == []
    pipe(r.out)
    r = run_cli("plan-sync", "-", "--participants", "0,2", "--top-p", "2", "-q")
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["participants"] == plan["clients"] == [0, 2]
    assert {(t["from"], t["to"]) for t in plan["transfers"]} == {(0, 2), (2, 0)}
    (partial / "plan.json").write_text(r.out)
    r = run_cli("aggregate", "--plan", "plan.json", "pr1/", "--previous", "init.safetensors",
                "--partition", "p.json", "--out", "agg1/")  # fmt: skip
    assert (r.code, r.out) == (0, "agg1/aggregate.json\n"), r.err
    assert files_in(partial / "agg1") == [
        "aggregate.json",
        name(0),
        name(1),
        name(2),
        name(3),
        "server.safetensors",
    ]
    manifest = read(partial / "agg1" / "aggregate.json")
    init_sha = sha256_file(partial / "init.safetensors")
    assert manifest["carried"] == [
        {"client": c, "path": "../init.safetensors", "sha256": init_sha} for c in (1, 3)
    ]
    assert [i["client"] for i in manifest["inputs"]] == [0, 2]
    assert [(e["client"], e["trained"]) for e in manifest["checkpoints"]] == [
        (0, True),
        (1, False),
        (2, True),
        (3, False),
    ]
    assert manifest["ledger"] == plan["ledger"] and manifest["ledger"]["clients"] == 2
    x, out = states(partial / "pr1", (0, 2)), states(partial / "agg1")
    init = load_file(str(partial / "init.safetensors"))
    n = samples(partial / "pr1")
    assert check_eq11(x, out, plan) == 8
    check_shared(x, out, n)  # every client's embedding, carried clients' too
    server = load_file(str(partial / "agg1" / "server.safetensors"))
    for c in (1, 3):
        for t, v in out[c].items():
            if t.startswith("embed."):
                assert torch.equal(v, out[0][t]) and torch.equal(v, server[t]), (c, t)
                assert not torch.equal(v, init[t])
            else:  # experts and (per-client) gate: the initial model's
                assert torch.equal(v, init[t]), (c, t)
        meta = open_checkpoint(partial / "agg1" / name(c)).meta
        assert (meta.client_id, meta.round, meta.method) == (c, 1, "fedmoe-da")
        assert meta.parent_sha256 == init_sha
    for c in (0, 2):
        assert torch.equal(out[c]["gate.weight"], x[c]["gate.weight"])
    # the module fixture ran the same round through files: the same models
    fixture = states(partial / "pagg1")
    assert all(torch.equal(fixture[c][t], out[c][t]) for c in CLIENTS for t in out[c])


def test_partial_round_errors(partial: Path, run_cli: Run) -> None:
    before = snapshot(partial)
    # a global --previous model says nothing of which clients exist
    r = run_cli("aggregate", "--plan", "pplan1.json", "pr1/", "--previous", "init.safetensors",
                "--out", "agg1")  # fmt: skip
    line = clean_failure(r, 2)
    assert "--previous init.safetensors is a global model" in line
    # a plan for other participants than the checkpoints
    r = run_cli("aggregate", "--plan", "pplan1.json", "r1/", "--out", "agg1")
    assert (
        "the sync plan is for clients [0, 2], the round's uploads are from clients [0, 1, 2, 3]"
        in clean_failure(r, 3)
    )
    r = run_cli("aggregate", "--plan", "pplan1.json", "pr1/", "--previous", "init.safetensors",
                "--partition", "p.json", "--method", "fedavg", "--out", "agg1")  # fmt: skip
    assert "--plan is the fedmoe-da merge" in clean_failure(r, 2)
    assert snapshot(partial) == before


def test_stale_uploads_round(partial: Path, run_cli: Run) -> None:
    """Round 2 with participants {0, 1, 3}: client 2's round-1 upload is held (stale), so the
    matrix covers every client, while only the participants' rows apply."""
    r = run_cli("affinity", "pr2/", "--stale", "pr1/", "--candidates", "6", "--out", "aff2.json")
    assert (r.code, r.out) == (0, "aff2.json\n"), r.err
    assert "stale" in r.err  # the table on stderr says so
    aff = read(partial / "aff2.json")
    assert aff["round"] == 2 and aff["clients"] == list(CLIENTS) and aff["stale"] == [2]
    assert [(i["client"], i["path"], i["round"], i["stale"]) for i in aff["inputs"]] == [
        (0, f"pr2/{name(0)}", 2, False),  # fresh wins over the earlier upload
        (1, f"pr2/{name(1)}", 2, False),
        (2, f"pr1/{name(2)}", 1, True),
        (3, f"pr2/{name(3)}", 2, False),
    ]
    assert [i["sha256"] for i in aff["inputs"]] == [
        sha256_file(partial / ("pr1" if c == 2 else "pr2") / name(c)) for c in CLIENTS
    ]
    assert aff["summary"]["stale_clients"] == 1
    (layer,) = aff["layers"]
    assert len(layer["neighbours"]) == 16
    assert all(any(col == m for col, _ in row) for m, row in enumerate(layer["neighbours"]))
    columns = {col for row in layer["neighbours"] for col, _ in row}
    assert {col // 4 for col in columns} == set(CLIENTS)  # the stale client's experts are there
    r = run_cli("plan-sync", "aff2.json", "--top-p", "2", "--out", "plan2.json", "-q")
    assert r.code == 0, r.err
    plan = read(partial / "plan2.json")
    assert plan["clients"] == list(CLIENTS) and plan["participants"] == [0, 1, 3]
    assert len(plan["layers"][0]["targets"]) == 16  # every held client's rows
    assert plan["transfers"] and all(
        t["from"] != 2 and t["to"] != 2 for t in plan["transfers"]
    )  # client 2 is not contacted
    r = run_cli("aggregate", "--plan", "plan2.json", "pr2/", "--previous", "pagg1/",
                "--out", "agg2", "-q")  # fmt: skip
    assert r.code == 0, r.err
    manifest = read(partial / "agg2" / "aggregate.json")
    assert manifest["round"] == 2
    assert manifest["carried"] == [
        {
            "client": 2,
            "path": f"../pagg1/{name(2)}",
            "sha256": sha256_file(partial / "pagg1" / name(2)),
        }
    ]
    x, out = states(partial / "pr2", (0, 1, 3)), states(partial / "agg2")
    previous = states(partial / "pagg1", (2,))[2]
    assert check_eq11(x, out, plan) == 12
    check_shared(x, out, samples(partial / "pr2"))
    for t, v in out[2].items():  # the client that sat out keeps its experts and gate
        if t.startswith("embed."):
            assert torch.equal(v, out[0][t]) and not torch.equal(v, previous[t]), t
        else:
            assert torch.equal(v, previous[t]), t


def test_fedavg_with_previous_and_reduce_kinds(partial: Path, run_cli: Run) -> None:
    """FedAvg of round 2's three participants goes to every client, the one that sat out too;
    reduce=median is the coordinate-wise median of the three."""
    r = run_cli("aggregate", "--method", "fedavg", "pr2/", "--previous", "pagg1/",
                "--out", "fa/", "--json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    manifest = read(partial / "fa" / "aggregate.json")
    assert json.loads(r.out) == manifest
    assert manifest["params"] == {"reduce": "mean", "trim": 0.1, "clip": 1.0, "krum_ratio": 0.0}
    assert [c["client"] for c in manifest["carried"]] == [2]
    assert [(e["client"], e["trained"]) for e in manifest["checkpoints"]] == [
        (0, True),
        (1, True),
        (2, False),
        (3, True),
    ]
    x, n = states(partial / "pr2", (0, 1, 3)), samples(partial / "pr2")
    out = states(partial / "fa")
    names = sorted(out[0])
    for t in names:
        assert all(torch.equal(out[c][t], out[0][t]) for c in CLIENTS), t
        assert close(out[0][t], weighted(x, t, n)), t
    server = load_file(str(partial / "fa" / "server.safetensors"))
    assert sorted(server) == sorted(t for t in names if not t.startswith("experts."))
    # the coordinate-wise median
    r = run_cli("aggregate", "--method", "fedavg", "pr2/", "--previous", "pagg1/",
                "--param", "reduce=median", "--out", "fm/", "-q")  # fmt: skip
    assert r.code == 0, r.err
    assert read(partial / "fm" / "aggregate.json")["params"]["reduce"] == "median"
    med = states(partial / "fm")
    a, b, c = (x[k]["embed.fc1.weight"] for k in (0, 1, 3))
    middle = torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    assert torch.equal(med[2]["embed.fc1.weight"], middle)  # the client that sat out too
    for t in names:
        stacked = torch.stack([x[k][t] for k in (0, 1, 3)])
        assert torch.equal(med[0][t], stacked.median(dim=0).values), t
        assert all(torch.equal(med[k][t], med[0][t]) for k in CLIENTS), t
    assert not torch.equal(med[0]["experts.w1"], out[0]["experts.w1"])
    # a reduce kind that does not exist
    before = snapshot(partial)
    r = run_cli("aggregate", "--method", "fedavg", "pr2/", "--previous", "pagg1/",
                "--param", "reduce=bogus", "--out", "fb/")  # fmt: skip
    line = clean_failure(r, 2)
    assert line.startswith("Error: --param reduce ") and "'bogus'" in line
    assert "mean, median, trimmed-mean, clipped-mean" in line
    assert snapshot(partial) == before


# ---------------------------------------------------------------------------------------------
# two MoE layers


def test_two_moe_layers(multi: Path, run_cli: Run, pipe: Pipe) -> None:
    r = run_cli("affinity", "m1/", "--candidates", "6", "-q")
    assert r.code == 0, r.err
    aff = json.loads(r.out)
    assert [(la["layer"], la["num_experts"], len(la["neighbours"])) for la in aff["layers"]] == [
        (0, 4, 16),
        (1, 4, 16),
    ]
    assert len(aff["summary"]["layers"]) == 2
    pipe(r.out)
    r = run_cli("plan-sync", "-", "--top-p", "2", "--tau", "0.1", "--out", "plan.json", "-q")
    assert r.code == 0, r.err
    plan = read(multi / "plan.json")
    assert [(la["layer"], la["num_experts"], len(la["targets"])) for la in plan["layers"]] == [
        (0, 4, 16),
        (1, 4, 16),
    ]
    assert plan["model_config"]["moe_layers"] == 2
    state = load_file(str(multi / "m1" / name(0)))
    per_expert = [
        sum(state[f"{prefix}experts.{p}"][0].numel() * 4 for p in EXPERT_PARTS)
        for prefix in ("blocks.0.", "")
    ]
    assert per_expert[0] != per_expert[1]  # H → H hidden experts, H → C classifying experts
    assert plan["sizes"]["expert"] == per_expert and plan["sizes"]["num_experts"] == [4, 4]
    assert {t["layer"] for t in plan["transfers"]} == {0, 1}
    for t in plan["transfers"]:
        assert t["bytes"] == len(t["experts"]) * per_expert[t["layer"]]
        needed = {
            s["expert"]
            for row in plan["layers"][t["layer"]]["targets"] if row["client"] == t["to"]
            for s in row["sources"] if s["client"] == t["from"]
        }  # fmt: skip
        assert t["experts"] == sorted(needed)
    assert plan["ledger"]["p2p"] == sum(t["bytes"] for t in plan["transfers"])
    r = run_cli("aggregate", "--plan", "plan.json", "m1/", "--out", "agg", "-q")
    assert r.code == 0, r.err
    x, out = states(multi / "m1"), states(multi / "agg")
    assert sorted(out[0]) == sorted(x[0]) and "blocks.0.experts.w1" in out[0]
    # one expert of each layer, by hand: the target that draws most on other client-experts
    for layer, tensor in ((0, "blocks.0.experts.w1"), (1, "experts.w1")):
        rows = plan["layers"][layer]["targets"]
        row = min(rows, key=lambda t: t["sources"][0]["weight"])
        c, j = row["client"], row["expert"]
        assert (row["sources"][0]["client"], row["sources"][0]["expert"]) == (c, j)
        assert len(row["sources"]) >= 3 and row["sources"][0]["weight"] < 0.9
        hand = torch.zeros_like(x[0][tensor][0], dtype=torch.float64)
        for s in row["sources"]:
            hand += s["weight"] * x[s["client"]][tensor][s["expert"]].double()
        assert close(out[c][tensor][j], hand), (layer, c, j)
        assert not torch.equal(out[c][tensor][j], x[c][tensor][j])
    assert check_eq11(x, out, plan) == 32
    check_shared(x, out, samples(multi / "m1"))
    for c in CLIENTS:  # per-client gates of both layers
        assert torch.equal(out[c]["blocks.0.gate.weight"], x[c]["blocks.0.gate.weight"])
        assert torch.equal(out[c]["gate.weight"], x[c]["gate.weight"])


# ---------------------------------------------------------------------------------------------
# schema-1 artefacts are still read


def to_schema_1_affinity(aff: dict[str, Any]) -> dict[str, Any]:
    """An affinity artefact in the layout older fedmoe wrote: one MoE layer at the top level."""
    (layer,) = aff["layers"]
    sizes = aff["sizes"]
    config = {k: v for k, v in aff["model_config"].items() if k != "moe_layers"}
    return {
        "schema_version": 1, "kind": "affinity", "fedmoe_version": "0.1.0",
        "round": aff["round"], "candidates": aff["candidates"], "model_config": config,
        "sizes": {"embed": sizes["shared"], "gate": sizes["gate"], "expert": sizes["expert"][0],
                  "num_experts": sizes["num_experts"][0], "model": sizes["model"]},
        "inputs": [{k: i[k] for k in ("client", "path", "sha256")} for i in aff["inputs"]],
        "clients": aff["clients"], "num_experts": layer["num_experts"],
        "neighbours": layer["neighbours"], "expert_domain": layer["expert_domain"],
        "expert_label": layer["expert_label"],
    }  # fmt: skip


def to_schema_1_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """A sync plan in the layout older fedmoe wrote: top-level ``targets``, no ``layer``."""
    (layer,) = plan["layers"]
    sizes = plan["sizes"]
    config = {k: v for k, v in plan["model_config"].items() if k != "moe_layers"}
    keep = ("round", "matrix_round", "refreshed", "top_p", "tau", "refresh_interval", "gate",
            "affinity", "previous_plan")  # fmt: skip
    return {
        "schema_version": 1, "kind": "sync-plan", "fedmoe_version": "0.1.0",
        **{k: plan[k] for k in keep}, "model_config": config,
        "sizes": {"embed": sizes["shared"], "gate": sizes["gate"], "expert": sizes["expert"][0],
                  "num_experts": sizes["num_experts"][0], "model": sizes["model"]},
        "clients": plan["clients"], "num_experts": layer["num_experts"],
        "targets": layer["targets"],
        "transfers": [{k: v for k, v in t.items() if k != "layer"} for t in plan["transfers"]],
        "ledger": plan["ledger"],
    }  # fmt: skip


def test_wire_bf16_through_the_commands(work: Path, run_cli: Run) -> None:
    """plan-sync -p wire=bf16 fixes the wire in the plan: its p2p bytes are half the native
    plan's (float32 experts), the server's are the same, and aggregate --plan gives each expert
    within bfloat16 rounding of the native merge, not equal to it where peers' experts came in."""
    assert run_cli("affinity", "r1/", "--out", "aff.json", "-q").code == 0
    for name, extra in (("native", ()), ("bf16", ("-p", "wire=bf16"))):
        r = run_cli("plan-sync", "aff.json", "--top-p", "2", *extra, "--out", f"{name}.json", "-q")
        assert r.code == 0, r.err
        r = run_cli("aggregate", "--plan", f"{name}.json", "r1/", "--out", f"agg-{name}", "-q")
        assert r.code == 0, r.err
    native, half = read(work / "native.json"), read(work / "bf16.json")
    assert half["params"]["wire"] == "bf16" and native["params"]["wire"] == "native"
    assert native["ledger"]["p2p"] > 0 and 2 * half["ledger"]["p2p"] == native["ledger"]["p2p"]
    assert half["ledger"]["server_total"] == native["ledger"]["server_total"]
    a, b = states(work / "agg-native"), states(work / "agg-bf16")
    w1 = "experts.w1"
    assert any(not torch.equal(a[c][w1], b[c][w1]) for c in CLIENTS)
    for c in CLIENTS:
        torch.testing.assert_close(b[c][w1], a[c][w1], atol=1e-2, rtol=1e-2)
        assert torch.equal(a[c]["embed.fc1.weight"], b[c]["embed.fc1.weight"])


def test_schema_1_affinity_and_plan_are_read(work: Path, run_cli: Run) -> None:
    r = run_cli("affinity", "r1/", "--candidates", "6", "--out", "aff.json", "-q")
    assert r.code == 0, r.err
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "plan.json", "-q")
    assert r.code == 0, r.err
    aff, plan = read(work / "aff.json"), read(work / "plan.json")
    (work / "aff1.json").write_text(json.dumps(to_schema_1_affinity(aff)))
    (work / "plan1.json").write_text(json.dumps(to_schema_1_plan(plan)))
    # plan-sync reads the schema-1 affinity: the same plan, apart from the affinity it names
    r = run_cli("plan-sync", "aff1.json", "--top-p", "2", "-q")
    assert r.code == 0, r.err
    from_v1 = json.loads(r.out)
    assert from_v1.pop("affinity") == {
        "path": "aff1.json",
        "sha256": sha256_file(work / "aff1.json"),
    }
    # schema 1 predates the value counts of an expert (which only a reduced wire needs)
    assert from_v1.pop("sizes") == {k: v for k, v in plan["sizes"].items() if k != "expert_values"}
    assert from_v1 == {k: v for k, v in plan.items() if k not in ("affinity", "sizes")}
    # aggregate --plan reads the schema-1 plan: the same models
    before = snapshot(work)
    for p in ("plan", "plan1"):
        r = run_cli("aggregate", "--plan", f"{p}.json", "r1/", "--out", f"agg-{p}", "-q")
        assert r.code == 0, r.err
    a, b = states(work / "agg-plan"), states(work / "agg-plan1")
    assert all(torch.equal(a[c][t], b[c][t]) for c in CLIENTS for t in a[c])
    assert read(work / "agg-plan1" / "aggregate.json")["params"]["top_p"] == 2
    # plan-sync reuses the schema-1 plan's matrices within the interval
    r = run_cli("plan-sync", "--previous-plan", "plan1.json", "--round", "2",
                "--refresh-interval", "2", "--participants", "0,1,2,3", "-q")  # fmt: skip
    assert r.code == 0, r.err
    reused = json.loads(r.out)
    assert reused["refreshed"] is False and reused["layers"] == plan["layers"]
    assert {k: v for k, v in snapshot(work).items() if not k.startswith("agg-")} == before


def hand_checkpoints(folder: Path) -> dict[int, State]:
    """Three client checkpoints of the hand-made config (round 3), as the golden plan expects."""
    cfg = MoEConfig.from_dict(HAND_CONFIG)
    made = {}
    with OutputSet() as out:
        for c in (0, 1, 2):
            made[c] = state_of(init_model(cfg, 10 + c))
            save_checkpoint(out, folder / "h" / name(c), made[c],
                            CheckpointMeta(cfg, c, 3, 10 * (c + 1), 0, "train"))  # fmt: skip
    return made


def test_golden_schema_1_plan_drives_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    x = hand_checkpoints(tmp_path)
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert golden["schema_version"] == 1 and "targets" in golden
    shutil.copy(GOLDEN, tmp_path / "golden.json")
    r = run_cli("aggregate", "--plan", "golden.json", "h/", "--out", "agg")
    assert (r.code, r.out) == (0, "agg/aggregate.json\n"), r.err
    out = states(tmp_path / "agg", (0, 1, 2))
    plan = {"participants": [0, 1, 2], "layers": [{"layer": 0, "targets": golden["targets"]}]}
    assert check_eq11(x, out, plan) == 6
    check_shared(x, out, {0: 10, 1: 20, 2: 30})
    manifest = read(tmp_path / "agg" / "aggregate.json")
    assert manifest["round"] == 3 and manifest["params"]["top_p"] == 2
    assert manifest["plan"]["sha256"] == sha256_file(GOLDEN)
    r = run_cli("plan-sync", "--previous-plan", "golden.json", "--round", "4",
                "--refresh-interval", "2", "--participants", "0,1,2", "-q")  # fmt: skip
    assert r.code == 0, r.err
    reused = json.loads(r.out)
    assert (reused["schema_version"], reused["refreshed"], reused["matrix_round"]) == (2, False, 3)
    assert reused["layers"][0]["targets"] == golden["targets"]
    assert reused["sizes"] == HAND_SIZES


# ---------------------------------------------------------------------------------------------
# the baselines


@pytest.mark.parametrize("method", ["fedavg", "naive-moe", "local", "oracle-domain"])
def test_baselines(work: Path, run_cli: Run, method: str) -> None:
    r = run_cli("aggregate", "--method", method, "--partition", "p.json", "r1/train-round.json",
                "--out", method)  # fmt: skip
    assert (r.code, r.out) == (0, f"{method}/aggregate.json\n"), r.err
    manifest = read(work / method / "aggregate.json")
    assert (manifest["method"], manifest["plan"], manifest["carried"]) == (method, None, [])
    x, out, n = states(work / "r1"), states(work / method), samples(work / "r1")
    routing = {c: open_checkpoint(work / "r1" / name(c)).meta.routing for c in CLIENTS}

    def avg(tensor: str, w: dict[int, float]) -> torch.Tensor:
        total = sum(w.values())
        if total == 0:  # an expert nobody routed to: a plain mean
            w, total = dict.fromkeys(w, 1.0), len(w)
        return sum(w[k] / total * x[k][tensor].double() for k in w)  # type: ignore[return-value]

    names = list(x[0])
    if method == "local":
        assert manifest["gate"] == "per-client" and manifest["server"] is None
        assert manifest["params"] == {}
        assert all(torch.equal(out[c][k], x[c][k]) for c in CLIENTS for k in names)
        assert manifest["ledger"]["server_total"] == 0
    elif method == "fedavg":
        assert manifest["gate"] == "shared" and manifest["params"]["reduce"] == "mean"
        for k in names:
            assert all(close(out[c][k], avg(k, n)) for c in CLIENTS), k
        model = sum(t.numel() * 4 for t in x[0].values())
        assert manifest["ledger"]["fedavg_equivalent"] == 2 * 4 * model
    elif method == "naive-moe":
        for k in names:
            if k.startswith("experts."):
                for j in range(4):
                    load = {c: routing[c]["layers"][0]["topk_count"][j] for c in CLIENTS}
                    assert all(close(out[c][k][j], avg(k, load)[j]) for c in CLIENTS), (k, j)
            else:
                assert all(close(out[c][k], avg(k, n)) for c in CLIENTS), k
    else:  # oracle-domain: groups are the clients' dominant true domains
        part = read(work / "p.json")
        dom = [c["domain_counts"] for c in part["clients"]]
        group = {c: max(range(len(dom[c])), key=lambda d: dom[c][d]) for c in CLIENTS}
        assert len(set(group.values())) > 1  # more than one group: not plain FedAvg
        for c in CLIENTS:
            members = {k: n[k] for k in CLIENTS if group[k] == group[c]}
            assert all(close(out[c][k], avg(k, members)) for k in names), c
    for entry in manifest["checkpoints"]:
        ck = open_checkpoint(work / method / entry["path"])
        assert ck.meta.method == method and entry["sha256"] == sha256_file(ck.path)
        assert entry["trained"] is True


def test_oracle_needs_the_partition(work: Path, run_cli: Run) -> None:
    before = snapshot(work)
    r = run_cli("aggregate", "--method", "oracle-domain", "r1", "--out", "o")
    assert "oracle-domain needs each client's true domain group" in clean_failure(r, 2)
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------
# errors: exit code, one line, nothing written, inputs unchanged


def make_plan(work: Path, run_cli: Run) -> dict[str, Any]:
    assert run_cli("affinity", "r1", "--candidates", "4", "--out", "aff.json", "-q").code == 0
    assert run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "plan.json", "-q").code == 0
    return read(work / "plan.json")


def test_plan_whose_weights_do_not_sum_to_one(work: Path, run_cli: Run) -> None:
    plan = make_plan(work, run_cli)
    plan["layers"][0]["targets"][5]["sources"][0]["weight"] += 0.01
    (work / "bad.json").write_text(json.dumps(plan))
    before = snapshot(work)
    r = run_cli("aggregate", "--plan", "bad.json", "r1", "--out", "agg")
    line = clean_failure(r, 3)
    assert line.startswith("Error: bad.json: weights of target client 1 expert 1 sum to 1.01")
    assert line.endswith(", not 1")
    assert snapshot(work) == before


def _targets(p: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = p["layers"][0]["targets"]
    return targets


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: _targets(p)[0]["sources"].__setitem__(0, {"client": 9, "expert": 0,
                                                                "weight": 1.0}),
         "bad.json: source client 9 expert 0 of target client 0 expert 0 is unknown"),
        (lambda p: _targets(p)[0]["sources"].__setitem__(0, {"client": 1, "expert": 4,
                                                                "weight": 1.0}),
         "bad.json: source client 1 expert 4 of target client 0 expert 0 is unknown"),
        (lambda p: _targets(p)[3].__setitem__("client", 7),
         "bad.json: target client 7 expert 3 is not in the plan's clients [0, 1, 2, 3]"),
        (lambda p: _targets(p).pop(), "bad.json: no row for target client 3 expert 3"),
        (lambda p: _targets(p)[0]["sources"][0].__setitem__("weight", -0.5),
         "bad.json: weight -0.5 of target client 0 expert 0"),
        (lambda p: p.__setitem__("kind", "affinity"),
         "bad.json: is a 'affinity' manifest, expected 'sync-plan'"),
        (lambda p: p["model_config"].__setitem__("embed_dim", 9),
         "the sync plan was made for a different model_config than the checkpoints"),
        (lambda p: p["layers"].append(copy.deepcopy(p["layers"][0])),
         "the sync plan has 2 matrices for a model with 1 MoE layer"),
        (lambda p: p.__setitem__("participants", [3, 1]),
         "bad.json: 'participants' must be increasing and distinct"),
    ],
    ids=["unknown-client", "unknown-expert", "unknown-target", "missing-row", "negative-weight",
         "wrong-kind", "other-config", "extra-layer", "unsorted-participants"],
)  # fmt: skip
def test_bad_plans(
    work: Path, run_cli: Run, edit: Callable[[dict[str, Any]], Any], message: str
) -> None:
    plan = make_plan(work, run_cli)
    edit(plan)
    (work / "bad.json").write_text(json.dumps(plan))
    before = snapshot(work)
    r = run_cli("aggregate", "--plan", "bad.json", "r1", "--out", "agg")
    assert message in clean_failure(r, 3)
    assert snapshot(work) == before


def test_plan_for_other_clients_than_the_checkpoints(work: Path, run_cli: Run) -> None:
    make_plan(work, run_cli)
    before = snapshot(work)
    r = run_cli("aggregate", "--plan", "plan.json", f"r1/{name(0)}", f"r1/{name(1)}",
                f"r1/{name(2)}", "--out", "agg")  # fmt: skip
    line = clean_failure(r, 3)
    assert (
        "the sync plan is for clients [0, 1, 2, 3], the round's uploads are from clients [0, 1, 2]"
        in line
    )
    assert snapshot(work) == before


def test_checkpoints_of_different_model_configs(work: Path, run_cli: Run) -> None:
    other = MoEConfig((1, 8, 8), 10, embed_hidden=8, embed_dim=6, num_experts=4, expert_hidden=8)
    with OutputSet() as out:
        save_checkpoint(
            out,
            work / "x" / name(3),
            state_of(init_model(other, 0)),
            CheckpointMeta(other, 3, 1, 50, 0, "train"),
        )
    before = snapshot(work)
    args = [f"r1/{name(c)}" for c in (0, 1, 2)] + [f"x/{name(3)}"]
    r = run_cli("aggregate", "--method", "fedavg", *args, "--out", "agg")
    line = clean_failure(r, 3)
    assert f"x/{name(3)} has a different model_config than" in line
    assert snapshot(work) == before


@pytest.fixture
def nan_round(work: Path) -> Path:
    """r1 with a NaN in client 2's expert 1 (no manifest: its sha256 would refuse the change)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    (work / "r1" / "train-round.json").unlink()
    path = work / "r1" / name(2)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state["experts.w1"][1, 0, 0] = float("nan")
    save_file(state, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("method", ["naive-moe", "fedavg", "oracle-domain"])
def test_nan_in_a_checkpoint(work: Path, nan_round: Path, run_cli: Run, method: str) -> None:
    before = snapshot(work)
    r = run_cli("aggregate", "--method", method, "--partition", "p.json", "r1", "--out", "agg")
    line = clean_failure(r, 3)
    assert line.startswith(f"Error: r1/{name(2)}: tensor experts.w1 ")
    assert line.endswith(" contains NaN or Inf")
    assert snapshot(work) == before  # no checkpoint, no manifest, no temp file, no folder


def test_nan_in_a_checkpoint_with_a_plan(work: Path, nan_round: Path, run_cli: Run) -> None:
    r = run_cli("affinity", "r1", "--candidates", "4", "--out", "aff.json", "-q")
    assert r.code == 0  # the gate is finite: affinity reads only gates
    r = run_cli("plan-sync", "aff.json", "--top-p", "2", "--out", "plan.json", "-q")
    assert r.code == 0
    before = snapshot(work)
    r = run_cli("aggregate", "--plan", "plan.json", "r1", "--out", "agg2")
    assert clean_failure(r, 3) == (
        f"Error: r1/{name(2)}: tensor experts.w1 expert 1 contains NaN or Inf"
    )
    assert snapshot(work) == before


def test_nan_error_names_the_expert_for_a_baseline(
    work: Path, nan_round: Path, run_cli: Run
) -> None:
    r = run_cli("aggregate", "--method", "naive-moe", "r1", "--out", "agg")
    assert clean_failure(r, 3) == (
        f"Error: r1/{name(2)}: tensor experts.w1 expert 1 contains NaN or Inf"
    )


def test_param_without_a_value_names_param(work: Path, run_cli: Run) -> None:
    r = run_cli("aggregate", "--method", "fedavg", "r1", "--param", "reduce", "--out", "agg")
    assert "--param 'reduce': expected key=value" in clean_failure(r, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--plan", "plan.json", "--method", "fedavg"),
         "--plan is the fedmoe-da merge; it cannot be combined with --method fedavg"),
        (("--method", "fedmoe-da"), "fedmoe-da needs --plan PLAN"),
        (("--method", "fedbn"), "federated --method must be one of fedmoe-da, fedavg, naive-moe, "
         "local, oracle-domain, fedprox, fedper, ifca, got 'fedbn'"),
        ((), "federated --method must be one of"),
        (("--method", "fedavg", "--weights", "1,1,1,1"), "--weights is for a plain merge"),
        (("--plan", "plan.json", "--gate", "both"),
         "--gate both: the sync plan was made for the per-client gate"),
        (("--plan", "plan.json", "--param", "top_p=1"),
         "--param: the sync plan fixes fedmoe-da's parameters"),
        (("--method", "fedavg", "--gate", "shared"), "--gate is a fedmoe-da option"),
        (("--method", "fedavg", "--param", "trim=0.7"), "--param trim must be < 0.5, got 0.7"),
        (("--method", "fedavg", "--param", "top_p=2"),
         "fedavg: unknown parameter 'top_p' (its parameters: reduce, trim, clip, krum_ratio)"),
        (("--method", "local", "--param", "reduce=median"),
         "local: unknown parameter 'reduce' (it has no parameters)"),
        (("--method", "fedavg", "--param", "reduce"), "expected key=value"),
    ],
)  # fmt: skip
def test_usage_errors(work: Path, run_cli: Run, args: tuple[str, ...], message: str) -> None:
    make_plan(work, run_cli)
    before = snapshot(work)
    r = run_cli("aggregate", *args, "r1", "--out", "agg")
    assert message in clean_failure(r, 2)
    assert snapshot(work) == before


def test_plain_merge_refuses_federated_options(work: Path, run_cli: Run) -> None:
    before = snapshot(work)
    r = run_cli("aggregate", f"r1/{name(0)}", f"r1/{name(1)}", "--param", "reduce=median",
                "--out", "m.safetensors")  # fmt: skip
    assert "--param and --previous are for a federated merge" in clean_failure(r, 2)
    r = run_cli("aggregate", f"r1/{name(0)}", "--previous", "init.safetensors",
                "--out", "m.safetensors")  # fmt: skip
    assert "--param and --previous are for a federated merge" in clean_failure(r, 2)
    assert snapshot(work) == before


def test_stdin_can_feed_only_one_input(work: Path, run_cli: Run, pipe: Pipe) -> None:
    make_plan(work, run_cli)
    pipe((work / "r1" / "train-round.json").read_text())
    r = run_cli("aggregate", "--plan", "-", "-", "--out", "agg")
    assert "only one of the plan and the checkpoints can come from stdin" in clean_failure(r, 2)
    pipe((work / "plan.json").read_text())
    r = run_cli("plan-sync", "-", "--previous-plan", "-", "--refresh-interval", "2")
    line = clean_failure(r, 2)
    assert "only one of the affinity and the previous plan can come from stdin" in line
    assert not (work / "agg").exists()


def test_existing_output_is_refused_without_force(work: Path, run_cli: Run) -> None:
    (work / "agg").mkdir()
    (work / "agg" / name(2)).write_text("keep\n")
    r = run_cli("aggregate", "--method", "local", "r1", "--out", "agg")
    assert clean_failure(r, 4) == (
        f"Error: agg/{name(2)} exists; pass --force to replace it or choose another --out"
    )
    assert files_in(work / "agg") == [name(2)]
    assert (work / "agg" / name(2)).read_text() == "keep\n"
    r = run_cli("aggregate", "--method", "local", "r1", "--out", "agg", "--force", "-q")
    assert r.code == 0 and len(files_in(work / "agg")) == 5  # local: no server file


def test_affinity_errors(work: Path, run_cli: Run) -> None:
    before = snapshot(work)
    r = run_cli("affinity", "r1", "--candidates", "0")
    assert clean_failure(r, 2) == "Error: --candidates must be >= 1, got 0"
    r = run_cli("affinity", "init.safetensors")
    line = clean_failure(r, 3)
    assert "init.safetensors is a global model; affinity takes client checkpoints" in line
    r = run_cli("affinity", "r1", "--stale", "init.safetensors")
    assert "init.safetensors is a global model" in clean_failure(r, 3)
    assert snapshot(work) == before
    shutil.copy(work / "r1" / name(0), work / "r1" / name(1))
    before = snapshot(work)
    r = run_cli("affinity", "r1/train-round.json", "--out", "aff.json")
    assert f"{name(1)}: sha256 differs" in clean_failure(r, 3)
    assert snapshot(work) == before


def test_plain_merge_of_a_folder_reads_every_file_in_it(work: Path, run_cli: Run) -> None:
    """A folder argument of the plain merge is every .safetensors file in it, in name order."""
    from safetensors.torch import load_file

    r = run_cli("aggregate", "r1", "--method", "mean", "--out", "m.safetensors", "-q")
    assert r.code == 0, r.err
    files = sorted((work / "r1").glob("*.safetensors"))
    assert len(files) == 4
    merged = load_file(str(work / "m.safetensors"))
    states = [load_file(str(f)) for f in files]
    for k, v in merged.items():
        want = sum(s[k].double() for s in states) / len(states)
        torch.testing.assert_close(v, want.float(), rtol=0, atol=1e-6)
    (work / "empty").mkdir()
    r = run_cli("aggregate", "empty", "--out", "e.safetensors")
    assert "empty: folder holds no .safetensors file" in clean_failure(r, 3)
    assert not (work / "e.safetensors").exists()
