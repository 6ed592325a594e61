"""Large federations: the affinity artefact and the sync plan with their arrays in a binary
companion (``--arrays``), each participant's own plan as a byte range of one file
(``--per-client``), and the commands that read gates only (``affinity``, ``plan-sync``) running
without torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_ROUND, clean_failure, run_in

from fedmoe.io.affinity_file import load_affinity
from fedmoe.io.digest import sha256_bytes
from fedmoe.io.plan_file import load_plan, read_client_plan

ROUND = [
    ("partition", "--clients", "6", "--scheme", "domain-label", "--out", "p.json", "-q"),
    ("init", "--partition", "p.json", "--embed-hidden", "8", "--embed-dim", "6",
     "--experts", "3", "--expert-hidden", "4", "--moe-layers", "2", "--out", "i.safetensors",
     "-q"),
    ("train-round", "--partition", "p.json", "--model", "i.safetensors", "--epochs", "1",
     "--out", "r1", "-q"),
    ("affinity", "r1/", "--candidates", "5", "--out", "inline.json", "-q"),
    ("affinity", "r1/", "--candidates", "5", "--arrays", "aff.bin", "--out", "binary.json", "-q"),
    ("plan-sync", "inline.json", "--top-p", "3", "--out", "plan-inline.json", "-q"),
    ("plan-sync", "binary.json", "--top-p", "3", "--arrays", "plan.bin", "--per-client",
     "clients.jsonl", "--out", "plan-binary.json", "-q"),
    ("plan-sync", "inline.json", "--top-p", "3", "--per-client", "clients-inline.jsonl",
     "--out", "plan-inline-clients.json", "-q"),
    ("affinity", "r1/", "--candidates", "5", "--centred", "--out", "centred.json", "-q"),
    ("affinity", "r1/", "--candidates", "5", "--centred", "--arrays", "centred.bin", "--out",
     "centred-binary.json", "-q"),
    ("plan-sync", "centred.json", "--top-p", "3", "--out", "plan-centred.json", "-q"),
    ("plan-sync", "centred-binary.json", "--top-p", "3", "--arrays", "plan-centred.bin",
     "--out", "plan-centred-binary.json", "-q"),
]  # fmt: skip


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One round of six clients with two MoE layers; both artefacts written both ways."""
    folder = tmp_path_factory.mktemp("arrays")
    run_in(folder, *ROUND)
    return folder


def test_affinity_with_arrays_reads_back_as_the_inline_artefact(fed: Path) -> None:
    inline, binary = load_affinity(fed / "inline.json"), load_affinity(fed / "binary.json")
    assert binary.manifest["schema_version"] == 3 and inline.manifest["schema_version"] == 2
    assert len(binary.affinity.layers) == 2
    for a, b in zip(inline.affinity.layers, binary.affinity.layers, strict=True):
        assert a.index == b.index
        assert a.neighbours.same_as(b.neighbours)  # exact: float32 in both
        np.testing.assert_array_equal(a.by_domain, b.by_domain)
        np.testing.assert_array_equal(a.by_label, b.by_label)
    layer = binary.manifest["layers"][0]
    assert "neighbours" not in layer and "shares" not in layer["expert_domain"]
    assert layer["expert_domain"]["names"] == inline.manifest["layers"][0]["expert_domain"]["names"]
    entry = binary.manifest["arrays"]
    assert entry["path"] == "aff.bin" and entry["bytes"] == (fed / "aff.bin").stat().st_size


def test_plan_with_arrays_is_the_inline_plan(fed: Path) -> None:
    inline, binary = load_plan(fed / "plan-inline.json"), load_plan(fed / "plan-binary.json")
    assert binary.manifest["schema_version"] == 3 and "transfers" not in binary.manifest
    for a, b in zip(inline.plan.matrices, binary.plan.matrices, strict=True):
        for field in ("indptr", "sources", "weights", "similarity"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert inline.plan.transfers == binary.plan.transfers and len(inline.plan.transfers)
    assert inline.plan.ledger == binary.plan.ledger
    assert inline.manifest["uploads"] == binary.manifest["uploads"]


@pytest.mark.parametrize("name", ["plan-binary.json", "plan-inline-clients.json"])
def test_each_client_plan_holds_its_rows_fetches_and_uploads(fed: Path, name: str) -> None:
    full = load_plan(fed / name)
    index = full.client_plans
    assert index is not None
    data = index.path.read_bytes()
    assert index.sha256 == sha256_bytes(data)
    assert sorted(index.entries) == list(full.plan.participants)
    lines = data.splitlines(keepends=True)
    assert len(lines) == len(full.plan.participants)  # one line per participant, nothing else
    applied = full.plan.applied()
    for c in full.plan.participants:
        own = read_client_plan(index, c)
        offset, length, _ = index.entries[c]
        assert json.loads(data[offset : offset + length]) == own
        assert own["kind"] == "client-plan" and own["client"] == c
        assert own["affinity_sha256"] == full.manifest["affinity"]["sha256"]
        for layer, mat in zip(own["layers"], applied, strict=True):
            idx = mat.index
            for row in layer["experts"]:
                m = idx.index(c, row["expert"])
                lo, hi = int(mat.indptr[m]), int(mat.indptr[m + 1])
                expected = [
                    [*idx.key(int(s)), float(w)]
                    for s, w in zip(mat.sources[lo:hi], mat.weights[lo:hi], strict=True)
                ]
                assert row["sources"] == expected  # exact float64 weights
                assert sum(w for _, _, w in row["sources"]) == pytest.approx(1.0, abs=1e-12)
        remote = {
            sc for layer in own["layers"] for r in layer["experts"] for sc, _, _ in r["sources"]
        }
        assert own["peers"] == sorted(remote - {c})
        assert set(own["peers"]) == {t.source for t in full.plan.transfers if t.target == c}


def test_a_changed_client_plan_is_refused(fed: Path, tmp_path: Path) -> None:
    from fedmoe.errors import InputError

    full = load_plan(fed / "plan-binary.json")
    assert full.client_plans is not None
    data = bytearray(full.client_plans.path.read_bytes())
    offset, length, _ = full.client_plans.entries[2]
    data[offset + length // 2] ^= 0x01
    copy = tmp_path / "clients.jsonl"
    copy.write_bytes(bytes(data))
    index = dataclasses.replace(full.client_plans, path=copy)
    with pytest.raises(InputError, match=r"client 2's plan .* does not match the sha256"):
        read_client_plan(index, 2)
    read_client_plan(index, 0)  # the other clients' lines are intact
    with pytest.raises(InputError, match="client 99 has no plan this round"):
        read_client_plan(index, 99)


def test_a_changed_or_missing_companion_is_refused(
    fed: Path, tmp_path: Path, run_cli: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.json").write_bytes((fed / "binary.json").read_bytes())
    r = run_cli("plan-sync", "binary.json", "--top-p", "3", "--out", "plan.json")
    line = clean_failure(r, 3)
    assert "its arrays file" in line and "aff.bin is missing" in line
    data = bytearray((fed / "aff.bin").read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "aff.bin").write_bytes(bytes(data))
    r = run_cli("plan-sync", "binary.json", "--top-p", "3", "--out", "plan.json")
    line = clean_failure(r, 3)
    assert "aff.bin: its sha256 differs from the one binary.json records" in line
    assert not (tmp_path / "plan.json").exists()


def test_companion_arrays_are_validated(fed: Path, tmp_path: Path) -> None:
    """A companion whose sha256 the manifest was updated to match, but whose rows are not sorted
    (or whose weights do not sum to 1), is still refused, naming the row."""
    from safetensors.numpy import load, save

    from fedmoe.errors import InputError

    def rewrite(manifest: str, companion: str, change: Callable[[dict], None]) -> Path:
        arrays = dict(load((fed / companion).read_bytes()))
        change(arrays)
        data = save(arrays)
        (tmp_path / companion).write_bytes(data)
        doc = json.loads((fed / manifest).read_text())
        doc["arrays"]["sha256"] = sha256_bytes(data)
        (tmp_path / manifest).write_text(json.dumps(doc))
        return tmp_path / manifest

    def unsort(a: dict) -> None:
        v = a["layer-001.values"].copy()
        v[0] = v[1] - np.float32(0.1)  # row 0 now rises from its first to its second entry
        a["layer-001.values"] = v

    with pytest.raises(InputError, match="neighbour row 0 is not sorted"):
        load_affinity(rewrite("binary.json", "aff.bin", unsort))

    def heavier(a: dict) -> None:
        w = a["layer-000.weights"].copy()
        w[0] += 0.01
        a["layer-000.weights"] = w

    with pytest.raises(InputError, match=r"sum to 1\.01"):
        load_plan(rewrite("plan-binary.json", "plan.bin", heavier))

    def outside(a: dict) -> None:
        s = a["layer-000.sources"].copy()
        s[2] = 10_000
        a["layer-000.sources"] = s

    with pytest.raises(InputError, match="names column 10000"):
        load_plan(rewrite("plan-binary.json", "plan.bin", outside))


def test_affinity_and_plan_sync_run_without_torch(tmp_path: Path) -> None:
    """The server's gate-only commands never import torch (~1.5 s and ~220 MB to import)."""
    run_in(tmp_path, *TINY_ROUND)
    probe = (
        "import sys\n"
        "from fedmoe_cli.app import main\n"
        "for argv in (['affinity', 'r1/', '--arrays', 'a.bin', '-o', 'a.json', '-q'],\n"
        "             ['plan-sync', 'a.json', '--top-p', '1', '--arrays', 'p.bin',\n"
        "              '--per-client', 'c.jsonl', '-o', 'plan.json', '-q']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert len((tmp_path / "c.jsonl").read_bytes().splitlines()) == 3


def test_centred_affinity_both_ways_and_its_plans(fed: Path) -> None:
    """``--centred``: the artefact records it and each entry's plain cosine (inline as a third
    element, in the companion as ``.plain``); both read back alike and give the plan that the
    library gives from the same checkpoints."""
    from fedmoe.affinity import compute_affinity
    from fedmoe.io.checkpoint_set import client_checkpoints
    from fedmoe.plan.matrix import aggregation_matrix

    inline, binary = load_affinity(fed / "centred.json"), load_affinity(fed / "centred-binary.json")
    assert inline.manifest["centred"] is True and binary.manifest["centred"] is True
    assert "centred" not in load_affinity(fed / "inline.json").manifest
    assert all(len(e) == 3 for row in inline.manifest["layers"][0]["neighbours"] for e in row)
    assert inline.affinity.centred and binary.affinity.centred
    held = {c: k.upload() for c, k in client_checkpoints([str(fed / "r1")], "t").items()}
    lib = compute_affinity(held, 5, 10, centred=True)
    for a, b, c in zip(inline.affinity.layers, binary.affinity.layers, lib.layers, strict=True):
        assert a.neighbours.plain is not None and a.neighbours.same_as(b.neighbours)
        assert a.neighbours.same_as(c.neighbours)
        e = a.index.num_experts
        rows = np.repeat(np.arange(a.index.size), np.diff(a.neighbours.indptr))
        assert np.array_equal(rows % e, a.neighbours.indices % e)  # the same expert only
    for name in ("plan-centred.json", "plan-centred-binary.json"):
        plan = load_plan(fed / name)
        assert plan.manifest["params"]["centred"] is True
        for mat, la in zip(plan.plan.matrices, lib.layers, strict=True):
            ref = aggregation_matrix(la.neighbours, la.index, 3, 0.1)
            np.testing.assert_array_equal(mat.sources, ref.sources)
            np.testing.assert_array_equal(mat.weights, ref.weights)


def test_a_centred_artefact_with_two_element_entries_is_refused(
    fed: Path, tmp_path: Path, run_cli: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = json.loads((fed / "centred.json").read_text())
    data["layers"][0]["neighbours"][4] = [e[:2] for e in data["layers"][0]["neighbours"][4]]
    Path("a.json").write_text(json.dumps(data))
    r = run_cli("plan-sync", "a.json", "--top-p", "3", "--out", "plan.json")
    assert "neighbour row 4 has a malformed entry" in clean_failure(r, 3)
    data = json.loads((fed / "centred.json").read_text())
    data["centred"] = "yes"
    Path("b.json").write_text(json.dumps(data))
    r = run_cli("plan-sync", "b.json", "--top-p", "3", "--out", "plan.json")
    assert "'centred' must be true or false" in clean_failure(r, 3)
    assert not Path("plan.json").exists()
