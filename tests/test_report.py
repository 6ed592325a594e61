"""The run report on hand-made run folders (no training): metrics.csv against metrics.jsonl, the
comparison table's marks, the data each figure draws (client ids, domains, evaluated rounds),
run.json and the report's environment, and ``fedmoe report`` without torch."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmoe.run.figures import affinity_view, client_domains, quality_series, sync_view
from fedmoe.run.metrics_csv import metrics_csv
from fedmoe.run.provenance import read_run_info, record_run
from fedmoe.run.report import build_report, combine_reports
from fedmoe.run.results_table import results_table

DOMAINS = ["rot0", "rot90"]


def row(method: str, rnd: int, acc: float | None, **extra: Any) -> dict[str, Any]:
    """A metrics line; ``acc`` None: a round without evaluation (``eval_every`` > 1)."""
    out: dict[str, Any] = {
        "method": method,
        "round": rnd,
        "participants": 4,
        "server_bytes": 1000 * rnd,
        "p2p_bytes": 0,
        "fedavg_bytes": 4000,
    }
    if acc is not None:
        out |= {
            "mean_local_acc": acc,
            "worst_local_acc": acc / 2,
            "mean_global_acc": 1 - acc,
            "local_acc_by_domain": [acc, acc / 3],
            "global_acc_by_domain": [0.25, None],
        }
    return out | extra | {"seconds": 0.5}


METRICS = [
    row("fedmoe-da", 1, None, matrix_round=1, sources_other_client=0.75),
    row("fedmoe-da", 2, 0.6, matrix_round=2, sources_other_client=0.5),
    row("fedavg", 1, None),
    row("fedavg", 2, 0.5),
    row("oracle-domain", 1, None),
    row("oracle-domain", 2, 0.9),
    row("local", 1, None),
    row("local", 2, 0.7),
]


# ---------------------------------------------------------------------------------------------
# metrics.csv


def test_metrics_csv_holds_the_jsonl_values_in_flat_stable_columns() -> None:
    rows = [*METRICS, row("fedavg", 2, 0.55), row("x@noise", 1, 0.1, attack="noise", malicious=[1])]
    text = metrics_csv(rows, DOMAINS)
    table = list(csv.reader(io.StringIO(text)))
    head, body = table[0], table[1:]
    assert head == [
        "method", "round", "participants", "attack",
        "mean_local_acc", "worst_local_acc", "mean_global_acc",
        "local_acc_by_domain.rot0", "local_acc_by_domain.rot90",
        "global_acc_by_domain.rot0", "global_acc_by_domain.rot90",
        "server_bytes", "p2p_bytes", "fedavg_bytes", "matrix_round", "sources_other_client",
        "malicious", "seconds",
    ]  # fmt: skip
    kept = [r for i, r in enumerate(rows) if i != 3]  # fedavg round 2 redone: the last line wins
    assert [(r[0], r[1]) for r in body] == [(r["method"], str(r["round"])) for r in kept]
    for line, src in zip(body, kept, strict=True):
        cells = dict(zip(head, line, strict=True))
        for key, value in src.items():
            if key.endswith("_by_domain"):
                for name, v in zip(DOMAINS, value, strict=True):
                    assert cells[f"{key}.{name}"] == ("" if v is None else json.dumps(v))
            elif isinstance(value, str):
                assert cells[key] == value
            else:
                assert json.loads(cells[key]) == value, key
        assert all(cells[k] == "" for k in head if k not in src and "_by_domain." not in k)
    assert metrics_csv(rows, DOMAINS) == text  # the same log, the same bytes
    # no domain names (or not as many as the lists): the columns are the domains' indices
    assert "local_acc_by_domain.1" in metrics_csv(METRICS, [])


# ---------------------------------------------------------------------------------------------
# the comparison table


def test_best_method_is_marked_references_are_not_ranked() -> None:
    report = build_report(METRICS, {}, DOMAINS)
    table = report["table"]
    # oracle-domain (0.9) and local (0.7) are higher, but they are references
    assert table["best"]["mean_local_acc"] == ["fedmoe-da"]
    assert table["best"]["worst_local_acc"] == ["fedmoe-da"]
    assert table["best"]["mean_global_acc"] == ["fedavg"]  # 1 - 0.5 beats 1 - 0.6
    assert set(table["reference"]) == {"oracle-domain", "local"}
    assert [c["header"] for c in table["columns"]] == [
        "method", "local", "worst", "global", "server", "p2p", "÷FedAvg", "s"
    ]  # fmt: skip
    assert table["rows"][0] == [
        "fedmoe-da",
        "60.0",
        "30.0",
        "40.0",
        "0.001",
        "0.000",
        "0.38",
        "1.0",
    ]
    caption = "\n".join(table["caption"])
    for col in table["columns"][1:]:  # every column explained
        assert f"\n{col['header']}: " in caption
    assert "oracle-domain is given the true domains" in caption


def test_ties_as_printed_are_all_marked_and_attacked_arms_are_not_ranked() -> None:
    rows = [
        row("a", 1, 0.61234),
        row("b", 1, 0.61249),  # both print as 61.2
        row("c", 1, 0.6),
        row("a@signflip", 1, 0.99, attack="signflip"),
    ]
    table = build_report(rows, {}, [])["table"]
    assert table["best"]["mean_local_acc"] == ["a", "b"]
    assert [c["header"] for c in table["columns"]][4] == "drop"  # attacked: the drop column
    assert any("attacked arms" in line for line in table["caption"])


def test_a_variant_of_a_reference_method_is_a_reference() -> None:
    recipe = {"variants": {"oracle-2": {"method": "oracle-domain"}}}
    methods = build_report([row("oracle-2", 1, 0.9), row("fedavg", 1, 0.1)], recipe, [])["methods"]
    table = results_table(methods, recipe)
    assert list(table["reference"]) == ["oracle-2"]
    assert table["best"]["mean_local_acc"] == ["fedavg"]


def test_summary_table_marks_the_best_mean_and_says_mean_and_std() -> None:
    reports = [
        build_report([row("fedmoe-da", 1, a), row("fedavg", 1, b), row("local", 1, 0.99)], {}, [])
        for a, b in ((0.6, 0.5), (0.4, 0.7))  # means 0.5 and 0.6: fedavg best
    ]
    reports[0]["recipe"] = {"seed": 0}
    reports[1]["recipe"] = {"seed": 1}
    table = combine_reports(reports, ["s0", "s1"])["table"]
    assert table["best"]["mean_local_acc"] == ["fedavg"]
    assert list(table["reference"]) == ["local"]
    assert "mean ± std" in table["caption"][0] and "seeds 0, 1" in table["caption"][0]
    assert table["rows"][1][1] == f"60.0±{100 * np.std([0.5, 0.7], ddof=1):.1f}"
    assert table["columns"][-1]["header"] == "n" and table["rows"][0][-1] == "2"


# ---------------------------------------------------------------------------------------------
# the figures' data


def test_accuracy_lines_join_the_evaluated_rounds() -> None:
    rows = [row("fedavg", 1, 0.2), row("fedavg", 2, None), row("fedavg", 3, 0.4)]
    series = quality_series(build_report(rows, {}, []))
    assert series["mean_local_acc"]["fedavg"] == ([1, 3], [0.2, 0.4])
    assert series["mean_global_acc"]["fedavg"] == ([1, 3], [0.8, 0.6])


PARTITION = {
    "dataset": {"domain_names": DOMAINS},
    "clients": [
        {"id": 3, "domain_counts": [1, 9]},
        {"id": 7, "domain_counts": [8, 2]},
        {"id": 12, "domain_counts": [0, 5]},
        {"id": 20, "domain_counts": [5, 5]},  # a tie: the lower domain
    ],
}


def test_client_domains_from_the_partition() -> None:
    assert client_domains(PARTITION) == ({3: 1, 7: 0, 12: 1, 20: 0}, DOMAINS)


PLAN = {
    "round": 4,
    "clients": [3, 7, 12],  # partial participation: 20 is not in this plan, 7 did not train
    "participants": [3, 12],
    "layers": [
        {
            "layer": 0,
            "num_experts": 2,
            "targets": [
                {"client": 3, "expert": 0, "sources": [
                    {"client": 3, "expert": 0, "weight": 0.5},
                    {"client": 12, "expert": 1, "weight": 0.5}]},
                {"client": 3, "expert": 1, "sources": [
                    {"client": 12, "expert": 0, "weight": 0.25},
                    {"client": 7, "expert": 0, "weight": 0.75}]},
                {"client": 12, "expert": 0, "sources": [
                    {"client": 3, "expert": 1, "weight": 1.0}]},
            ],
        }
    ],
}  # fmt: skip


def test_sync_graph_nodes_are_client_ids_grouped_by_domain() -> None:
    domains, names = client_domains(PARTITION)
    view = sync_view(PLAN, domains, names)
    assert view.nodes == (7, 3, 12)  # rot0 first, then rot90, by id within a domain
    assert view.group_names == ("rot0", "rot90", "rot90")
    assert view.active == (False, True, True)
    # 3's two merged rows: 12 gives (0.5 + 0.25) / 2, 7 gives 0.75 / 2; 12's one row: 3 gives 1
    assert view.edges == ((3, 12, 1.0), (7, 3, 0.375), (12, 3, 0.375))
    assert view.within_domain == pytest.approx(1.375 / 1.75, abs=1e-6)


def test_sync_graph_without_merge_rows_counts_transfers() -> None:
    plan = {"round": 1, "clients": [3, 7], "sizes": {"num_experts": [4]},
            "transfers": [{"from": 7, "to": 3, "layer": 0, "experts": [0, 2]}]}  # fmt: skip
    view = sync_view(plan, {3: 1, 7: 0}, DOMAINS)
    assert view.edges == ((7, 3, 0.5),) and "pulled" in view.weight


AFFINITY = {
    "round": 4,
    "clients": [3, 7, 12],
    "summary": {"nearest_same_dominant_domain": 0.5},
    "layers": [
        {
            "layer": 0,
            "num_experts": 2,  # client-expert m = position · 2 + expert
            "neighbours": [
                [[0, 1.0], [4, 0.9], [2, 0.8], [5, 0.7]],  # 3/e0: best 12 → 0.9, 7 → 0.8
                [[1, 1.0], [3, 0.6]],  # 3/e1: 7 → 0.6, 12 unlisted
                [[2, 1.0], [0, 0.8]],  # 7/e0: 3 → 0.8
                [[3, 1.0]],  # 7/e1: nothing else listed
                [[4, 1.0], [0, 0.9]],  # 12/e0: 3 → 0.9
                [[5, 1.0], [1, 0.5], [2, 0.4]],  # 12/e1: 3 → 0.5, 7 → 0.4
            ],
        }
    ],
}


def test_affinity_view_is_a_client_by_client_similarity() -> None:
    domains, names = client_domains(PARTITION)
    view = affinity_view(AFFINITY, domains, names)
    assert view.clients == (7, 3, 12) and view.group_names == ("rot0", "rot90")
    nan = np.nan
    expected = np.array(
        [
            [nan, 0.8, nan],  # 7 → 3: only 7/e0 lists 3; 7 → 12: never listed
            [(0.8 + 0.6) / 2, nan, 0.9],  # 3 → 7, 3 → 12 (only 3/e0 lists 12)
            [0.4, (0.9 + 0.5) / 2, nan],  # 12 → 7, 12 → 3
        ]
    )
    np.testing.assert_allclose(view.matrix, expected)
    # where the other-client candidates lie: 7's one (on 3) in rot90; rot90's seven (3 → 7
    # twice, 12 → 7 once; 3 → 12 twice, 12 → 3 twice) three in rot0 and four in rot90
    np.testing.assert_allclose(view.block, [[0.0, 1.0], [3 / 7, 4 / 7]])
    assert view.nearest_same_domain == 0.5


# ---------------------------------------------------------------------------------------------
# a hand-made run folder through fedmoe report


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A run folder with what ``fedmoe report`` reads: metrics, recipe, partition, run.json, the
    latest FedMoE-DA plan and affinity."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    (run / "recipe.yaml").write_text("seed: 5\nrounds: 2\n")
    (run / "partition.json").write_text(json.dumps(PARTITION))
    rdir = run / "rounds" / "fedmoe-da" / "round-002"
    rdir.mkdir(parents=True)
    (rdir / "plan.json").write_text(json.dumps(PLAN))
    (rdir / "affinity.json").write_text(json.dumps(AFFINITY))
    record_run(run, ["/venv/bin/fedmoe", "run", "r.yaml", "--out", "run", "-c", "rounds=2"])
    return run


ENV_KEYS = ["python", "implementation", "fedmoe", "numpy", "torch", "platform", "machine"]


def test_report_records_the_runs_command_and_both_environments(folder: Path, run_cli: Any) -> None:
    r = run_cli("report", str(folder))
    assert r.code == 0, r.err
    report = json.loads((folder / "report.json").read_text())
    run = report["run"]
    assert run["kind"] == "run-info" and run["resumed"] == []
    assert run["command"]["argv"] == ["fedmoe", "run", "r.yaml", "--out", "run", "-c", "rounds=2"]
    assert run["command"]["line"] == "fedmoe run r.yaml --out run -c rounds=2"
    assert list(run["environment"]) == ENV_KEYS
    assert run["started_utc"].endswith("Z") and len(run["started_utc"]) == 20
    env = report["environment"]
    assert list(env) == [*ENV_KEYS, "command", "utc"]
    import numpy
    import torch

    assert env["numpy"] == numpy.__version__
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    # the table on stderr: marks and caption
    assert "fedmoe-da" in r.err and "60.0*" in r.err and "oracle-domain †" in r.err
    assert "† reference, not ranked" in r.err
    # metrics.csv beside metrics.jsonl
    assert (folder / "metrics.csv").read_text() == metrics_csv(METRICS, DOMAINS)


def test_resume_entries_are_appended(folder: Path) -> None:
    record_run(folder, ["fedmoe", "run", "r.yaml", "--out", "run", "--resume"], resumed=True)
    info = read_run_info(folder)
    assert info is not None
    assert info["command"]["argv"][-1] == "rounds=2"
    assert [e["command"]["argv"][-1] for e in info["resumed"]] == ["--resume"]
    for damaged in (b"{not json", b"\xff\xfe", b'{"kind": "run-info", "x": ' + b"[" * 50 + b"]" * 50
                    + b"}", b'{"kind": "other"}'):  # fmt: skip
        (folder / "run.json").write_bytes(damaged)
        assert read_run_info(folder) is None, damaged


def test_a_damaged_run_folder_costs_only_what_is_damaged(folder: Path, run_cli: Any) -> None:
    """A damaged run.json, plan or partition: the report is made, without that part."""
    (folder / "run.json").write_bytes(b"\xff\xfe")
    (folder / "partition.json").write_bytes(b"\xff")
    (folder / "rounds" / "fedmoe-da" / "round-002" / "plan.json").write_text('{"clients": 5}')
    r = run_cli("report", str(folder), "-q")
    assert r.code == 0, r.err
    report = json.loads((folder / "report.json").read_text())
    assert report["run"] is None and report["domain_names"] == []
    assert not (folder / "sync_graph.png").exists()


def test_the_plots_get_client_ids_and_domains(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What write_plots hands the drawing functions for the hand-made folder."""
    pytest.importorskip("matplotlib")
    from fedmoe import plots
    from fedmoe.run.figures import write_plots

    seen: dict[str, Any] = {}

    def capture(name: str) -> Any:
        def draw(*args: Any) -> bytes:
            seen[name] = args
            return b"\x89PNG fake"

        return draw

    for name in ("accuracy_panels", "client_similarity", "sync_graph"):
        monkeypatch.setattr(plots, name, capture(name))
    report = build_report(METRICS, {}, DOMAINS)
    written = write_plots(folder, report)
    assert sorted(p.name for p in written) == [
        "accuracy.png", "affinity.png", "sync_graph.png", "traffic.png"
    ]  # fmt: skip
    nodes, groups, names, active, edges = seen["sync_graph"][:5]
    assert nodes == (7, 3, 12) and names == ("rot0", "rot90", "rot90") and groups == (0, 1, 1)
    assert active == (False, True, True)
    assert {s for s, _, _ in edges} | {t for _, t, _ in edges} == {3, 7, 12}
    assert seen["client_similarity"][2] == (7, 3, 12)
    panels, refs, ylabel, scale, score = seen["accuracy_panels"]
    assert [title.split(":")[0] for title, _ in panels] == ["personalised", "global"]
    assert panels[0][1]["fedavg"] == ([2], [0.5]) and refs == {"oracle-domain", "local"}
    assert (ylabel, scale, score) == ("accuracy (%)", 100.0, "accuracy")


def test_real_plots_are_pngs(folder: Path) -> None:
    pytest.importorskip("matplotlib")
    from fedmoe.run.figures import write_plots

    for path in write_plots(folder, build_report(METRICS, {}, DOMAINS)):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path.name


def test_plots_drawn_in_worker_processes_are_the_same_bytes(folder: Path, tmp_path: Path) -> None:
    """``fedmoe run`` draws the plots in its worker processes: the same files, byte for byte, as
    drawn in one process, every plot written."""
    pytest.importorskip("matplotlib")
    import multiprocessing
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from fedmoe.run.figures import write_plots

    report = build_report(METRICS, {}, DOMAINS)
    alone = write_plots(folder, report)
    other = tmp_path / "copy"
    shutil.copytree(folder, other)
    for path in alone:
        (other / path.name).unlink()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        side = write_plots(other, report, pool.submit)
    assert [p.name for p in side] == [p.name for p in alone] and len(alone) == 4
    for a, b in zip(alone, side, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_fedmoe_report_does_not_import_torch(folder: Path) -> None:
    code = (
        "import sys\n"
        "from fedmoe_cli.app import main\n"
        "try:\n"
        f"    main(['report', {str(folder)!r}, '-q'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(sorted(m for m in ('torch', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr
    report = json.loads((folder / "report.json").read_text())
    assert report["environment"]["torch"] is not None  # read from the package metadata


# ---------------------------------------------------------------------------------------------
# language models: perplexity, lower is better


def ppl_row(method: str, rnd: int, ppl: float | None, **extra: Any) -> dict[str, Any]:
    """A language model's metrics line (per-byte perplexity; None: not evaluated)."""
    out = {k: v for k, v in row(method, rnd, None).items() if k != "seconds"}
    if ppl is not None:
        out |= {
            "mean_local_ppl": ppl,
            "worst_local_ppl": ppl + 2,
            "mean_global_ppl": ppl + 1,
            "local_ppl_by_domain": [ppl, ppl * 2],
            "global_ppl_by_domain": [ppl, None],
        }
    return out | extra | {"seconds": 0.5}


def test_a_perplexity_run_ranks_the_lowest_and_measures_drops_upwards() -> None:
    rows = [
        ppl_row("fedmoe-da", 1, None),
        ppl_row("fedmoe-da", 2, 4.004),
        ppl_row("fedavg", 2, 4.501),
        ppl_row("naive-moe", 2, 4.0),  # prints as 4.00, the same as fedmoe-da's 4.004: a tie
        ppl_row("local", 2, 3.0),  # a reference: lower, but not ranked
        ppl_row("fedavg@noise", 2, 6.251, attack="noise"),
    ]
    report = build_report(rows, {}, DOMAINS)
    assert report["quality"] == "perplexity"
    m = report["methods"]
    assert m["fedmoe-da"]["mean_local_ppl"] == 4.004 and "mean_local_acc" not in m["fedmoe-da"]
    assert m["fedmoe-da"]["local_ppl_by_domain"] == [4.004, 8.008]
    assert m["fedmoe-da"]["per_round"]["mean_local_ppl"] == [None, 4.004]
    assert m["fedavg@noise"]["drop_vs_clean"] == pytest.approx(1.75)  # 6.251 − 4.501: worse
    table = report["table"]
    assert table["best"]["mean_local_ppl"] == ["fedmoe-da", "naive-moe"]
    assert table["best"]["worst_local_ppl"] == ["fedmoe-da", "naive-moe"]
    keys = [c["key"] for c in table["columns"]]
    cells = dict(zip(keys, next(r for r in table["rows"] if r[0] == "fedavg@noise"), strict=True))
    assert (cells["mean_local_ppl"], cells["drop_vs_clean"]) == ("6.25", "1.75")
    assert (
        table["caption"][0] == "perplexity ppl/byte (last evaluated round), traffic MiB per round"
    )
    assert "* best compared method of a perplexity column (ties marked alike)" in table["caption"]
    csv_head = metrics_csv(rows, DOMAINS).splitlines()[0].split(",")
    assert csv_head[4:11] == [
        "mean_local_ppl", "worst_local_ppl", "mean_global_ppl",
        "local_ppl_by_domain.rot0", "local_ppl_by_domain.rot90",
        "global_ppl_by_domain.rot0", "global_ppl_by_domain.rot90",
    ]  # fmt: skip


def test_a_summary_of_perplexity_runs_gives_mean_and_std_and_ranks_the_lowest() -> None:
    seeds = [
        [ppl_row("fedmoe-da", 1, 5.0), ppl_row("fedavg", 1, 6.0)],
        [ppl_row("fedmoe-da", 1, 7.0), ppl_row("fedavg", 1, 6.5)],
    ]
    reports = [build_report(r, {"seed": s}, DOMAINS) for s, r in enumerate(seeds)]
    summary = combine_reports(reports, ["s0", "s1"])
    assert summary["quality"] == "perplexity"
    da = summary["methods"]["fedmoe-da"]
    assert da["mean_local_ppl"]["mean"] == 6.0
    assert da["mean_local_ppl"]["std"] == pytest.approx(1.414214)  # sample std of 5 and 7
    assert da["per_round"] == {"round": [1], "mean_local_ppl": [6.0], "std_local_ppl": [1.414214]}
    table = summary["table"]
    assert table["best"]["mean_local_ppl"] == ["fedmoe-da"]  # 6.00 < 6.25
    assert table["rows"][0][1] == "6.00±1.41"
