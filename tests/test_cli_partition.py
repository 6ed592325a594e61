"""``fedmoe partition`` end to end: streams, files, exit codes, the golden manifest."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import error_lines

from fedmoe import __version__
from fedmoe.errors import InputError
from fedmoe.io.partition_file import load_partition

GOLDEN = Path(__file__).parent / "golden" / "partition_digits_rot_4.json"
GOLDEN_ARGS = (
    "--dataset", "digits-rot", "--clients", "4", "--scheme", "domain", "--alpha", "0.5",
    "--seed", "7",
)  # fmt: skip
SMALL = ("partition", "--dataset", "digits-rot", "--clients", "4", "--scheme", "iid")

Run = Callable[..., Any]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (temp files included), relative and sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# streams


def test_default_prints_the_manifest_path_and_a_table(work: Path, run_cli: Run) -> None:
    r = run_cli(*SMALL)
    assert r.code == 0
    assert r.out == "partition.json\n"  # stdout is data: the path and nothing else
    manifest = json.loads((work / "partition.json").read_text())
    assert manifest["kind"] == "partition" and manifest["num_clients"] == 4
    assert "partition: iid, 4 clients" in r.err
    assert "client" in r.err and "global test" in r.err
    assert files_in(work) == ["partition.json"]


def test_out_names_the_file_and_creates_its_folder(work: Path, run_cli: Run) -> None:
    r = run_cli(*SMALL, "--out", "parts/p.json")
    assert r.code == 0 and r.out == "parts/p.json\n"
    assert files_in(work) == ["parts/p.json"]


def test_json_prints_one_object(work: Path, run_cli: Run) -> None:
    r = run_cli(*SMALL, "--json", "--out", "p.json")
    assert r.code == 0
    assert r.out.count("\n") == 1 and r.out.endswith("\n")
    obj = json.loads(r.out)
    assert obj["kind"] == "partition"
    assert obj == json.loads((work / "p.json").read_text())


def test_out_dash_prints_the_manifest_and_writes_nothing(work: Path, run_cli: Run) -> None:
    r = run_cli(*SMALL, "--out", "-")
    assert r.code == 0
    assert files_in(work) == []
    assert json.loads(r.out)["kind"] == "partition"
    # the same bytes a file output would hold
    assert run_cli(*SMALL, "--out", "p.json").code == 0
    assert r.out == (work / "p.json").read_text()


def test_quiet_keeps_stderr_empty(work: Path, run_cli: Run) -> None:
    r = run_cli(*SMALL, "--quiet")
    assert r.code == 0 and r.err == "" and r.out == "partition.json\n"


# ---------------------------------------------------------------------------------------------
# determinism and the golden manifest


def test_same_seed_same_bytes_different_seed_different(work: Path, run_cli: Run) -> None:
    for out, seed in (("a.json", "3"), ("b.json", "3"), ("c.json", "4")):
        assert run_cli(*SMALL, "--seed", seed, "--out", out, "-q").code == 0
    a, b, c = ((work / f).read_bytes() for f in ("a.json", "b.json", "c.json"))
    assert a == b
    assert a != c


def test_golden_manifest(work: Path, run_cli: Run) -> None:
    """The on-disk format, byte for byte. Regenerate with ``FEDMOE_UPDATE_GOLDEN=1``."""
    r = run_cli("partition", *GOLDEN_ARGS, "--out", "p.json", "-q")
    assert r.code == 0
    text = (work / "p.json").read_text(encoding="utf-8")
    if os.environ.get("FEDMOE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    golden = GOLDEN.read_text(encoding="utf-8")
    # a release bump alone must not break the golden file
    old = json.dumps(json.loads(golden)["fedmoe_version"])
    text = text.replace(f'"fedmoe_version": {json.dumps(__version__)}', f'"fedmoe_version": {old}')
    assert text == golden


def test_golden_manifest_content() -> None:
    """What the golden file records, checked against the invariants it must satisfy."""
    m = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert (m["schema_version"], m["kind"]) == (1, "partition")
    assert m["dataset"]["source"] == "builtin" and m["dataset"]["name"] == "digits-rot"
    assert m["dataset"]["num_samples"] == 1797 and m["dataset"]["input_shape"] == [1, 8, 8]
    assert m["scheme"] == "domain" and m["seed"] == 7 and m["num_clients"] == 4
    assert m["params"] == {"alpha": 0.5, "domains_per_client": None, "min_size": 2}
    everything = m["global_test"] + m["unassigned"]
    for c in m["clients"]:
        assert c["num_samples"] == c["num_train"] + c["num_test"] == sum(c["label_counts"])
        assert c["num_train"] == len(c["train"]) and c["num_test"] == len(c["test"])
        assert sum(c["domain_counts"]) == c["num_samples"]
        everything += c["train"] + c["test"]
    assert sorted(everything) == list(range(1797))


# ---------------------------------------------------------------------------------------------
# outputs that exist


def test_existing_output_is_refused_without_force(work: Path, run_cli: Run) -> None:
    target = work / "p.json"
    target.write_text("keep me\n")
    r = run_cli(*SMALL, "--out", "p.json")
    assert r.code == 4
    assert r.out == ""
    assert error_lines(r.err) == [
        "Error: p.json exists; pass --force to replace it or choose another --out"
    ]
    assert target.read_text() == "keep me\n"
    assert files_in(work) == ["p.json"]


def test_force_replaces_the_output(work: Path, run_cli: Run) -> None:
    (work / "p.json").write_text("old\n")
    assert run_cli(*SMALL, "--out", "p.json", "--force", "-q").code == 0
    assert run_cli(*SMALL, "--out", "fresh.json", "-q").code == 0
    assert (work / "p.json").read_bytes() == (work / "fresh.json").read_bytes()


# ---------------------------------------------------------------------------------------------
# errors: exit code, one line, no output


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--bogus",), 2),  # parser error
        (("--clients", "many"), 2),  # parser error
        (("--scheme", "dirichet"), 2),  # unknown scheme
        (("--scheme", "iid", "--alpha", "1"), 2),  # option the scheme does not use
        (("--scheme", "dirichlet", "--alpha", "0"), 2),  # bad value
        (("--clients", "5000"), 2),  # impossible: more clients than samples
        (("--scheme", "domain", "--domains-per-client", "5"), 2),  # impossible: 4 domains
        (("--scheme", "shards", "--classes-per-client", "11"), 2),  # impossible: 10 classes
        (("--global-test", "1.5"), 2),
        (("--dataset", "no-such-name"), 2),  # neither built-in nor .npz/.csv
        (("--dataset", "absent.csv"), 3),  # missing input file
        (("--dataset", "absent.npz"), 3),
    ],
)
def test_errors_are_one_line_with_exit_code_and_no_output(
    work: Path, run_cli: Run, args: tuple[str, ...], code: int
) -> None:
    r = run_cli("partition", "--clients", "4", *args, "--out", "out/p.json", "--plot", "out/p.png")
    assert r.code == code, r.err
    assert r.out == ""
    assert len(error_lines(r.err)) == 1
    assert all(line.startswith(("Error:", "Hint:")) for line in r.err.splitlines())
    assert "Traceback" not in r.err
    assert files_in(work) == []  # no output, no leftover .*.tmp


def test_missing_dataset_names_the_file(work: Path, run_cli: Run) -> None:
    r = run_cli(*SMALL[:1], "--dataset", "data/absent.npz")
    assert r.code == 3
    assert error_lines(r.err) == ["Error: data/absent.npz: no such file"]
    assert "Hint: check the --dataset path" in r.err


def test_domain_scheme_on_data_without_domains(work: Path, run_cli: Run) -> None:
    np.savez(work / "d.npz", x=np.zeros((40, 2)), y=np.arange(40) % 2)
    r = run_cli("partition", "--dataset", "d.npz", "--clients", "2", "--scheme", "domain")
    assert r.code == 2
    assert "no domain information" in error_lines(r.err)[0]
    assert files_in(work) == ["d.npz"]


def test_debug_variable_shows_the_traceback(
    work: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMOE_DEBUG", "1")
    r = run_cli(*SMALL[:1], "--dataset", "absent.npz")
    assert r.code == 3
    assert "Traceback" in r.err and "InputError" in r.err
    assert error_lines(r.err) == ["Error: absent.npz: no such file"]


def test_failure_while_writing_leaves_no_output(
    work: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the second staged file (the manifest) is written."""
    calls = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    r = run_cli(*SMALL, "--out", "out/p.json", "--plot", "out/p.png")
    assert len(calls) == 2  # the plot was staged, the manifest failed
    assert r.code != 0
    assert "No space left on device" in r.err and "Traceback" not in r.err
    assert files_in(work) == []


def test_negative_seed_is_a_usage_error(work: Path, run_cli: Run) -> None:
    r = run_cli(*SMALL, "--seed", "-1")
    assert r.code == 2
    assert "internal error" not in r.err


def test_no_arguments_prints_no_empty_error(run_cli: Run) -> None:
    r = run_cli()
    assert "Usage" in r.out + r.err
    assert all(line.strip() != "Error:" for line in r.err.splitlines())


# ---------------------------------------------------------------------------------------------
# file permissions, plots, user data


def test_outputs_follow_the_umask(work: Path, run_cli: Run) -> None:
    old = os.umask(0o022)
    try:
        assert run_cli(*SMALL, "--out", "p.json", "-q").code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((work / "p.json").stat().st_mode) == 0o644


def test_plot_writes_a_png(work: Path, run_cli: Run) -> None:
    r = run_cli(*SMALL, "--out", "p.json", "--plot", "figs/p.png", "-q")
    assert r.code == 0 and r.out == "p.json\n"
    png = (work / "figs" / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert files_in(work) == ["figs/p.png", "p.json"]


CSV_ROWS = 60


def _write_csv(path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = ["f1,target,f2,site"]
    for i in range(CSV_ROWS):
        lines.append(f"{rng.normal():.4f},{'abc'[i % 3]},{rng.normal():.4f},{'NS'[i % 2]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_csv_dataset_round_trip_and_checksum(work: Path, run_cli: Run) -> None:
    data = work / "data" / "table.csv"
    data.parent.mkdir()
    _write_csv(data)
    r = run_cli(
        "partition", "--dataset", "data/table.csv", "--label-column", "target",
        "--domain-column", "site", "--scheme", "domain-label", "--clients", "3",
        "--out", "parts/p.json", "-q",
    )  # fmt: skip
    assert r.code == 0, r.err
    manifest = json.loads((work / "parts" / "p.json").read_text())
    rec = manifest["dataset"]
    assert rec["source"] == "file"
    assert rec["path"] == "../data/table.csv"  # relative to the manifest's folder
    assert (rec["label_column"], rec["domain_column"]) == ("target", "site")
    assert rec["class_names"] == ["a", "b", "c"] and rec["domain_names"] == ["N", "S"]
    assert rec["num_samples"] == CSV_ROWS and rec["input_shape"] == [2]

    loaded = load_partition(work / "parts" / "p.json")
    assert loaded.num_clients == 3
    assert loaded.dataset.num_samples == CSV_ROWS
    for c, entry in zip(loaded.clients, manifest["clients"], strict=True):
        assert c.train.tolist() == entry["train"] and c.test.tolist() == entry["test"]
    assert loaded.global_test.tolist() == manifest["global_test"]

    data.write_text(data.read_text().replace("a,", "b,", 1), encoding="utf-8")
    with pytest.raises(InputError, match="sha256 mismatch") as info:
        load_partition(work / "parts" / "p.json")
    assert "data/table.csv" in str(info.value)


# ---------------------------------------------------------------------------------------------
# help and version (Typer's own runner)


def test_help_lists_schemes_and_examples(invoke: Callable[..., Any]) -> None:
    r = invoke("partition", "--help", env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for scheme in ("iid", "dirichlet", "domain", "domain-label", "shards", "quantity"):
        assert scheme in r.stdout
    assert "fedmoe partition --dataset digits-rot --clients 20" in r.stdout


def test_help_lists_builtin_datasets() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedmoe_cli.app", "partition", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "Built-in datasets: digits-rot (" in out  # (the examples name it anyway)


def test_version(invoke: Callable[..., Any]) -> None:
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout == f"fedmoe {__version__}\n"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["clients"][0]["train"].append(m["clients"][1]["train"][0]),
         "is in both client 0 train and client 1 train"),
        (lambda m: m["clients"][0]["test"].append(m["clients"][0]["train"][0]),
         "is in both client 0 train and client 0 test"),
        (lambda m: m["global_test"].append(m["clients"][2]["test"][0]),
         "is in both client 2 test and global_test"),
        (lambda m: m["clients"][1]["train"].append(m["clients"][1]["train"][0]),
         "an index appears twice"),
        (lambda m: m["clients"][0]["train"].__setitem__(0, 1.5),
         "indices must be a list of integers"),
        (lambda m: m["clients"][0]["train"].__setitem__(0, True),
         "indices must be a list of integers"),
    ],
)  # fmt: skip
def test_leaky_or_malformed_splits_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Any, edit: Any, message: str
) -> None:
    """A manifest whose splits overlap (evaluation on training data) or whose indices are not
    distinct integers is refused before anything reads it, naming the sample and the splits."""
    import json

    from helpers import clean_failure

    monkeypatch.chdir(tmp_path)
    r = run_cli("partition", "--dataset", "digits-rot", "--clients", "4", "--scheme", "iid",
                "--out", "p.json", "-q")  # fmt: skip
    assert r.code == 0, r.err
    manifest = json.loads((tmp_path / "p.json").read_text())
    edit(manifest)
    (tmp_path / "bad.json").write_text(json.dumps(manifest))
    before = (tmp_path / "bad.json").read_bytes()
    r = run_cli("init", "--partition", "bad.json", "--out", "i.safetensors")
    assert message in clean_failure(r, 3)
    assert not (tmp_path / "i.safetensors").exists()
    assert (tmp_path / "bad.json").read_bytes() == before
