"""The personalised and clustered FL baselines reviewers ask for: FedProx (proximal local
training), FedPer (personal MoE layers) and IFCA (k cluster models chosen by loss), each checked by
hand on tiny models, through ``fedmoe run`` and through the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_ROUND, clean_failure, run_in
from test_aggregate import CLIENTS, SAMPLES, SCHEMA, State, average, close, round_inputs

from fedmoe.affinity import Upload
from fedmoe.aggregate import (
    AGGREGATORS,
    IFCA,
    FedAvg,
    FedPer,
    FedProx,
    Group,
    MergeSpec,
    Reduce,
    RoundInputs,
    SameIndex,
    make_method,
)
from fedmoe.aggregate.engine import merge_states
from fedmoe.errors import InputError
from fedmoe.io.checkpoint import open_checkpoint
from fedmoe.model import MoEConfig, Role, build_model, init_model, state_of
from fedmoe.plan import server_ledger
from fedmoe.round import plan_round
from fedmoe.train import TrainConfig
from fedmoe.train.client import choose, mean_loss
from fedmoe.train.local import fit, proximal_term

CFG = MoEConfig((5,), 3, embed_hidden=4, embed_dim=4, num_experts=3, expert_hidden=4)


@pytest.fixture(scope="module")
def states() -> dict[int, State]:
    return {c: state_of(init_model(CFG, c)) for c in CLIENTS}


def test_the_baselines_are_registered_with_their_parameters() -> None:
    assert {"fedprox", "fedper", "ifca"} <= set(AGGREGATORS)
    assert list(FedProx.parameters()) == ["reduce", "trim", "clip", "krum_ratio", "mu"]
    assert list(FedPer.parameters()) == ["reduce", "trim", "clip", "krum_ratio"]
    assert list(IFCA.parameters()) == ["reduce", "trim", "clip", "krum_ratio", "clusters"]
    assert [n for n, cls in AGGREGATORS.items() if cls.uses_clusters] == ["ifca"]
    with pytest.raises(Exception, match="mu"):
        make_method("fedprox", {"mu": 0})  # mu > 0: mu = 0 is FedAvg


# ---------------------------------------------------------------------------------------------
# FedProx


def test_the_proximal_term_by_hand() -> None:
    w = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))]
    w0 = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    term = proximal_term(w, w0, mu=0.5)
    # mu/2 * (1 + 4 + (3 - 1)^2) = 0.25 * 9
    assert float(term.detach()) == pytest.approx(2.25)
    term.backward()
    # d/dw = mu * (w - w0)
    assert torch.equal(w[0].grad, torch.tensor([0.5, 1.0]))
    assert torch.equal(w[1].grad, torch.tensor([[1.0]]))


def test_fedprox_trains_with_its_mu_and_merges_like_fedavg(states: dict[int, State]) -> None:
    base = TrainConfig(epochs=3)
    assert FedProx(mu=0.1).local_training(base) == TrainConfig(epochs=3, prox_mu=0.1)
    assert FedAvg().local_training(base) is base  # the others leave training alone
    inputs = round_inputs()
    prox, avg = FedProx().spec(inputs), FedAvg().spec(inputs)
    assert prox.method == "fedprox"
    assert (prox.shared, prox.gate, prox.experts) == (avg.shared, avg.gate, avg.experts)


def test_the_proximal_term_keeps_local_training_near_its_start() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    start = state_of(init_model(CFG, 1))

    def drift(mu: float) -> float:
        model = build_model(CFG, start)
        fit(model, x, y, TrainConfig(epochs=4, batch_size=16, lr=0.02, prox_mu=mu), seed=5)
        end = state_of(model)
        return float(sum((end[k] - start[k]).pow(2).sum() for k in start)) ** 0.5

    free, held = drift(0.0), drift(10.0)
    assert held < 0.6 * free  # a strong pull keeps the local optimum near w_t
    assert drift(0.0) == free  # and the run is deterministic


# ---------------------------------------------------------------------------------------------
# FedPer


def test_fedper_averages_the_shared_parts_and_keeps_gates_and_experts(
    states: dict[int, State],
) -> None:
    spec = FedPer().spec(round_inputs())
    w = (10 / 60, 30 / 60, 20 / 60)
    assert spec == MergeSpec(
        "fedper", CLIENTS, (Group(CLIENTS, CLIENTS, w),), (), (None,), Reduce()
    )
    out = merge_states(spec, SCHEMA, states)
    for e in SCHEMA.entries:
        for c in CLIENTS:
            if e.role is Role.SHARED:
                expected = average(states, e.name, {k: SAMPLES[k] / 60 for k in CLIENTS})
                assert close(out[c][e.name], expected), e.name
            else:  # the MoE layer (gate and experts: the classifying head) is personal
                assert torch.equal(out[c][e.name], states[c][e.name]), e.name


def test_fedper_moves_the_shared_parts_only() -> None:
    rplan = plan_round(round_inputs(), FedPer())
    sizes = SCHEMA.sizes()
    assert rplan.ledger == server_ledger(sizes, 3, frozenset({Role.SHARED}))
    assert rplan.ledger.server_up == 3 * sizes.shared < 3 * sizes.model


# ---------------------------------------------------------------------------------------------
# IFCA


def clustered(choices: dict[int, int | None]) -> RoundInputs:
    uploads = {c: Upload(c, SAMPLES[c], 1, (), None, k) for c, k in choices.items()}
    return RoundInputs(1, SCHEMA, CLIENTS, uploads)


def test_ifca_averages_each_cluster_over_the_clients_that_chose_it(
    states: dict[int, State],
) -> None:
    spec = IFCA(clusters=3).spec(clustered({0: 2, 3: 0, 7: 2}))
    a, b = Group((3,), (3,), (1.0,)), Group((0, 7), (0, 7), (10 / 30, 20 / 30))
    assert spec.shared == spec.gate == (a, b)  # cluster 0 first, then cluster 2; 1 is unused
    assert isinstance(spec.experts[0], SameIndex) and len(spec.experts[0].groups) == 2
    out = merge_states(spec, SCHEMA, states)
    for name in states[0]:
        assert torch.equal(out[3][name], states[3][name])  # alone in its cluster
        assert close(out[0][name], average(states, name, {0: 1 / 3, 7: 2 / 3})), name
        assert out[7][name] is out[0][name]
    # a client that sat the round out keeps its model
    part = merge_states(IFCA(clusters=3).spec(clustered({0: 1, 3: 1})), SCHEMA, states)
    assert all(torch.equal(part[7][n], states[7][n]) for n in states[7])


def test_ifca_refuses_uploads_without_a_valid_cluster() -> None:
    with pytest.raises(InputError, match="client 3's checkpoint records no cluster choice"):
        IFCA().spec(clustered({0: 1, 3: None}))
    with pytest.raises(InputError, match="client 0 chose cluster 4, but ifca has 2"):
        IFCA(clusters=2).spec(clustered({0: 4}))


def test_a_client_chooses_the_candidate_with_the_lowest_train_loss() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    cands = tuple(state_of(init_model(CFG, s)) for s in (11, 12, 13))
    # the loss by hand: mean cross-entropy of each model's logits
    by_hand = []
    for s in cands:
        model = build_model(CFG, s).eval()
        with torch.no_grad():
            by_hand.append(float(torch.nn.functional.cross_entropy(model(x).logits, y)))
    assert [mean_loss(CFG, s, x, y) for s in cands] == pytest.approx(by_hand, rel=1e-6)
    choice, losses = choose(CFG, cands, x, y)
    assert losses == pytest.approx(by_hand, rel=1e-6)
    assert choice == min(range(3), key=lambda k: by_hand[k])
    assert choose(CFG, (cands[1], cands[1]), x, y)[0] == 0  # a tie goes to the lowest index


# ---------------------------------------------------------------------------------------------
# through the commands and fedmoe run


def test_train_round_with_candidates_records_each_clients_choice(
    tmp_path: Path, run_cli: Any
) -> None:
    run_in(tmp_path, *TINY_ROUND[:2])
    run_in(tmp_path, ("init", "--partition", "p.json", "--embed-hidden", "8", "--embed-dim", "4",
                      "--experts", "2", "--expert-hidden", "8", "--seed", "9", "--out",
                      "j.safetensors", "-q"))  # fmt: skip
    run_in(tmp_path, ("train-round", "--partition", "p.json", "--candidates", "i.safetensors",
                      "--candidates", "j.safetensors", "--epochs", "1", "--out", "r1", "-q"))  # fmt: skip
    manifest = json.loads((tmp_path / "r1" / "train-round.json").read_text())
    inputs = {e["path"] for e in manifest["inputs"]}
    assert inputs == {"../i.safetensors", "../j.safetensors"}
    digests = {open_checkpoint(tmp_path / n).sha256: k for k, n in
               enumerate(["i.safetensors", "j.safetensors"])}  # fmt: skip
    for row in manifest["clients"]:
        losses = row["candidate_losses"]
        assert row["cluster"] == min(range(2), key=lambda k: (losses[k], k))
        ckpt = open_checkpoint(tmp_path / "r1" / f"client-{row['client']:03d}.safetensors")
        assert ckpt.meta.cluster == row["cluster"]
        assert digests[ckpt.meta.parent_sha256] == row["cluster"]  # its parent is the choice
    # the server groups them by that choice
    run_in(tmp_path, ("aggregate", "r1/train-round.json", "--method", "ifca", "-p", "clusters=2",
                      "--out", "a1", "-q"))  # fmt: skip
    merged = {c: open_checkpoint(tmp_path / "a1" / f"client-{c:03d}.safetensors") for c in range(3)}
    for c, k in merged.items():
        assert k.meta.cluster == manifest["clients"][c]["cluster"]
    # errors: both start options, or a single candidate
    r = run_cli("train-round", "--partition", str(tmp_path / "p.json"), "--model",
               str(tmp_path / "i.safetensors"), "--candidates", str(tmp_path / "j.safetensors"),
               "--out", str(tmp_path / "x"))  # fmt: skip
    assert "either --model" in clean_failure(r, 2)
    r = run_cli("train-round", "--partition", str(tmp_path / "p.json"), "--candidates",
               str(tmp_path / "j.safetensors"), "--out", str(tmp_path / "x"))  # fmt: skip
    assert "choosing needs at least 2" in clean_failure(r, 3)
    assert not (tmp_path / "x").exists()


RECIPE = """\
seed: 1
rounds: 2
methods: [fedavg, ifca, fedprox, fedper]
method_params:
  ifca: {clusters: 1}
partition:
  scheme: domain
  clients: 4
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
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("baselines")
    (folder / "recipe.yaml").write_text(RECIPE)
    run_in(folder, ("run", "recipe.yaml", "--out", "run", "--threads", "1", "-q"))
    return folder / "run"


def rows_of(run: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k in ("seconds", "train_seconds", "method"):
            row.pop(k, None)
        out.setdefault(json.loads(line)["method"], []).append(row)
    return out


def test_ifca_with_one_cluster_is_fedavg_bit_for_bit(run: Path) -> None:
    rows = rows_of(run)
    assert rows["ifca"] == rows["fedavg"]  # accuracies and traffic, every round
    clusters = json.loads((run / "rounds" / "ifca" / "round-002" / "clusters" / "clusters.json")
                          .read_text())  # fmt: skip
    assert [r["cluster"] for r in clusters["checkpoints"]] == [0]
    assert not (run / "rounds" / "ifca" / "round-000" / "clusters").exists()  # pruned


def test_a_run_reads_back_ifca_with_one_cluster(run: Path) -> None:
    """``--resume`` reads the last round's clusters.json back; with k = 1 it holds one model,
    which a run accepts while ``train-round --candidates`` asks for two."""
    from fedmoe.io.checkpoint_set import load_candidates

    manifest = str(run / "rounds" / "ifca" / "round-002" / "clusters" / "clusters.json")
    assert [k.meta.cluster for k in load_candidates([manifest], minimum=1)] == [0]
    with pytest.raises(InputError, match="choosing needs at least 2"):
        load_candidates([manifest])


def test_fedprox_and_fedper_run_and_count_their_traffic(run: Path) -> None:
    def train(method: str) -> dict[str, Any]:
        path = run / "rounds" / method / "round-002" / "train" / "train-round.json"
        return dict(json.loads(path.read_text()))

    prox, avg = train("fedprox"), train("fedavg")
    assert prox["train_config"]["prox_mu"] == FedProx().mu and avg["train_config"]["prox_mu"] == 0
    assert [k["sha256"] for k in prox["checkpoints"]] != [k["sha256"] for k in avg["checkpoints"]]
    rows = rows_of(run)
    assert rows["fedprox"][0]["server_bytes"] == rows["fedavg"][0]["server_bytes"]
    assert rows["fedper"][0]["server_bytes"] < 0.5 * rows["fedavg"][0]["server_bytes"]
