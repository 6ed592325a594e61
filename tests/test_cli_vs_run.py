"""One round core: three rounds run by hand through the CLI (partition, init, train-round, affinity,
plan-sync, aggregate) give the same bytes as the same three rounds inside ``fedmoe run`` — every
plan, every affinity artefact, every client checkpoint — for FedMoE-DA with a refresh interval of
2 under 50 % participation, and for FedAvg. Also: ``init --config R`` builds ``run R``'s model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import run_in

from fedmoe.io.checkpoint import open_checkpoint
from fedmoe.run import load_recipe
from fedmoe.run.orchestrator import participants

RECIPE = """\
seed: 3
rounds: 3
participation: 0.5
methods: [fedmoe-da, fedavg]
partition:
  scheme: domain
  clients: 6
  domains_per_client: 1
model:
  embed_hidden: 8
  embed_dim: 8
  num_experts: 4
  top_k: 2
  expert_hidden: 8
train:
  epochs: 1
  batch_size: 64
fedmoe:
  top_p: 2
  tau: 0.1
  refresh_interval: 2
  candidates: 4
"""
TRAIN = ("--epochs", "1", "--batch-size", "64", "--seed", "3", "-q")


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fedmoe run`` into run/ (keeping every round's checkpoints) and the same rounds by hand
    into hand/, in one folder."""
    from fedmoe.run import orchestrator

    folder = tmp_path_factory.mktemp("cli-vs-run")
    (folder / "recipe.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orchestrator, "prune_checkpoints", lambda _: None)
        # one worker: the arms run in this process, where the patch above applies
        run_in(folder, ("run", "recipe.yaml", "--out", "run", "--threads", "1", "--workers", "1",
                        "-q"))  # fmt: skip
    recipe, _ = load_recipe(folder / "recipe.yaml")
    h = "hand"
    steps: list[tuple[str, ...]] = [
        ("partition", "--dataset", "digits-rot", "--clients", "6", "--scheme", "domain",
         "--domains-per-client", "1", "--seed", "3", "--out", f"{h}/partition.json", "-q"),
        ("init", "--config", "recipe.yaml", "--partition", f"{h}/partition.json", "--seed", "3",
         "--out", f"{h}/init.safetensors", "-q"),
    ]  # fmt: skip
    run_in(folder, *steps)
    for method in ("fedmoe-da", "fedavg"):
        m = f"{h}/rounds/{method}"
        for rnd in (1, 2, 3):
            r = f"{m}/round-{rnd:03d}"
            ids = ",".join(str(c) for c in participants(recipe, rnd, 6))
            prev = (
                f"{h}/init.safetensors"
                if rnd == 1
                else f"{m}/round-{rnd - 1:03d}/models/aggregate.json"
            )
            cmds: list[tuple[str, ...]] = [
                ("train-round", "--partition", f"{h}/partition.json", "--model", prev,
                 "--client", ids, "--round", str(rnd), "--out", f"{r}/train", *TRAIN),
            ]  # fmt: skip
            carry = ("--previous", prev) + (
                ("--partition", f"{h}/partition.json") if rnd == 1 else ()
            )
            if method == "fedmoe-da":
                if rnd in (1, 3):  # I = 2: the matrices are recomputed in rounds 1 and 3
                    stale = ("--stale", f"{m}/uploads") if rnd > 1 else ()
                    cmds.append(
                        ("affinity", f"{r}/train/train-round.json", *stale, "--candidates", "4",
                         "--partition", f"{h}/partition.json", "--out", f"{r}/affinity.json", "-q")
                    )  # fmt: skip
                aff = (f"{r}/affinity.json",) if rnd in (1, 3) else ()
                prev_plan = (
                    ("--previous-plan", f"{m}/round-{rnd - 1:03d}/plan.json") if rnd > 1 else ()
                )
                cmds.append(
                    ("plan-sync", *aff, *prev_plan, "--top-p", "2", "--tau", "0.1",
                     "--refresh-interval", "2", "--participants", ids, "--round", str(rnd),
                     "--out", f"{r}/plan.json", "-q")
                )  # fmt: skip
                cmds.append(
                    ("aggregate", f"{r}/train/train-round.json", "--plan", f"{r}/plan.json",
                     *carry, "--out", f"{r}/models", "-q")
                )  # fmt: skip
            else:
                cmds.append(
                    ("aggregate", f"{r}/train/train-round.json", "--method", "fedavg", *carry,
                     "--out", f"{r}/models", "-q")
                )  # fmt: skip
            run_in(folder, *cmds)
            if method == "fedmoe-da":  # the server keeps each client's latest upload
                (folder / m / "uploads").mkdir(exist_ok=True)
                for f in (folder / r / "train").glob("client-*.safetensors"):
                    shutil.copyfile(f, folder / m / "uploads" / f.name)
    return folder


def test_setup_is_the_same_bytes(both: Path) -> None:
    for name in ("partition.json", "init.safetensors"):
        assert (both / "hand" / name).read_bytes() == (both / "run" / name).read_bytes(), name


@pytest.mark.parametrize("method", ["fedmoe-da", "fedavg"])
def test_every_round_is_the_same_bytes(both: Path, method: str) -> None:
    hand, run = both / "hand" / "rounds" / method, both / "run" / "rounds" / method
    names = [n for n in files_in(run) if not n.endswith("train-round.json")]  # timings differ
    assert names == [n for n in files_in(hand) if not n.endswith("train-round.json")]
    plans = [n for n in names if n.endswith("plan.json")]
    models = [n for n in names if "/models/client-" in n]
    assert len(models) == 3 * 6  # every client gets a model every round, participating or not
    if method == "fedmoe-da":
        assert plans == [f"round-{r:03d}/plan.json" for r in (1, 2, 3)]
        assert [n for n in names if n.endswith("affinity.json")] == [
            "round-001/affinity.json",
            "round-003/affinity.json",
        ]
    for n in names:
        assert (hand / n).read_bytes() == (run / n).read_bytes(), n


def test_the_interval_holds_under_partial_participation(both: Path) -> None:
    """I = 2 with half the clients each round: the matrices of round 1 serve round 2 (0 of 3
    rounds refreshed only because the participants changed), and round 3 recomputes them over
    every client whose proxies the server holds, the absent ones marked stale."""
    import json

    rounds = both / "run" / "rounds" / "fedmoe-da"
    plans = [json.loads((rounds / f"round-{r:03d}" / "plan.json").read_text()) for r in (1, 2, 3)]
    assert [(p["round"], p["matrix_round"], p["refreshed"]) for p in plans] == [
        (1, 1, True),
        (2, 1, False),
        (3, 3, True),
    ]
    assert plans[1]["layers"] == plans[0]["layers"]
    aff3 = json.loads((rounds / "round-003" / "affinity.json").read_text())
    present = plans[2]["participants"]
    assert aff3["stale"] == [c for c in aff3["clients"] if c not in present]
    assert set(present) < set(aff3["clients"])  # stale proxies were kept
    for p in plans:
        for t in p["transfers"]:  # only present clients fetch, only from present clients
            assert t["from"] in p["participants"] and t["to"] in p["participants"]


def test_fedavg_gives_every_client_the_new_model(both: Path) -> None:
    models = both / "run" / "rounds" / "fedavg" / "round-002" / "models"
    states = [open_checkpoint(models / f"client-{c:03d}.safetensors").state() for c in range(6)]
    for k in states[0]:
        assert all(torch.equal(states[0][k], s[k]) for s in states[1:]), k


def test_fedmoe_da_absent_clients_keep_experts_and_get_shared_parts(both: Path) -> None:
    recipe, _ = load_recipe(both / "recipe.yaml")
    rounds = both / "run" / "rounds" / "fedmoe-da"
    present = participants(recipe, 2, 6)
    absent = [c for c in range(6) if c not in present]
    new = {c: open_checkpoint(rounds / "round-002" / "models" / f"client-{c:03d}.safetensors")
           for c in range(6)}  # fmt: skip
    old = {c: open_checkpoint(rounds / "round-001" / "models" / f"client-{c:03d}.safetensors")
           for c in absent}  # fmt: skip
    for c in absent:
        for name in ("experts.w1", "experts.b2", "gate.weight"):  # its own (per-client gate)
            assert torch.equal(new[c].tensor(name), old[c].tensor(name))
        for name in ("embed.fc1.weight", "embed.fc2.bias"):  # the round's new shared parts
            assert torch.equal(new[c].tensor(name), new[present[0]].tensor(name))
        assert new[c].meta.parent_sha256 == old[c].sha256


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "heavy.yaml", None])
def test_init_config_builds_the_model_run_builds(tmp_path: Path, recipe: str | None) -> None:
    """For any recipe, ``fedmoe init --config R`` and ``fedmoe run R`` build the same model
    (architecture and tensors) for the same partition and seed; a recipe without a ``model:``
    section gets the one set of defaults (MoEConfig's) in both."""
    from fedmoe.io.partition_file import load_partition
    from fedmoe.model import init_model, state_of

    root = Path(__file__).resolve().parents[1] / "recipes"
    if recipe is None:
        path = tmp_path / "bare.yaml"
        path.write_text("rounds: 1\n")
    else:
        path = tmp_path / recipe
        path.write_text((root / recipe).read_text())
    rec, _ = load_recipe(path)
    run_in(
        tmp_path,
        ("partition", "--dataset", rec.data.dataset, "--clients", "4", "--scheme", "iid",
         "--out", "p.json", "-q"),
        ("init", "--config", path.name, "--partition", "p.json", "--seed", "5", "--out",
         "i.safetensors", "-q"),
    )  # fmt: skip
    made = open_checkpoint(tmp_path / "i.safetensors")
    part = load_partition(tmp_path / "p.json")
    config = rec.model_config(part.input_shape, part.num_classes)
    assert made.config == config
    expected = state_of(init_model(config, 5))
    got = made.state()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    if recipe is None:
        assert (config.embed_hidden, config.embed_dim) == (128, 64)  # MoEConfig's defaults
    else:
        model = yaml.safe_load(path.read_text())["model"]
        assert all(getattr(config, k) == v for k, v in model.items())


def test_hand_rounds_refuse_out_of_order_inputs(
    both: Path, run_cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning a round that is not after the previous plan's, naming a negative participant, or
    passing as "stale" an upload that is not older than the round: clean refusals, nothing
    written."""
    from helpers import clean_failure

    monkeypatch.chdir(both)
    m = "hand/rounds/fedmoe-da"
    r = run_cli("plan-sync", "--previous-plan", f"{m}/round-002/plan.json", "--round", "2",
                "--participants", "0", "--out", "x.json")  # fmt: skip
    assert (
        clean_failure(r, 2) == "Error: --round must come after the previous plan's round 2, got 2"
    )
    r = run_cli("plan-sync", "--previous-plan", f"{m}/round-002/plan.json", "--round", "3",
                "--participants", "-1", "--out", "x.json")  # fmt: skip
    assert clean_failure(r, 2) == "Error: --participants '-1': client ids are >= 0"
    r = run_cli("affinity", f"{m}/round-001/train/train-round.json", "--stale",
                f"{m}/round-003/train", "--out", "x.json")  # fmt: skip
    line = clean_failure(r, 3)
    assert "the earlier upload of client" in line and "not before this round (1)" in line
    assert not (both / "x.json").exists()
