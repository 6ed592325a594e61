"""The run report: ``report.json`` from ``metrics.jsonl``, and the summary of several runs.

``report.json`` (kind ``run-report``) holds per method: final mean and worst-client personalised
score, global score, per-domain score (accuracy, or per-byte perplexity for a language model:
:mod:`fedmoe.run.quality`; ``quality`` names it), server / peer-to-peer / FedAvg-equivalent bytes per
round (mean over rounds), wall time, and the per-round series of the same quantities; then the
comparison table (:mod:`fedmoe.run.results_table`), the run's command line and environment (its
``run.json``, :mod:`fedmoe.run.provenance`) and the environment the report itself was made in.
The figures are :mod:`fedmoe.run.figures`; ``metrics.csv`` is :mod:`fedmoe.run.metrics_csv`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.errors import InputError
from fedmoe.io.manifest import header
from fedmoe.io.run_folder import RunFolder, read_lines, read_text
from fedmoe.run.provenance import command_line, environment, utc_now
from fedmoe.run.quality import QUALITIES, Quality, quality_named, quality_of_rows
from fedmoe.run.results_table import references, results_table, summary_table

TRAFFIC_SERIES = ("server_bytes", "p2p_bytes")


def series_keys(q: Quality) -> tuple[str, ...]:
    """The per-round series a report keeps for each method."""
    return (*q.scalars, *TRAFFIC_SERIES)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (torn lines skipped)."""
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        raise InputError(f"{run_dir}: no metrics.jsonl; is this a fedmoe run folder?")
    return read_lines(path)


def _usable(row: dict[str, Any]) -> bool:
    """A metrics row with the fields of the right types that the report reads."""

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    return (
        isinstance(row.get("method"), str)
        and isinstance(row.get("round"), int)
        and all(
            number(row.get(k)) for k in ("server_bytes", "p2p_bytes", "fedavg_bytes", "seconds")
        )
        and all(
            row.get(k) is None or number(row.get(k)) for q in QUALITIES.values() for k in q.scalars
        )
    )


def run_context(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The run's resolved recipe and domain names (empty when absent)."""
    import yaml

    from fedmoe.run.recipe_yaml import load_yaml

    folder = RunFolder(run_dir)
    try:
        text = read_text(folder.recipe)
        recipe = load_yaml(text) if text else {}
    except (yaml.YAMLError, ValueError):  # UnicodeDecodeError is a ValueError
        recipe = {}  # a damaged recipe.yaml: the report goes without it
    try:
        part = read_text(folder.partition)
        names = json.loads(part)["dataset"]["domain_names"] if part else []
        names = [str(n) for n in names]
    except (ValueError, KeyError, TypeError, RecursionError):
        names = []  # a damaged partition.json: domains go unnamed
    return recipe if isinstance(recipe, dict) else {}, names


def arm_order(arms: list[str], recipe: dict[str, Any]) -> list[str]:
    """``arms`` in the recipe's order (its methods, each clean and then under each attack kind in
    the recipe's order), whatever order their lines reached ``metrics.jsonl`` in (arms that run
    side by side append them as they finish); arms the recipe does not name keep their order,
    after the others."""
    methods = recipe.get("methods")
    methods = [m for m in methods if isinstance(m, str)] if isinstance(methods, list) else []
    attack = recipe.get("attack")
    kinds = attack.get("kinds") if isinstance(attack, dict) else None
    kinds = [k for k in kinds if isinstance(k, str)] if isinstance(kinds, list) else []

    def rank(i: int) -> tuple[int, int, int]:
        base, _, kind = arms[i].partition("@")
        m = methods.index(base) if base in methods else len(methods)
        k = 0 if not kind else kinds.index(kind) + 1 if kind in kinds else len(kinds) + 1
        return (m, k, i)

    return [arms[i] for i in sorted(range(len(arms)), key=rank)]


def build_report(
    rows: list[dict[str, Any]],
    recipe: dict[str, Any],
    domain_names: list[str],
    run_info: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarise the metrics of every method (rows missing a field the report needs, e.g. a line
    damaged on disk, are left out), with the comparison table; ``run_info`` is the run's
    ``run.json`` (None: not recorded) and ``environment`` where the report is made (see
    :func:`report_environment`; None leaves it out, so the report is a function of the run)."""
    rows = [r for r in rows if _usable(r)]
    q = quality_of_rows(rows)
    methods: dict[str, Any] = {}
    order = arm_order(list(dict.fromkeys(r["method"] for r in rows)), recipe)
    for m in order:
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["round"])
        mine = list({r["round"]: r for r in mine}.values())  # a redone round replaces the old line
        evald = [r for r in mine if r.get(q.mean_local) is not None]
        last = evald[-1] if evald else {}
        methods[m] = {
            "rounds": len(mine),
            **{key: last.get(key) for key in q.eval_keys},
            "server_bytes_per_round": float(np.mean([r["server_bytes"] for r in mine])),
            "p2p_bytes_per_round": float(np.mean([r["p2p_bytes"] for r in mine])),
            "fedavg_bytes_per_round": float(np.mean([r["fedavg_bytes"] for r in mine])),
            "wall_seconds": round(float(sum(r["seconds"] for r in mine)), 3),
            "attack": last.get("attack") if isinstance(last.get("attack"), str) else None,
            "malicious_source_weight": _mean_of(mine, "sources_malicious"),
            "per_round": {
                "round": [r["round"] for r in mine],
                **{k: [r.get(k) for r in mine] for k in series_keys(q)},
            },
        }
    for m, d in methods.items():  # an attacked arm "name@kind" beside its clean arm "name"
        clean = methods.get(m.split("@", 1)[0]) if "@" in m else None
        d["drop_vs_clean"] = (
            round(q.drop(clean[q.mean_local], d[q.mean_local]), 6)
            if clean is not None and clean[q.mean_local] is not None and d[q.mean_local] is not None
            else None
        )
    report = {
        **header("run-report"),
        "recipe": recipe,
        "quality": q.name,
        "domain_names": domain_names,
        "methods": methods,
        "table": results_table(methods, recipe, q),
        "run": run_info,
    }
    if environment is not None:
        report["environment"] = environment
    return report


def report_environment(argv: list[str]) -> dict[str, Any]:
    """Where and when a report is made: versions, platform, its command line, UTC time."""
    return {**environment(), "command": command_line(argv), "utc": utc_now()}


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of a numeric metrics field over the rows that have it."""
    vals = [
        float(r[key])
        for r in rows
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    ]
    return round(float(np.mean(vals)), 6) if vals else None


def summary_keys(q: Quality) -> tuple[str, ...]:
    """The quantities a summary of several runs gives per method."""
    return (*q.scalars, "drop_vs_clean", "server_bytes_per_round", "p2p_bytes_per_round",
            "fedavg_bytes_per_round")  # fmt: skip


def combine_reports(reports: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """Several runs' reports (e.g. the same recipe with other seeds) summarised per method: for each
    quantity its mean, its sample standard deviation (n − 1; 0 for one run), and the runs' values
    with their seeds. A method missing from a run, or a value a run lacks, is left out of that
    quantity (``n`` says how many runs it covers)."""
    methods: dict[str, Any] = {}
    order = list(dict.fromkeys(m for r in reports for m in r["methods"]))
    seeds = [r.get("recipe", {}).get("seed") for r in reports]
    q = quality_named(reports[0].get("quality")) if reports else quality_named(None)
    for m in order:
        entry: dict[str, Any] = {}
        for key in summary_keys(q):
            vals = [
                (s, float(r["methods"][m][key]))
                for s, r in zip(seeds, reports, strict=True)
                if m in r["methods"] and isinstance(r["methods"][m].get(key), (int, float))
            ]
            if not vals:
                entry[key] = None
                continue
            xs = np.array([v for _, v in vals])
            entry[key] = {
                "mean": round(float(xs.mean()), 6),
                "std": round(float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, 6),
                "n": len(xs),
                "values": [round(v, 6) for _, v in vals],
                "seeds": [s for s, _ in vals],
            }
        entry["per_round"] = _per_round(
            [r["methods"][m]["per_round"] for r in reports if m in r["methods"]], q
        )
        methods[m] = entry
    summary = {**header("run-summary"), "quality": q.name, "runs": sources, "seeds": seeds,
               "methods": methods}  # fmt: skip
    recipe: dict[str, Any] = next(
        (r["recipe"] for r in reports if isinstance(r.get("recipe"), dict)), {}
    )
    summary["table"] = summary_table(summary, recipe, q)
    return summary


def _per_round(series: list[dict[str, Any]], q: Quality) -> dict[str, Any]:
    """Mean and sample standard deviation over runs of the mean personalised score, round by
    round (a round evaluated in no run is null)."""
    rounds = sorted({int(r) for s in series for r in s["round"]})
    mean: list[float | None] = []
    std: list[float | None] = []
    for rnd in rounds:
        vals = [
            float(v)
            for s in series
            for r, v in zip(s["round"], s[q.mean_local], strict=True)
            if r == rnd and isinstance(v, (int, float))
        ]
        mean.append(round(float(np.mean(vals)), 6) if vals else None)
        std.append(
            round(float(np.std(vals, ddof=1)), 6) if len(vals) > 1 else 0.0 if vals else None
        )
    return {"round": rounds, q.mean_local: mean, f"std_local_{q.short}": std}


def summary_plot(summary: dict[str, Any]) -> bytes:
    """The score per round, mean line and ± one standard deviation band per method."""
    from fedmoe import plots

    q = quality_named(summary.get("quality"))
    series = {
        m: (
            d["per_round"]["round"],
            [np.nan if v is None else q.scale * v for v in d["per_round"][q.mean_local]],
            [0.0 if v is None else q.scale * v for v in d["per_round"][f"std_local_{q.short}"]],
        )
        for m, d in summary["methods"].items()
    }
    seeds = ", ".join(str(s) for s in summary["seeds"])
    refs = references(list(summary["methods"]), summary.get("recipe") or {})
    png: bytes = plots.bands(
        series,
        "round",
        f"personalised {q.name} ({q.unit}), mean ± std",
        f"{q.name} per evaluated round (seeds {seeds})",
        refs,
    )
    return png
