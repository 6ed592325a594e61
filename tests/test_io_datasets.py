"""Only ``fedmoe.io`` reads data: lazy partition loading, ``init`` from the manifest alone, and a
static check that ``fedmoe/data/`` opens no file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import run_in

import fedmoe.data
import fedmoe.io.datasets
import fedmoe.io.partition_file
from fedmoe.data import Dataset, DataSpec
from fedmoe.errors import InputError
from fedmoe.io.partition_file import load_partition

DATA_PACKAGE = Path(fedmoe.data.__file__).parent
PARTITION = (
    "partition", "--dataset", "digits-rot", "--clients", "4", "--scheme", "domain",
    "--alpha", "0.5", "--seed", "3", "--out", "p.json", "-q",
)  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding p.json: digits-rot split over 4 clients by domain."""
    folder = tmp_path_factory.mktemp("io-datasets")
    run_in(folder, PARTITION)
    return folder


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list[DataSpec]:
    """Make every way of loading a dataset raise; returns the specs it was asked for."""
    calls: list[DataSpec] = []

    def refuse(spec: DataSpec) -> Dataset:
        calls.append(spec)
        raise AssertionError(f"the dataset {spec.source} was loaded")

    def refuse_raw() -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("raw digits were read")

    monkeypatch.setattr(fedmoe.io.datasets, "load_dataset", refuse)
    monkeypatch.setattr(fedmoe.io.partition_file, "load_dataset", refuse)
    monkeypatch.setitem(fedmoe.io.datasets.RAW_READERS, "uci-digits", refuse_raw)
    return calls


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> list[DataSpec]:
    """Count the loads that ``LoadedPartition.dataset`` makes (the real loader still runs)."""
    calls: list[DataSpec] = []
    real = fedmoe.io.datasets.load_dataset

    def count(spec: DataSpec) -> Dataset:
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(fedmoe.io.partition_file, "load_dataset", count)
    return calls


def _tampered(made: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    manifest = json.loads((made / "p.json").read_text())
    edit(manifest)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(manifest))
    return path


# ---------------------------------------------------------------------------------------------
# load_partition reads the manifest only


def test_load_partition_answers_shapes_and_names_without_the_data(
    made: Path, no_loading: list[DataSpec]
) -> None:
    manifest = json.loads((made / "p.json").read_text())
    part = load_partition(made / "p.json")
    assert part.input_shape == (1, 8, 8)
    assert part.num_classes == 10
    assert part.class_names == tuple(str(i) for i in range(10))
    assert part.domain_names == ("rot0", "rot90", "rot180", "rot270")
    assert part.num_domains == 4
    assert part.num_samples == 1797
    assert part.num_clients == 4
    for c, entry in enumerate(manifest["clients"]):
        counts = part.domain_counts(c)
        assert counts == entry["domain_counts"]
        assert sum(counts) == entry["num_samples"]
        assert part.dominant_domain(c) == int(np.argmax(entry["domain_counts"]))
        assert part.client(c).train.tolist() == entry["train"]
    assert no_loading == []


def test_manifest_answers_match_the_loaded_dataset(made: Path, counting: list[DataSpec]) -> None:
    part = load_partition(made / "p.json")
    assert counting == []
    data = part.dataset
    assert (part.input_shape, part.num_classes) == (data.input_shape, data.num_classes)
    assert (part.class_names, part.domain_names) == (data.class_names, data.domain_names)
    assert part.num_samples == data.num_samples
    for c in range(part.num_clients):
        split = part.client(c)
        held = np.concatenate([split.train, split.test])
        counts = np.bincount(data.domain[held], minlength=data.num_domains)
        assert part.domain_counts(c) == counts.tolist()


def test_dataset_is_loaded_once_and_checked(made: Path, counting: list[DataSpec]) -> None:
    part = load_partition(made / "p.json")
    first = part.dataset
    assert part.dataset is first
    assert counting == [DataSpec("digits-rot")]
    assert first.fingerprint() == json.loads((made / "p.json").read_text())["dataset"]["sha256"]


def test_tampered_fingerprint_fails_on_first_use_of_the_dataset(made: Path, tmp_path: Path) -> None:
    path = _tampered(made, tmp_path, lambda m: m["dataset"].__setitem__("sha256", "0" * 64))
    part = load_partition(path)  # nothing is loaded yet, so nothing is wrong yet
    assert part.num_classes == 10
    with pytest.raises(InputError, match="no longer matches the manifest's fingerprint") as info:
        _ = part.dataset
    assert str(path) in str(info.value) and "digits-rot" in str(info.value)
    assert "re-run fedmoe partition" in (info.value.hint or "")


def test_unknown_client_and_inconsistent_names_are_input_errors(
    made: Path, tmp_path: Path, no_loading: list[DataSpec]
) -> None:
    part = load_partition(made / "p.json")
    with pytest.raises(InputError, match=r"no client 4 \(the partition has clients 0..3\)"):
        part.domain_counts(4)
    path = _tampered(made, tmp_path, lambda m: m["dataset"].__setitem__("num_classes", 9))
    with pytest.raises(InputError, match="dataset 'num_classes' is 9 but it lists 10 names"):
        load_partition(path)
    path = _tampered(made, tmp_path, lambda m: m["clients"][1].__setitem__("domain_counts", [1]))
    with pytest.raises(InputError, match="client 1: 'domain_counts' has 1 entries"):
        load_partition(path).dominant_domain(1)
    assert no_loading == []


def test_a_changed_data_file_is_still_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(24, 3)), y=np.arange(24) % 3, domain=np.arange(24) % 2)
    run_in(tmp_path, ("partition", "--dataset", "d.npz", "-n", "2", "--out", "p.json", "-q"))
    part = load_partition(tmp_path / "p.json")
    assert (part.input_shape, part.num_domains) == ((3,), 2)
    np.savez(data, x=rng.normal(size=(24, 3)), y=np.arange(24) % 3, domain=np.arange(24) % 2)
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_partition(tmp_path / "p.json")


# ---------------------------------------------------------------------------------------------
# fedmoe init --partition


def test_init_from_a_partition_reads_no_data(
    made: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Callable[..., Any],
    no_loading: list[DataSpec],
) -> None:
    monkeypatch.chdir(tmp_path)
    r = run_cli(
        "init", "--partition", str(made / "p.json"), "--experts", "2", "--embed-dim", "4",
        "--embed-hidden", "4", "--expert-hidden", "4", "--out", "init.safetensors", "--json",
        "-q",
    )  # fmt: skip
    assert r.code == 0, r.err
    config = json.loads(json.loads(r.out)["model_config"])
    assert config["input_shape"] == [1, 8, 8] and config["num_classes"] == 10
    assert (tmp_path / "init.safetensors").is_file()
    assert no_loading == []


# ---------------------------------------------------------------------------------------------
# fedmoe.data stays in memory

FILE_ACCESS = re.compile(r"open\(|np\.load|loadtxt|read_text|gzip")


@pytest.mark.parametrize("path", sorted(DATA_PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_data_package_opens_no_file(path: Path) -> None:
    hits = [
        f"{path.name}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text("utf-8").splitlines(), start=1)
        if FILE_ACCESS.search(line)
    ]
    assert hits == []


def test_data_imports_no_io_and_atomic_no_manifest() -> None:
    code = (
        "import sys, fedmoe.data, fedmoe.io.atomic;"
        "from fedmoe.data import BUILTIN;"
        "print(sorted(m for m in sys.modules if m in ('fedmoe.io.datasets', 'fedmoe.io.manifest')),"
        " sorted((k, v.summary[:11]) for k, v in BUILTIN.items()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == (
        "[] [('digits-rot', 'UCI digits,'), ('digits-style', 'UCI digits,'), "
        "('mnist1d-shift', 'MNIST-1D (n'), ('text-mix', 'text for by')]"
    )


def test_sha256_helpers_are_still_importable_from_manifest() -> None:
    from fedmoe.io import digest, manifest

    assert manifest.sha256_file is digest.sha256_file
    assert manifest.sha256_bytes is digest.sha256_bytes
