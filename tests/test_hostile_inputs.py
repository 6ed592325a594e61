"""Hostile or unlucky inputs get a clean refusal: alias bombs in recipes, JSON nested past any
manifest's depth, an output created by another writer between the check and the publish, an
``evaluate --out`` that exists, and a ``run --force`` that cannot start (the old run is kept)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import TINY_ROUND, clean_failure, running

from fedmoe.errors import OutputError
from fedmoe.io.atomic import OutputSet

Run = Callable[..., Any]

BOMB = "\n".join(
    ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    + [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefg", "bcdefgh", strict=True)]
)
TINY = (
    "rounds: 1\nmethods: [local]\npartition: {clients: 4}\n"
    "model: {embed_hidden: 8, embed_dim: 8, num_experts: 2, expert_hidden: 8}\n"
)


def test_a_recipe_with_aliases_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bomb.yaml").write_text(BOMB + "\n")
    r = run_cli("run", "bomb.yaml", "--out", "out")
    assert "aliases are not allowed in a recipe (alias at line 2)" in clean_failure(r, 3)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["plan-sync", "aggregate"])
def test_json_nested_too_deeply_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    args = ("deep.json",) if command == "plan-sync" else ("deep.json", "--method", "fedavg")
    r = run_cli(command, *args, "--out", "o" if command == "aggregate" else "o.json")
    assert "deep.json: JSON nested too deeply to be a fedmoe manifest" in clean_failure(r, 3)


def test_an_output_created_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """The existence check and the publish are one step: a file that appears between them wins,
    and this writer fails without touching it (and without leaving its temp files)."""
    target = tmp_path / "a.json"
    other = tmp_path / "b.json"
    with pytest.raises(OutputError, match=r"a\.json exists"), OutputSet() as outputs:
        outputs.write_bytes(other, b"mine")
        outputs.write_bytes(target, b"mine")
        target.write_bytes(b"theirs")  # another writer publishes first
    assert target.read_bytes() == b"theirs"
    assert not other.exists()  # what this writer had published is taken back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_evaluate_refuses_an_existing_out_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        run_cli("partition", "--clients", "4", "--scheme", "iid", "--out", "p.json", "-q").code == 0
    )
    assert run_cli("init", "--partition", "p.json", "--out", "i.safetensors", "-q").code == 0
    (tmp_path / "e.json").write_text("keep")
    r = run_cli("evaluate", "--partition", "p.json", "i.safetensors", "--out", "e.json")
    assert "e.json exists; pass --force" in clean_failure(r, 4)  # and no table before it
    assert (tmp_path / "e.json").read_text() == "keep"


def test_a_failing_run_force_keeps_the_previous_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.yaml").write_text(TINY)
    (tmp_path / "bad.yaml").write_text(TINY + "data: {dataset: missing.csv}\n")
    assert run_cli("run", "ok.yaml", "--out", "run", "-q", "--threads", "1").code == 0
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "run").rglob("*")
              if p.is_file()}  # fmt: skip
    r = run_cli("run", "bad.yaml", "--out", "run", "--force")
    assert "missing.csv: no such file" in clean_failure(r, 3)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "run").rglob("*")
             if p.is_file()}  # fmt: skip
    assert after == before
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["methods"]) == ["local"]


def test_workers_die_with_a_killed_run(tmp_path: Path) -> None:
    """SIGKILL of ``fedmoe run`` (a crash, an OOM kill) takes its worker processes with it, so a
    pipe reading its output closes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "r.yaml").write_text(TINY.replace("rounds: 1", "rounds: 50"))
    env = {k: v for k, v in os.environ.items() if k != "FEDMOE_WORKERS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmoe_cli.app", "run", "r.yaml", "--out", "o", "--workers", "2",
         "-q"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def children() -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True,
                             text=True, check=False).stdout  # fmt: skip
        return [int(x) for x in out.split()]

    deadline = time.monotonic() + 60
    while len(children()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    workers = children()
    assert len(workers) >= 2, "the run never started its workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [w for w in workers if running(w)]
    assert alive == []


def test_a_plan_is_not_applied_to_other_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    """A plan computed from one set of uploads names their sha256; aggregating other checkpoints
    of the same clients with it is refused. An affinity artefact whose similarities are not
    cosines (NaN) is refused too."""
    monkeypatch.chdir(tmp_path)
    steps = [
        *TINY_ROUND,
        ("train-round", "--partition", "p.json", "--model", "i.safetensors", "--epochs", "1",
         "--seed", "9", "--out", "other", "-q"),
        ("affinity", "r1/train-round.json", "--out", "aff.json", "-q"),
        ("plan-sync", "aff.json", "--top-p", "1", "--out", "plan.json", "-q"),
    ]  # fmt: skip
    for argv in steps:
        assert run_cli(*argv).code == 0, argv
    r = run_cli("aggregate", "--plan", "plan.json", "other/train-round.json", "--out", "agg")
    assert "is not the checkpoint of client 0 that plan.json was computed from" in clean_failure(
        r, 3
    )
    assert not (tmp_path / "agg").exists()
    assert run_cli("aggregate", "--plan", "plan.json", "r1", "--out", "ok", "-q").code == 0
    aff = json.loads((tmp_path / "aff.json").read_text())
    aff["layers"][0]["neighbours"][0][0][1] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(aff))
    r = run_cli("plan-sync", "nan.json", "--top-p", "1", "--out", "x.json")
    assert "nan.json: not valid JSON (NaN is not a JSON number" in clean_failure(r, 3)
    aff["layers"][0]["neighbours"][0][0][1] = 1.5
    (tmp_path / "big.json").write_text(json.dumps(aff))
    r = run_cli("plan-sync", "big.json", "--top-p", "1", "--out", "x.json")
    assert "neighbour row 0 has similarity 1.5, not a cosine" in clean_failure(r, 3)


def test_report_survives_a_damaged_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    """Damaged metrics lines are left out, a damaged plan or affinity file costs only its plot."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(TINY.replace("methods: [local]", "methods: [fedmoe-da]"))
    assert run_cli("run", "r.yaml", "--out", "run", "-q", "--threads", "1").code == 0
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"method": "fedmoe-da"}\n{"method": 3, "round": "x"}\n[1, 2]\n')
    (tmp_path / "run" / "rounds" / "fedmoe-da" / "round-001" / "plan.json").write_text('{"a": 1}')
    r = run_cli("report", "run")
    assert r.code == 0, r.err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["methods"]["fedmoe-da"]["rounds"] == 1


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nanlab.npz", "'y' contains NaN or Inf"),
        ("cplx.npz", "'x' must be a real numeric array"),
        ("zero.npz", "at least one feature, got float64 (10, 0)"),
        ("one.npz", "the labels hold 1 class; a classifier needs at least 2"),
        ("ovf.csv", "features contain NaN, Inf or values beyond float32's range"),
        ("nanlab.csv", "column 'label' has empty or NaN labels"),
    ],
)
def test_user_data_that_cannot_train_a_classifier_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run, name: str, message: str
) -> None:
    import numpy as np

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    ys = np.arange(10) % 2
    if name == "nanlab.npz":
        np.savez(name, x=rng.random((10, 3)), y=np.where(ys == 0, np.nan, 1.0))
    elif name == "cplx.npz":
        np.savez(name, x=rng.random((10, 3)) + 1j, y=ys)
    elif name == "zero.npz":
        np.savez(name, x=np.zeros((10, 0)), y=ys)
    elif name == "one.npz":
        np.savez(name, x=rng.random((10, 3)), y=np.zeros(10))
    elif name == "ovf.csv":
        (tmp_path / name).write_text("a,b,label\n1,2,0\n1e40,3,1\n2,2,0\n")
    else:
        (tmp_path / name).write_text("a,b,label\n1,2,0\n1,3,nan\n2,2,1\n")
    r = run_cli("partition", "--dataset", name, "--clients", "2", "--scheme", "iid",
                "--out", "p.json")  # fmt: skip
    line = clean_failure(r, 3)
    assert message in line, line
    assert "Warning" not in r.err and not (tmp_path / "p.json").exists()


def test_temp_files_of_a_killed_writer_are_removed_by_the_next(tmp_path: Path) -> None:
    """A writer killed mid-write (SIGKILL) leaves its temp file; the next writer of the same output
    removes it (its pid is no longer running), and leaves a live writer's temp file alone."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    orphan = tmp_path / f".out.bin.{dead}-abc123.tmp"
    orphan.write_bytes(b"x" * 1000)
    live = tmp_path / f".out.bin.{os.getppid()}-def456.tmp"
    live.write_bytes(b"y")
    with OutputSet() as outputs:
        outputs.write_bytes(tmp_path / "out.bin", b"new")
    assert (tmp_path / "out.bin").read_bytes() == b"new"
    assert not orphan.exists() and live.exists()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_a_force_run_that_dies_midway_keeps_the_previous_run(tmp_path: Path, how: str) -> None:
    """``run --force`` over an existing run builds the new one beside it: killed or interrupted
    midway (after some rounds), the old run is byte for byte as it was; after Ctrl-C,
    ``--force --resume`` completes the new run and only then replaces the old one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "old.yaml").write_text(TINY)
    # 40 rounds: the new run cannot finish (and be published) between two polls below
    (tmp_path / "new.yaml").write_text(TINY.replace("rounds: 1", "rounds: 40").replace(
        "methods: [local]", "methods: [fedavg]"))  # fmt: skip
    cmd = [sys.executable, "-m", "fedmoe_cli.app", "run"]
    env = {**os.environ, "FEDMOE_WORKERS": "1"}
    subprocess.run([*cmd, "old.yaml", "--out", "run", "-q"], cwd=tmp_path, env=env, check=True)
    before = _files(tmp_path / "run")
    proc = subprocess.Popen(
        [*cmd, "new.yaml", "--out", "run", "--force", "-q"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal delivers it: not ignored, whatever this test process inherited
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    metrics = tmp_path / ".run.fedmoe-new" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the new run ended before it could be stopped"
    assert (tmp_path / ".run.fedmoe-new").is_dir(), "the new run was published before the signal"
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    assert _files(tmp_path / "run") == before, err
    if how == "SIGKILL":
        return
    assert proc.returncode == 130 and "Traceback" not in err
    assert "still holds the previous run" in err
    assert "--force --resume" in err
    r = subprocess.run([*cmd, "new.yaml", "--out", "run", "--force", "--resume", "-q"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(report["methods"]) == ["fedavg"] and report["methods"]["fedavg"]["rounds"] == 40
    assert not (tmp_path / ".run.fedmoe-new").exists()
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == []


def test_sigkill_of_aggregate_force_leaves_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    """``aggregate --force`` over an earlier output, SIGKILLed at random moments: the folder's
    manifest always matches the checkpoints it lists (the old output or the new one, never a torn
    mix), and the next writer removes what the killed one left."""
    import hashlib
    import random
    import signal
    import subprocess
    import sys
    import time

    def consistent(folder: Path) -> bool:
        manifest = json.loads((folder / "aggregate.json").read_text())
        return all(
            hashlib.sha256((folder / c["path"]).read_bytes()).hexdigest() == c["sha256"]
            for c in manifest["checkpoints"]
        )

    steps = [
        ("partition", "--clients", "6", "--scheme", "iid", "--out", "p.json", "-q"),
        ("init", "--partition", "p.json", "--out", "i.safetensors", "-q"),
        ("train-round", "--partition", "p.json", "--model", "i.safetensors", "--epochs", "1",
         "--out", "r1", "-q"),
        ("aggregate", "--method", "fedavg", "r1", "--out", "agg", "-q"),
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for argv in steps:
        assert run_cli(*argv).code == 0, argv
    rng = random.Random(7)
    for delay in [rng.uniform(0.2, 3.0) for _ in range(4)]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmoe_cli.app", "aggregate", "--method", "naive-moe", "r1",
             "--out", "agg", "--force", "-q"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert consistent(tmp_path / "agg"), f"torn output after {delay:.2f} s"
    assert (
        run_cli("aggregate", "--method", "fedavg", "r1", "--out", "agg", "--force", "-q").code == 0
    )
    assert consistent(tmp_path / "agg")
    assert [p.name for p in (tmp_path / "agg").iterdir() if p.name.endswith(".tmp")] == []


def test_two_runs_into_one_folder_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Run
) -> None:
    """While one ``fedmoe run`` holds a folder, a second one into it is refused (exit 4) instead of
    mixing the two runs' files."""
    from fedmoe.io.run_folder import run_lock

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(TINY)
    with run_lock(tmp_path / "o"):
        r = run_cli("run", "r.yaml", "--out", "o")
        assert "o is in use by another fedmoe run" in clean_failure(r, 4)
        assert not (tmp_path / "o").exists()
    assert run_cli("run", "r.yaml", "--out", "o", "-q", "--threads", "1").code == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_finaliser_still_stops_the_run() -> None:
    """Python drops a KeyboardInterrupt raised inside a finaliser; ``fedmoe run`` remembers the
    signal and raises it again at the next round boundary, so an interrupted run is never
    published."""
    import gc
    import os
    import signal

    from fedmoe_cli.run import _CTRL_C

    class Finalised:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here; Python drops its raise

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it
    with _CTRL_C:
        Finalised()
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            _CTRL_C.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    with _CTRL_C:
        _CTRL_C.check()  # a new run starts clean
    signal.signal(signal.SIGINT, before)
