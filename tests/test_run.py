"""``fedmoe run`` and ``fedmoe report`` on a tiny recipe: the run folder, report.json (golden key
structure), metrics.jsonl, determinism, resuming an interrupted run, recipe validation, exit codes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import clean_failure, running

from fedmoe.io.checkpoint import open_checkpoint
from fedmoe.model import schema_for
from fedmoe.run import load_recipe

Run = Callable[..., Any]

GOLDEN = Path(__file__).parent / "golden" / "run_report_keys.json"
METHODS = ["fedmoe-da", "fedavg", "local"]
RECIPE = """\
seed: 3
rounds: 2
methods: [fedmoe-da, fedavg, local]
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
fedmoe:
  top_p: 2
  tau: 0.1
  candidates: 4
"""
TIMINGS = ("seconds", "train_seconds")  # wall-clock fields: the only ones allowed to differ


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def same_rounds(a: Path, b: Path) -> None:
    """The two run folders' rounds/ hold the same files with the same bytes (train-round.json
    aside: it records wall-clock timings)."""
    names = [n for n in files_in(a / "rounds") if not n.endswith("train-round.json")]
    assert names == [n for n in files_in(b / "rounds") if not n.endswith("train-round.json")]
    for n in names:
        assert (a / "rounds" / n).read_bytes() == (b / "rounds" / n).read_bytes(), n


def metrics(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without its wall-clock fields, by arm (in the recipe's order), then round
    (arms run side by side append their lines in the order they finish them)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else 99,
                             r["method"], r["round"]))  # fmt: skip
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def report_numbers(folder: Path) -> dict[str, Any]:
    """report.json without its wall-clock fields and its provenance (command lines, times)."""
    report = json.loads((folder / "report.json").read_text())
    for d in report["methods"].values():
        d.pop("wall_seconds")
    for row in report["table"]["rows"]:
        row.pop()  # the seconds column
    report.pop("run")
    report.pop("environment")
    return report


def structure(obj: Any) -> Any:
    """The key structure of a JSON value: dicts by their keys, everything else by its type."""
    if isinstance(obj, dict):
        return {k: structure(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return "list"
    if isinstance(obj, bool):
        return "bool"
    if isinstance(obj, (int, float)):
        return "number"
    return "null" if obj is None else type(obj).__name__


def _main(*argv: str) -> tuple[int, str]:
    """Run the CLI in-process, returning (exit code, stdout)."""
    from fedmoe_cli.app import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(list(argv))
    code = info.value.code
    return (0 if code is None else int(code)), out.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """recipe.yaml and one complete run of it (run/), made once; returns (folder, run's stdout)."""
    folder = tmp_path_factory.mktemp("run-base")
    threads = torch.get_num_threads()
    (folder / "recipe.yaml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("FEDMOE_DEBUG", raising=False)
        # two workers: the base run's arms run side by side, each whole in a worker process
        argv = ("run", "recipe.yaml", "--out", "run", "--threads", "1", "--workers", "2", "-q")
        mp.setattr(sys, "argv", ["fedmoe", *argv])  # what the console script sees
        code, out = _main(*argv)
    torch.set_num_threads(threads)
    assert code == 0
    return folder, out


@pytest.fixture
def work(base: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the base folder (recipe.yaml and run/), as the working folder."""
    target = tmp_path / "w"
    shutil.copytree(base[0], target)
    monkeypatch.chdir(target)
    return target


RUN = ("run", "recipe.yaml", "--threads", "1", "-q")


# ---------------------------------------------------------------------------------------------
# the run folder


def test_run_folder_and_stdout(base: tuple[Path, str]) -> None:
    folder, out = base
    run = folder / "run"
    assert out == "run/report.json\n"  # stdout is the report's path, nothing else
    names = files_in(run)
    assert [n for n in names if "/" not in n] == [
        "accuracy.png", "affinity.png", "init.safetensors", "metrics.csv", "metrics.jsonl",
        "partition.json", "recipe.yaml", "report.json", "run.json", "sync_graph.png",
        "traffic.png",
    ]  # fmt: skip
    # FedMoE-DA keeps every round's affinity and plan; checkpoints only for the latest round
    da = [n for n in names if n.startswith("rounds/fedmoe-da/round-")]
    assert [n for n in da if n.endswith(".json") and "/train/" not in n and "/models/" not in n] == [
        "rounds/fedmoe-da/round-001/affinity.json", "rounds/fedmoe-da/round-001/plan.json",
        "rounds/fedmoe-da/round-002/affinity.json", "rounds/fedmoe-da/round-002/plan.json",
    ]  # fmt: skip
    for m in METHODS:
        mine = [n for n in names if n.startswith(f"rounds/{m}/round-")]
        assert not [n for n in mine if "round-001/train" in n or "round-001/models" in n]
        assert [n for n in mine if "/models/client-" in n] == [
            f"rounds/{m}/round-002/models/client-{c:03d}.safetensors" for c in range(4)
        ]
        assert f"rounds/{m}/round-002/models/aggregate.json" in mine
        assert f"rounds/{m}/round-002/train/train-round.json" in mine
        ck = open_checkpoint(run / "rounds" / m / "round-002" / "models" / "client-001.safetensors")
        assert (ck.meta.client_id, ck.meta.round, ck.meta.method, ck.meta.seed) == (1, 2, m, 3)
    # the resolved recipe: the validated recipe, defaults filled in
    rec, _ = load_recipe(folder / "recipe.yaml")
    assert yaml.safe_load((run / "recipe.yaml").read_text()) == rec.to_dict()
    assert json.loads((run / "partition.json").read_text())["num_clients"] == 4


def test_report_key_structure_is_golden(base: tuple[Path, str]) -> None:
    """The keys of report.json, not its numbers. Regenerate with ``FEDMOE_UPDATE_GOLDEN=1``."""
    report = json.loads((base[0] / "run" / "report.json").read_text())
    text = json.dumps(structure(report), indent=1) + "\n"
    if os.environ.get("FEDMOE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")  # key order included


def test_metrics_one_line_per_method_and_round(base: tuple[Path, str]) -> None:
    run = base[0] / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # arms side by side (the base run) append in the order they finish; each arm's in round order
    assert sorted((r["method"], r["round"]) for r in rows) == sorted(
        (m, k) for m in METHODS for k in (1, 2)
    )
    for m in METHODS:
        assert [r["round"] for r in rows if r["method"] == m] == [1, 2]
    sizes = schema_for(open_checkpoint(run / "init.safetensors").config).sizes()
    for r in rows:
        assert r["participants"] == 4 and r["fedavg_bytes"] == 2 * 4 * sizes.model
        assert 0.0 <= r["worst_local_acc"] <= r["mean_local_acc"] <= 1.0
        assert len(r["local_acc_by_domain"]) == len(r["global_acc_by_domain"]) == 4
        if r["method"] == "fedmoe-da":  # the round's plan's own ledger
            plan = json.loads(
                (run / "rounds" / "fedmoe-da" / f"round-{r['round']:03d}" / "plan.json").read_text()
            )
            assert (plan["round"], plan["top_p"], plan["refreshed"]) == (r["round"], 2, True)
            assert r["server_bytes"] == plan["ledger"]["server_total"]
            assert r["p2p_bytes"] == plan["ledger"]["p2p"]
            assert plan["ledger"]["server_up"] == 4 * (sizes.shared + sizes.gate)
        elif r["method"] == "fedavg":  # the whole model up and down
            assert (r["server_bytes"], r["p2p_bytes"]) == (2 * 4 * sizes.model, 0)
        else:
            assert (r["server_bytes"], r["p2p_bytes"]) == (0, 0)
    report = json.loads((run / "report.json").read_text())
    assert list(report["methods"]) == METHODS
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        d = report["methods"][m]
        assert d["rounds"] == 2 and d["per_round"]["round"] == [1, 2]
        for key in ("mean_local_acc", "worst_local_acc", "mean_global_acc"):
            assert d[key] == mine[-1][key]
            assert d["per_round"][key] == [r[key] for r in mine]
        assert d["server_bytes_per_round"] == sum(r["server_bytes"] for r in mine) / 2
        assert d["p2p_bytes_per_round"] == sum(r["p2p_bytes"] for r in mine) / 2
    assert report["domain_names"] == ["rot0", "rot90", "rot180", "rot270"]
    assert report["recipe"] == yaml.safe_load((run / "recipe.yaml").read_text())


def test_local_only_clients_never_mix(base: tuple[Path, str]) -> None:
    """Sanity of the methods as run: FedAvg ends with one model; local with four different ones."""
    rounds = base[0] / "run" / "rounds"
    names = [f"round-002/models/client-{c:03d}.safetensors" for c in range(4)]
    avg = [open_checkpoint(rounds / "fedavg" / n).state() for n in names]
    loc = [open_checkpoint(rounds / "local" / n).state() for n in names]
    for k in avg[0]:
        assert all(torch.equal(avg[0][k], a[k]) for a in avg[1:])
    assert not torch.equal(loc[0]["embed.fc1.weight"], loc[1]["embed.fc1.weight"])


# ---------------------------------------------------------------------------------------------
# determinism and resume


def test_same_seed_same_numbers(work: Path, run_cli: Run) -> None:
    """The same recipe and seed give the same files, byte for byte, and the same numbers: here the
    base run's arms ran side by side in two worker processes, this one's one after the other in
    the test process."""
    r = run_cli(*RUN, "--out", "again")
    assert (r.code, r.out) == (0, "again/report.json\n"), r.err
    assert metrics(work / "again") == metrics(work / "run")
    assert report_numbers(work / "again") == report_numbers(work / "run")
    same_rounds(work / "again", work / "run")
    r = run_cli(*RUN, "--out", "other", "-c", "seed=4", "-c", "methods=[local]")
    assert r.code == 0
    assert metrics(work / "other") != [m for m in metrics(work / "run") if m["method"] == "local"]


def test_ctrl_c_stops_arms_running_side_by_side(work: Path) -> None:
    """Ctrl-C while arms run in worker processes: one line saying what was kept and how to
    resume, exit 130, no traceback, the workers gone; ``--resume`` completes every arm."""
    import signal
    import subprocess
    import time

    cmd = [sys.executable, "-m", "fedmoe_cli.app", "run", "recipe.yaml", "--out", "cut",
           "--workers", "2", "-q", "-c", "rounds=40"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal would
    )  # fmt: skip
    path = work / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.is_file() else []
        if len({json.loads(x)["method"] for x in lines}) >= 2:
            break  # two arms are running side by side
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True,
                             text=True, check=False).stdout.split()  # fmt: skip
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "Error: interrupted; the rounds completed so far are kept in cut" in err
    assert "--resume" in err
    time.sleep(0.5)
    assert workers and [w for w in workers if running(int(w))] == []
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    report = json.loads((work / "cut" / "report.json").read_text())
    assert {m: d["rounds"] for m, d in report["methods"].items()} == dict.fromkeys(METHODS, 40)


def interrupt_at(monkeypatch: pytest.MonkeyPatch, method: str, round_: int) -> None:
    """Make the run stop (as Ctrl-C would) right after ``method`` wrote every file of ``round_``,
    before that round's line reaches metrics.jsonl."""
    from fedmoe.run import orchestrator

    real = orchestrator.append_line

    def stop_before(path: Path, line: str, repair: bool = True) -> None:
        row = json.loads(line)
        if (row["method"], row["round"]) == (method, round_):
            raise KeyboardInterrupt
        real(path, line, repair)

    monkeypatch.setattr(orchestrator, "append_line", stop_before)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(
    work: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as mp:
        interrupt_at(mp, "fedavg", 2)
        r = run_cli(*RUN, "--out", "cut")
    assert clean_failure(r, 130) == (
        "Error: interrupted; the rounds completed so far are kept in cut"
    )
    assert "Hint: continue with: fedmoe run recipe.yaml --out cut --resume" in r.err
    done = [(m["method"], m["round"]) for m in metrics(work / "cut")]
    assert done == [("fedmoe-da", 1), ("fedmoe-da", 2), ("fedavg", 1)]
    assert not (work / "cut" / "report.json").exists()
    r = run_cli(*RUN, "--out", "cut", "--resume")
    assert (r.code, r.out) == (0, "cut/report.json\n"), r.err
    assert metrics(work / "cut") == metrics(work / "run")
    assert report_numbers(work / "cut") == report_numbers(work / "run")
    same_rounds(work / "cut", work / "run")


def test_resume_reuses_the_matrix_within_the_refresh_interval(
    work: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fedmoe-da with I = 3 over 3 rounds: round 3 reuses the round-1 matrix, also after resume."""
    args = (*RUN, "-c", "methods=[fedmoe-da]", "-c", "rounds=3", "-c", "fedmoe.refresh_interval=3")
    r = run_cli(*args, "--out", "full")
    assert r.code == 0, r.err
    plans = [
        json.loads(p.read_text())
        for p in sorted((work / "full" / "rounds" / "fedmoe-da").glob("round-*/plan.json"))
    ]
    assert [(p["round"], p["matrix_round"], p["refreshed"]) for p in plans] == [
        (1, 1, True),
        (2, 1, False),
        (3, 1, False),
    ]
    assert plans[0]["layers"] == plans[1]["layers"] == plans[2]["layers"]
    assert not (work / "full" / "rounds" / "fedmoe-da" / "round-002" / "affinity.json").exists()
    with monkeypatch.context() as mp:
        interrupt_at(mp, "fedmoe-da", 3)
        assert run_cli(*args, "--out", "cut").code == 130
    r = run_cli(*args, "--out", "cut", "--resume")
    assert r.code == 0, r.err
    assert metrics(work / "cut") == metrics(work / "full")
    same_rounds(work / "cut", work / "full")


def test_resume_after_a_torn_metrics_line(
    work: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as mp:
        interrupt_at(mp, "local", 2)
        assert run_cli(*RUN, "--out", "cut").code == 130
    # the interruption hit while the round's line was being written: half a line, no newline
    line = json.dumps({"method": "local", "round": 2, "participants": 4})
    with open(work / "cut" / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(line[: len(line) // 2])
    r = run_cli(*RUN, "--out", "cut", "--resume")
    assert r.code == 0, r.err
    # the torn fragment may stay (readers skip lines that are not JSON) or go; the redone
    # round's own line must be intact
    from fedmoe.run.report import read_metrics

    rows = [{k: v for k, v in m.items() if k not in TIMINGS} for m in read_metrics(work / "cut")]
    assert rows == metrics(work / "run")
    assert json.loads((work / "cut" / "report.json").read_text())["methods"]["local"]["rounds"] == 2


def test_resume_needs_the_same_recipe(work: Path, run_cli: Run) -> None:
    before = {p: (work / "run" / p).read_bytes() for p in files_in(work / "run")}
    r = run_cli(*RUN, "--out", "run", "--resume", "-c", "rounds=3")
    line = clean_failure(r, 3)
    assert line == "Error: run: was started from a different recipe; resuming would mix two runs"
    assert {p: (work / "run" / p).read_bytes() for p in files_in(work / "run")} == before
    r = run_cli(*RUN, "--out", "nothing-here", "--resume")
    assert "nothing-here: no recipe.yaml; nothing to resume" in clean_failure(r, 3)
    # resuming a finished run changes nothing but the report's timing
    r = run_cli(*RUN, "--out", "run", "--resume")
    assert (r.code, r.out) == (0, "run/report.json\n")
    assert (work / "run" / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


# ---------------------------------------------------------------------------------------------
# recipes and overrides


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("round: 2\n", (), "recipe: unknown key 'round' (did you mean 'rounds'?)"),
        ("fedmoe:\n  topp: 2\n", (), "recipe: unknown key 'fedmoe.topp' (did you mean 'top_p'?)"),
        ("model:\n  num_expert: 2\n", (),
         "recipe: unknown key 'model.num_expert' (did you mean 'num_experts'?)"),
        ("methods: [fedmoe-da, fedavgg]\n", (),
         "recipe: unknown method 'fedavgg' (did you mean 'fedavg'?)"),
        ("methods: [fedbn]\n", (), "recipe: unknown method 'fedbn'"),
        ("rounds: 2\n", ("-c", "fedmoe.top_p=16"), "recipe: fedmoe.candidates must be >= top_p + 1"),
        ("rounds: 2\n", ("-c", "fedmoe.tau=0"), "recipe: fedmoe.tau must be > 0"),
        ("rounds: 2\n", ("-c", "rounds=0"), "recipe: rounds must be an integer >= 1"),
        ("rounds: 2\n", ("-c", "fedmoe.gate=both"), "fedmoe.gate must be one of per-client, shared, got 'both'"),
        ("rounds: 2\n", ("-c", "rounds.x=1"), "-c rounds.x: 'rounds' is not a section"),
        ("rounds: 2\n", ("-c", "rounds"), "-c 'rounds': expected key=value"),
        ("- a\n- b\n", (), "recipe: the top level must be a mapping"),
        ('participation: "half"\n', (), "recipe: participation must be a number in (0, 1]"),
        ("eval_every: true\n", (), "recipe: eval_every must be an integer >= 1, got True"),
        ("data:\n  dataset: 5\n", (), "recipe: data.dataset must be a name or a path, got 5"),
        ('partition:\n  alpha: "abc"\n', (), "recipe: partition.alpha must be a number, got 'abc'"),
        ('partition:\n  min_size: "a"\n', (),
         "recipe: partition.min_size must be an integer, got 'a'"),
        ("partition:\n  alpha: -1\n", (), "recipe: partition.alpha must be > 0, got -1"),
        ("train:\n  epochs: 2.5\n", (), "recipe: train.epochs must be an integer, got 2.5"),
    ],
)  # fmt: skip
def test_bad_recipes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Run,
    recipe: str,
    overrides: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(recipe)
    r = run_cli("run", "r.yaml", "--out", "out", *overrides)
    assert message in clean_failure(r, 2)
    assert files_in(tmp_path) == ["r.yaml"]


def test_missing_or_unreadable_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    r = run_cli("run", "nope.yaml", "--out", "out")
    assert "nope.yaml: no such recipe file" in clean_failure(r, 3)
    (tmp_path / "bad.yaml").write_text("rounds: [2\n")
    r = run_cli("run", "bad.yaml", "--out", "out")
    assert "bad.yaml: not a readable YAML recipe" in clean_failure(r, 3)
    assert not (tmp_path / "out").exists()


def test_overrides_reach_the_resolved_recipe(work: Path, run_cli: Run) -> None:
    r = run_cli(*RUN, "--out", "o", "-c", "fedmoe.top_p=1", "-c", "rounds=1",
                "-c", "methods=[local]", "-c", "partition.domains_per_client=2")  # fmt: skip
    assert r.code == 0, r.err
    resolved = yaml.safe_load((work / "o" / "recipe.yaml").read_text())
    assert resolved["fedmoe"]["top_p"] == 1 and resolved["fedmoe"]["candidates"] == 4
    assert (resolved["rounds"], resolved["methods"]) == (1, ["local"])
    assert resolved["partition"]["options"] == {"domains_per_client": 2}
    assert resolved["model"]["embed_dim"] == 8  # untouched keys stay as the file says
    assert [(m["method"], m["round"]) for m in metrics(work / "o")] == [("local", 1)]
    assert json.loads((work / "o" / "report.json").read_text())["recipe"] == resolved


def test_existing_run_folder_needs_force(work: Path, run_cli: Run) -> None:
    before = {p: (work / "run" / p).read_bytes() for p in files_in(work / "run")}
    r = run_cli(*RUN, "--out", "run")
    assert clean_failure(r, 4) == (
        "Error: run already holds a run; pass --resume to continue it or --force to start over"
    )
    assert {p: (work / "run" / p).read_bytes() for p in files_in(work / "run")} == before
    r = run_cli(*RUN, "--out", "run", "--force", "-c", "rounds=1", "-c", "methods=[local]")
    assert r.code == 0, r.err
    names = files_in(work / "run")
    assert not any(n.startswith(("plans/", "state/fedmoe-da", "state/fedavg")) for n in names)
    assert [(m["method"], m["round"]) for m in metrics(work / "run")] == [("local", 1)]


# ---------------------------------------------------------------------------------------------
# fedmoe report


def test_report_rebuilds_report_json(work: Path, run_cli: Run) -> None:
    """The same report but for where and when it was made; the run's own record (run.json,
    written by fedmoe run) is kept as it was."""

    def made(report: dict[str, Any]) -> dict[str, Any]:
        assert report.pop("environment")["command"]["argv"]
        return report

    original = made(json.loads((work / "run" / "report.json").read_text()))
    run_json = (work / "run" / "run.json").read_bytes()
    assert original["run"] == json.loads(run_json)
    assert original["run"]["command"]["argv"][1:5] == ["run", "recipe.yaml", "--out", "run"]
    (work / "run" / "report.json").unlink()
    (work / "run" / "metrics.csv").unlink()
    (work / "run" / "accuracy.png").unlink()
    r = run_cli("report", "run", "-q")
    assert (r.code, r.out) == (0, "run/report.json\n"), r.err
    assert made(json.loads((work / "run" / "report.json").read_text())) == original
    assert (work / "run" / "run.json").read_bytes() == run_json
    assert (work / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = (work / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert head[:3] == ["method", "round", "participants"]
    assert "local_acc_by_domain.rot90" in head
    r = run_cli("report", "run", "--json", "-q")
    assert r.code == 0 and made(json.loads(r.out)) == original
    r = run_cli("report", "run")
    assert r.code == 0 and "fedmoe run: accuracy %" in r.err and "÷FedAvg" in r.err


def test_report_counts_a_redone_round_once(work: Path, run_cli: Run) -> None:
    path = work / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    redone = next(
        r for r in map(json.loads, lines) if (r["method"], r["round"]) == ("fedmoe-da", 2)
    )
    redone["mean_local_acc"] = 0.5  # a round redone after an interruption: the last line wins
    path.write_text("\n".join([*lines, json.dumps(redone)]) + "\n")
    assert run_cli("report", "run", "-q").code == 0
    d = json.loads((work / "run" / "report.json").read_text())["methods"]["fedmoe-da"]
    assert d["rounds"] == 2 and d["mean_local_acc"] == 0.5


def test_report_of_a_folder_that_is_not_a_run(tmp_path: Path, run_cli: Run) -> None:
    r = run_cli("report", str(tmp_path))
    assert f"{tmp_path}: no metrics.jsonl; is this a fedmoe run folder?" in clean_failure(r, 3)


def test_two_moe_layers_end_to_end(work: Path, run_cli: Run) -> None:
    """``-c model.moe_layers=2``: the whole run works, each plan carries one matrix per MoE layer,
    transfers name their layer, and both layers' experts are merged by their own matrix."""
    r = run_cli(*RUN, "--out", "two", "-c", "model.moe_layers=2", "-c", "methods=[fedmoe-da]")
    assert r.code == 0, r.err
    rounds = work / "two" / "rounds" / "fedmoe-da"
    for rnd in (1, 2):
        plan = json.loads((rounds / f"round-{rnd:03d}" / "plan.json").read_text())
        assert [layer["layer"] for layer in plan["layers"]] == [0, 1]
        assert {t["layer"] for t in plan["transfers"]} <= {0, 1}
        aff = json.loads((rounds / f"round-{rnd:03d}" / "affinity.json").read_text())
        assert len(aff["layers"]) == 2
    ck = open_checkpoint(rounds / "round-002" / "models" / "client-000.safetensors")
    assert ck.config.moe_layers == 2 and ck.schema.num_layers == 2
    assert "blocks.0.experts.w1" in ck.names and "experts.w1" in ck.names
    report = json.loads((work / "two" / "report.json").read_text())
    assert report["methods"]["fedmoe-da"]["mean_local_acc"] is not None


def test_two_moe_layers_pooled_and_centred(work: Path, run_cli: Run) -> None:
    """``fedmoe.pool_layers: true`` with ``centred: true``: one affinity over both layers' gate
    rows, ranked on centred rows among the same expert of other clients, the same matrix for each
    layer, both recorded in the plan's parameters."""
    r = run_cli(*RUN, "--out", "pooled", "-c", "model.moe_layers=2", "-c", "methods=[fedmoe-da]",
                "-c", "fedmoe.pool_layers=true", "-c", "fedmoe.centred=true")  # fmt: skip
    assert r.code == 0, r.err
    rdir = work / "pooled" / "rounds" / "fedmoe-da" / "round-002"
    aff = json.loads((rdir / "affinity.json").read_text())
    assert aff["pooled"] is True and aff["centred"] is True
    assert aff["layers"][0]["neighbours"] == aff["layers"][1]["neighbours"]
    e = aff["layers"][0]["num_experts"]
    for m, row in enumerate(aff["layers"][0]["neighbours"]):
        assert [src % e for src, _, _ in row] == [m % e] * len(row)  # the same expert only
        assert row[0][0] == m and row[0][1] == row[0][2] == 1.0  # itself first
    plan = json.loads((rdir / "plan.json").read_text())
    assert plan["layers"][0]["targets"] == plan["layers"][1]["targets"]
    assert plan["params"]["pool_layers"] is True and plan["params"]["centred"] is True


def test_report_summarises_several_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Any
) -> None:
    """``fedmoe report A B --out S``: per method the mean, the sample standard deviation and each
    run's value, checked against the runs' own reports."""
    from helpers import clean_failure

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "rounds: 1\nmethods: [local, fedavg]\npartition: {clients: 4}\n"
        "model: {embed_hidden: 8, embed_dim: 8, num_experts: 2, expert_hidden: 8}\n"
        "train: {epochs: 1}\n"
    )
    for seed in (0, 1, 2):
        r = run_cli("run", "r.yaml", "--out", f"s{seed}", "-c", f"seed={seed}", "-q",
                    "--threads", "1")  # fmt: skip
        assert r.code == 0, r.err
    r = run_cli("report", "s0", "s1", "s2", "--out", "sum.json", "--json")
    assert r.code == 0, r.err
    summary = json.loads((tmp_path / "sum.json").read_text())
    assert summary["kind"] == "run-summary" and summary["seeds"] == [0, 1, 2]
    for method in ("local", "fedavg"):
        values = [
            json.loads((tmp_path / f"s{s}" / "report.json").read_text())["methods"][method][
                "mean_local_acc"
            ]
            for s in (0, 1, 2)
        ]
        got = summary["methods"][method]["mean_local_acc"]
        mean = sum(values) / 3
        std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
        assert got["values"] == [round(v, 6) for v in values] and got["n"] == 3
        assert got["mean"] == pytest.approx(mean, abs=1e-6)
        assert got["std"] == pytest.approx(std, abs=1e-6)
    r = run_cli("report", "s0", "s1")
    assert "several run folders: give --out FILE" in clean_failure(r, 2)
    r = run_cli("report", "s0", "s1", "--out", "sum.json")
    assert "sum.json exists" in clean_failure(r, 4)


def test_a_recipe_with_seeds_runs_once_per_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Any
) -> None:
    """``seeds: [0, 1]``: OUT/seed-S/ is the run of seed S, bit for bit the run ``-c seed=S``
    makes, and OUT/summary.json their summary; --resume of a finished multi-seed run redoes
    nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "rounds: 1\nmethods: [local, fedavg]\npartition: {clients: 4}\n"
        "model: {embed_hidden: 8, embed_dim: 8, num_experts: 2, expert_hidden: 8}\n"
        "train: {epochs: 1}\n"
    )
    r = run_cli("run", "r.yaml", "--out", "multi", "-c", "seeds=[0, 1]", "-q", "--threads", "1")
    assert r.code == 0, r.err
    assert (
        run_cli("run", "r.yaml", "--out", "one", "-c", "seed=1", "-q", "--threads", "1").code == 0
    )
    for name in ("partition.json", "init.safetensors"):
        assert (tmp_path / "multi" / "seed-1" / name).read_bytes() == (
            tmp_path / "one" / name
        ).read_bytes()
    lines = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if "seconds" not in k}
        for x in p.read_text().splitlines()
    ]
    assert lines(tmp_path / "multi" / "seed-1" / "metrics.jsonl") == lines(
        tmp_path / "one" / "metrics.jsonl"
    )
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["recipe"]["seeds"] == [0, 1]
    one = json.loads((tmp_path / "one" / "report.json").read_text())["methods"]
    assert summary["methods"]["fedavg"]["mean_local_acc"]["values"][1] == round(
        one["fedavg"]["mean_local_acc"], 6
    )
    per_seed = [
        json.loads((tmp_path / "multi" / f"seed-{s}" / "report.json").read_text())["methods"][
            "fedavg"
        ]["per_round"]["mean_local_acc"][0]
        for s in (0, 1)
    ]
    band = summary["methods"]["fedavg"]["per_round"]
    assert band["round"] == [1]
    assert band["mean_local_acc"][0] == pytest.approx(sum(per_seed) / 2, abs=1e-6)
    assert band["std_local_acc"][0] == pytest.approx(
        abs(per_seed[0] - per_seed[1]) / 2**0.5, abs=1e-6
    )
    import importlib.util

    has_plots = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "multi" / "summary.png").exists() == has_plots
    before = (tmp_path / "multi" / "seed-0" / "metrics.jsonl").read_bytes()
    r = run_cli("run", "r.yaml", "--out", "multi", "-c", "seeds=[0, 1]", "--resume", "-q")
    assert r.code == 0, r.err
    assert (tmp_path / "multi" / "seed-0" / "metrics.jsonl").read_bytes() == before
    r = run_cli("run", "r.yaml", "--out", "x", "-c", "seeds=[1, 1]")
    assert r.code == 2 and "seeds must be a list of 1 to 100 distinct integers" in r.err
