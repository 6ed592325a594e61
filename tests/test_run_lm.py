"""``fedmoe run`` on a Hugging Face MoE language model (a recipe whose ``model:`` names a
``family``): the same bytes as the same rounds chained by hand through the commands (partition,
init, train-round, affinity, plan-sync, aggregate), model folders and all, under partial
participation (stale proxies kept as folders); the run's perplexities are those ``fedmoe
evaluate`` gives for its models; the report, table, CSV and plots speak perplexity and rank the
lowest; resume gives the same bytes; what a language model cannot run is refused cleanly."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import clean_failure, run_in

from fedmoe.run import load_recipe
from fedmoe.run.orchestrator import participants

pytest.importorskip("transformers")

Run = Callable[..., Any]
SEED = 2
RECIPE = f"""\
seed: {SEED}
rounds: 2
participation: 0.75
methods: [fedmoe-da, fedavg, local]
data:
  dataset: text-mix
partition:
  scheme: domain
  clients: 4
  alpha: 0.3
model:
  family: mixtral
  embed_dim: 16
  expert_hidden: 16
  num_experts: 4
  top_k: 2
  moe_layers: 2
train:
  epochs: 1
  batch_size: 64
  lr: 0.01
fedmoe:
  top_p: 2
  tau: 0.1
  candidates: 4
"""
TRAIN = ("--epochs", "1", "--batch-size", "64", "--lr", "0.01", "--seed", str(SEED), "-q")
METHODS = ("fedmoe-da", "fedavg", "local")


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fedmoe run`` into run/ (every round's models kept) and the same rounds by hand into
    hand/."""
    from fedmoe.run import orchestrator

    folder = tmp_path_factory.mktemp("lm-run")
    (folder / "recipe.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orchestrator, "prune_checkpoints", lambda _: None)
        run_in(folder, ("run", "recipe.yaml", "--out", "run", "-q"))
    recipe, _ = load_recipe(folder / "recipe.yaml")
    h = "hand"
    run_in(
        folder,
        ("partition", "--dataset", "text-mix", "--clients", "4", "--scheme", "domain", "--alpha",
         "0.3", "--seed", str(SEED), "--out", f"{h}/partition.json", "-q"),
        ("init", "--config", "recipe.yaml", "--partition", f"{h}/partition.json", "--seed",
         str(SEED), "--out", f"{h}/init", "-q"),
    )  # fmt: skip
    for method in METHODS:
        m = f"{h}/rounds/{method}"
        for rnd in (1, 2):
            r = f"{m}/round-{rnd:03d}"
            ids = ",".join(str(c) for c in participants(recipe, rnd, 4))
            prev = f"{h}/init" if rnd == 1 else f"{m}/round-{rnd - 1:03d}/models/aggregate.json"
            carry = ("--previous", prev) + (
                ("--partition", f"{h}/partition.json") if rnd == 1 else ()
            )
            cmds: list[tuple[str, ...]] = [
                ("train-round", "--partition", f"{h}/partition.json", "--model", prev,
                 "--client", ids, "--round", str(rnd), "--out", f"{r}/train", *TRAIN),
            ]  # fmt: skip
            if method == "fedmoe-da":
                stale = ("--stale", f"{m}/uploads") if rnd > 1 else ()
                prev_plan = (
                    ("--previous-plan", f"{m}/round-{rnd - 1:03d}/plan.json") if rnd > 1 else ()
                )
                cmds += [
                    ("affinity", f"{r}/train/train-round.json", *stale, "--candidates", "4",
                     "--partition", f"{h}/partition.json", "--out", f"{r}/affinity.json", "-q"),
                    ("plan-sync", f"{r}/affinity.json", *prev_plan, "--top-p", "2", "--tau",
                     "0.1", "--participants", ids, "--round", str(rnd), "--out",
                     f"{r}/plan.json", "-q"),
                    ("aggregate", f"{r}/train/train-round.json", "--plan", f"{r}/plan.json",
                     *carry, "--out", f"{r}/models", "-q"),
                ]  # fmt: skip
            else:
                cmds.append(
                    ("aggregate", f"{r}/train/train-round.json", "--method", method, *carry,
                     "--out", f"{r}/models", "-q")
                )  # fmt: skip
            run_in(folder, *cmds)
            if method == "fedmoe-da":  # the server keeps each client's latest upload
                for f in (folder / r / "train").glob("client-*"):
                    shutil.rmtree(folder / m / "uploads" / f.name, ignore_errors=True)
                    shutil.copytree(f, folder / m / "uploads" / f.name)
    return folder


def test_setup_is_the_same_bytes(both: Path) -> None:
    names = ["partition.json", *(f"init/{n}" for n in files_in(both / "run" / "init"))]
    assert "init/config.json" in names and "init/model.safetensors" in names
    assert files_in(both / "hand" / "init") == files_in(both / "run" / "init")
    for name in names:
        assert (both / "hand" / name).read_bytes() == (both / "run" / name).read_bytes(), name


@pytest.mark.parametrize("method", METHODS)
def test_every_round_is_the_same_bytes(both: Path, method: str) -> None:
    hand, run = both / "hand" / "rounds" / method, both / "run" / "rounds" / method
    names = [n for n in files_in(run) if not n.endswith("train-round.json")]  # timings differ
    assert names == [n for n in files_in(hand) if not n.endswith("train-round.json")]
    weights = [n for n in names if "/models/client-" in n and n.endswith(".safetensors")]
    assert len(weights) == 2 * 4  # every client gets a model folder every round
    if method == "fedmoe-da":
        assert [n for n in names if n.endswith("plan.json")] == [
            "round-001/plan.json",
            "round-002/plan.json",
        ]
        assert any(n.startswith("uploads/client-") for n in names)  # stale proxies, as folders
    for n in names:
        assert (hand / n).read_bytes() == (run / n).read_bytes(), n


def test_the_run_scores_what_evaluate_scores(both: Path, run_cli: Run) -> None:
    """The metrics line of the last round holds what ``fedmoe evaluate`` reports for the same
    models, and every method learned: its perplexity is well under the initial model's."""
    lines = [json.loads(x) for x in (both / "run" / "metrics.jsonl").read_text().splitlines()]
    part = str(both / "run" / "partition.json")
    init = run_cli("evaluate", str(both / "run" / "init"), "--partition", part, "-q")
    assert init.code == 0, init.err
    start = json.loads(init.out)["mean_local_ppl"]
    assert start > 100  # random weights: close to uniform over 256 bytes
    for method in ("fedmoe-da", "fedavg"):
        row = next(x for x in lines if x["method"] == method and x["round"] == 2)
        models = both / "run" / "rounds" / method / "round-002" / "models" / "aggregate.json"
        r = run_cli("evaluate", str(models), "--partition", part, "-q")
        assert r.code == 0, r.err
        ev = json.loads(r.out)
        for key in ("mean_local_ppl", "worst_local_ppl", "mean_global_ppl",
                    "local_ppl_by_domain", "global_ppl_by_domain"):  # fmt: skip
            assert row[key] == ev[key], key
        assert "mean_local_acc" not in row
        assert row["mean_local_ppl"] < start / 2


def test_the_report_speaks_perplexity_and_ranks_the_lowest(both: Path) -> None:
    report = json.loads((both / "run" / "report.json").read_text())
    assert report["quality"] == "perplexity"
    methods = report["methods"]
    compared = {m: methods[m]["mean_local_ppl"] for m in ("fedmoe-da", "fedavg")}
    table = report["table"]
    assert table["best"]["mean_local_ppl"] == [min(compared, key=lambda m: compared[m])]
    assert "local" in table["reference"]
    assert table["caption"][0].startswith("perplexity ppl/byte")
    local_col = [c["key"] for c in table["columns"]].index("mean_local_ppl")
    row = next(r for r in table["rows"] if r[0] == "fedmoe-da")
    assert row[local_col] == f"{methods['fedmoe-da']['mean_local_ppl']:.2f}"
    assert methods["fedavg"]["p2p_bytes_per_round"] == 0
    assert methods["fedmoe-da"]["p2p_bytes_per_round"] > 0
    head = (both / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert [c for c in head if c.startswith("local_ppl_by_domain.")] == [
        "local_ppl_by_domain.code",
        "local_ppl_by_domain.prose",
        "local_ppl_by_domain.data",
    ]
    if importlib.util.find_spec("matplotlib") is not None:  # the plot extra is installed
        assert (both / "run" / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
        assert not (both / "run" / "accuracy.png").exists()


def test_resume_continues_with_the_same_bytes(both: Path, tmp_path: Path) -> None:
    """A run stopped after fedavg's first round and before local's (its later lines and folders
    gone) resumes to the same models and metrics."""
    from fedmoe.run import orchestrator

    copy = tmp_path / "run"
    shutil.copytree(both / "run", copy)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if not (json.loads(x)["method"] == "local"
                                     or (json.loads(x)["method"] == "fedavg"
                                         and json.loads(x)["round"] == 2))]  # fmt: skip
    (copy / "metrics.jsonl").write_text("".join(x + "\n" for x in kept))
    shutil.rmtree(copy / "rounds" / "local")
    shutil.rmtree(copy / "rounds" / "fedavg" / "round-002")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orchestrator, "prune_checkpoints", lambda _: None)
        run_in(tmp_path, ("run", "recipe.yaml", "--out", "run", "--resume", "-q"))
    for method in ("fedavg", "local"):
        a, b = both / "run" / "rounds" / method, copy / "rounds" / method
        names = [n for n in files_in(a) if not n.endswith("train-round.json")]
        assert names == [n for n in files_in(b) if not n.endswith("train-round.json")]
        for n in names:
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    drop = ("seconds", "train_seconds")
    again = [{k: v for k, v in json.loads(x).items() if k not in drop}
             for x in (copy / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    first = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]
    key = lambda r: (r["method"], r["round"])  # noqa: E731
    assert sorted(again, key=key) == sorted(first, key=key)


@pytest.mark.parametrize(
    ("override", "code", "words"),
    [
        (("methods=[ifca]",), 2, "cluster models"),
        (("attack.kinds=[sign-flip]",), 2, "attack is not available for language models"),
        (("model.embed=cnn",), 2, "'model.embed'"),
        (("model.family=gpt2",), 2, "model.family"),
        (("model.embed_dim=18",), 2, "divisible by 4"),
        (("data.dataset=digits-rot",), 3, "not text"),
    ],
)
def test_what_a_language_model_cannot_run_is_refused(
    tmp_path: Path, run_cli: Run, override: tuple[str, ...], code: int, words: str
) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    args = [a for o in override for a in ("-c", o)]
    r = run_cli("run", str(tmp_path / "r.yaml"), "--out", str(out), *args)
    assert words in clean_failure(r, code)
    assert not out.exists() or not any(out.iterdir())


def test_flower_refuses_a_language_model_recipe(tmp_path: Path, run_cli: Run) -> None:
    pytest.importorskip("flwr")
    (tmp_path / "r.yaml").write_text(RECIPE)
    r = run_cli("flower", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"))
    assert "language models" in clean_failure(r, 2)
    assert not (tmp_path / "out").exists()


def test_the_shipped_recipe_builds_its_model(tmp_path: Path) -> None:
    """``recipes/tiny-moe-lm.yaml`` loads as a language-model recipe, and ``init --config`` builds
    the model it declares."""
    import yaml

    from fedmoe.io.hf_folder import HFModel
    from fedmoe.model.hf import TinyLM

    path = Path(__file__).resolve().parents[1] / "recipes" / "tiny-moe-lm.yaml"
    rec, _ = load_recipe(path)
    declared = yaml.safe_load(path.read_text())["model"]
    assert rec.language_model == TinyLM(**declared)
    shutil.copyfile(path, tmp_path / "r.yaml")
    run_in(tmp_path, ("init", "--config", "r.yaml", "--seed", "1", "--out", "init", "-q"))
    made = HFModel(tmp_path / "init")
    assert made.config.model_type == declared["family"]
    assert made.schema.num_layers == declared["moe_layers"]
    assert set(made.schema.num_experts) == {declared["num_experts"]}
    assert made.config.data["hidden_size"] == declared["embed_dim"]
    assert made.config.data["intermediate_size"] == declared["expert_hidden"]


def test_trains_experts_keeps_every_shared_tensor_of_the_initial_model(tmp_path: Path) -> None:
    """``model.trains: experts``: after a FedAvg round every client's attention, embeddings and
    norms are still the initial model's, and its experts and routers are not."""
    import torch

    from fedmoe.io.hf_folder import HFModel
    from fedmoe.model.schema import Role

    (tmp_path / "r.yaml").write_text(RECIPE)
    run_in(
        tmp_path,
        ("run", "r.yaml", "--out", "run", "-q", "-c", "model.trains=experts", "-c", "rounds=1",
         "-c", "methods=[fedavg]", "-c", "participation=1.0"),
    )  # fmt: skip
    init = HFModel(tmp_path / "run" / "init")
    after = HFModel(tmp_path / "run" / "rounds" / "fedavg" / "round-001" / "models" / "client-002")
    for entry in init.schema.entries:
        same = torch.equal(init.tensor(entry.name), after.tensor(entry.name))
        assert same == (entry.role is Role.SHARED), entry.name
