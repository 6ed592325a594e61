"""The comparison table of a run (and of several runs) as data: its columns with their units and
meanings, one row of formatted cells per method, the best method of each accuracy column, the
reference methods, and a caption that explains all of it.

``report.json`` and ``summary.json`` keep the table under ``table``; ``fedmoe report`` prints it,
marking the best cells and the reference methods. The best method of a column is chosen among the
compared methods only: reference methods (``oracle-domain``, which is given the true domain labels
a federation does not have, and ``local``, which never communicates) bound what is reachable and are
not ranked; nor are attacked arms (``method@attack``), which are compared by their drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedmoe.run.quality import ACCURACY, Quality

REFERENCES = {
    "oracle-domain": "is given the true domains, which a federation does not know",
    "local": "trains each client alone, never communicates",
}  # base method → why it is a reference, not a competitor

BEST_MARK = "*"  # after a best cell when printed
REFERENCE_MARK = "†"  # after a reference method's name when printed


@dataclass(frozen=True)
class Column:
    """One column of the table."""

    key: str  # the report's field (or a quantity derived from its fields)
    header: str  # the printed heading
    unit: str  # what a cell is measured in
    ranked: bool  # the score's columns: the best method is marked
    meaning: str  # one line for the caption


def quality_columns(q: Quality) -> tuple[Column, ...]:
    """The score's columns (ranked) and an attacked arm's drop."""
    if q is ACCURACY:
        return (
            Column(q.mean_local, "local", "%", True,
                   "personalised: each client on its own test split, mean over clients"),
            Column(q.worst_local, "worst", "%", True,
                   "the lowest personalised accuracy of any client"),
            Column(q.mean_global, "global", "%", True,
                   "accuracy on the shared global test set (all domains), mean over clients"),
            Column("drop_vs_clean", "drop", "pp", False,
                   "attacked arm: its clean arm's local accuracy minus its own, percentage "
                   "points"),
        )  # fmt: skip
    return (
        Column(q.mean_local, "local", q.unit, True,
               f"personalised: each client's {q.name} on its own test split, mean over clients"),
        Column(q.worst_local, "worst", q.unit, True,
               f"the {q.worst_word} personalised {q.name} of any client"),
        Column(q.mean_global, "global", q.unit, True,
               f"{q.name} on the shared global test set (all domains), mean over clients"),
        Column("drop_vs_clean", "drop", q.drop_unit, False,
               f"attacked arm: how much worse its local {q.name} is than its clean arm's"),
    )  # fmt: skip


TRAFFIC_COLUMNS = (
    Column("server_bytes_per_round", "server", "MiB/round", False,
           "MiB/round via the server (uploads, downloads, plan), mean over rounds"),
    Column("p2p_bytes_per_round", "p2p", "MiB/round", False,
           "MiB/round sent client to client (expert pulls), mean over rounds"),
    Column("server_vs_fedavg", "÷FedAvg", "ratio", False,
           "server traffic ÷ FedAvg's on the same model (1.00: as much)"),
    Column("wall_seconds", "s", "s", False,
           "wall-clock seconds of all rounds (train, aggregate, evaluate)"),
)  # fmt: skip
SUMMARY_TRAFFIC = ("server_bytes_per_round", "p2p_bytes_per_round")  # a summary's traffic columns


def columns_of(q: Quality) -> tuple[Column, ...]:
    """Every column of a run's table, the score's first."""
    return (*quality_columns(q), *TRAFFIC_COLUMNS)


def base_method(arm: str, recipe: dict[str, Any]) -> str:
    """The registered method behind an arm: ``name@attack`` is ``name``'s arm, and a recipe
    variant names its method."""
    name = arm.split("@", 1)[0]
    variants = recipe.get("variants") if isinstance(recipe, dict) else None
    spec = variants.get(name) if isinstance(variants, dict) else None
    method = spec.get("method") if isinstance(spec, dict) else None
    return method if isinstance(method, str) else name


def references(arms: Sequence[str], recipe: dict[str, Any]) -> dict[str, str]:
    """The reference arms among ``arms``, each with the reason it is one."""
    out = {}
    for arm in arms:
        base = base_method(arm, recipe)
        if base in REFERENCES:
            out[arm] = f"reference: {REFERENCES[base]}"
    return out


def best_methods(
    values: dict[str, float | None], excluded: set[str], decimals: int, sign: int = 1
) -> list[str]:
    """The methods with the best value (the highest, or with ``sign`` −1 the lowest), compared as
    shown (``decimals`` places), so that two cells that print the same are both marked;
    ``excluded`` methods and missing values are not ranked. Empty when nothing is left to rank."""
    shown = {
        m: sign * round(v, decimals)
        for m, v in values.items()
        if v is not None and m not in excluded
    }
    if not shown:
        return []
    top = max(shown.values())
    return [m for m, v in shown.items() if v == top]


def _ranked_out(arms: Sequence[str], refs: dict[str, str]) -> set[str]:
    """Arms that are not ranked: the references, and attacked arms when clean arms exist."""
    clean = [a for a in arms if "@" not in a]
    return set(refs) | ({a for a in arms if "@" in a} if clean else set())


def _attacked_note(arms: Sequence[str]) -> list[str]:
    """The caption's line on attacked arms, when there are both clean and attacked arms."""
    if any("@" in a for a in arms) and any("@" not in a for a in arms):
        return ["attacked arms (method@attack) are not ranked: compare them by their drop"]
    return []


def _caption(columns: Sequence[Column], refs: dict[str, str], first: str, q: Quality) -> list[str]:
    lines = [first]
    lines += [f"{c.header}: {c.meaning}" for c in columns]
    lines.append(f"{BEST_MARK} best compared method of {'an' if q.name[0] in 'aeiou' else 'a'} "
                 f"{q.name} column (ties marked alike)")  # fmt: skip
    if refs:
        why = "; ".join(f"{m} {r.removeprefix('reference: ')}" for m, r in refs.items())
        lines.append(f"{REFERENCE_MARK} reference, not ranked: {why}")
    return lines


def results_table(
    methods: dict[str, dict[str, Any]], recipe: dict[str, Any], q: Quality = ACCURACY
) -> dict[str, Any]:
    """The table of one run from its report's ``methods``, scored by ``q``.

    Returns
    -------
    dict
        ``columns`` (``[{key, header, unit, meaning}]``, the method column first), ``rows`` (one
        list of printed cells per method, unmarked), ``best`` (accuracy column key → the methods
        with its best value), ``reference`` (arm → why it is not ranked) and ``caption`` (lines
        explaining units, columns and marks).
    """
    arms = list(methods)
    attacked = any(d.get("attack") for d in methods.values())
    cols = [c for c in columns_of(q) if c.key != "drop_vs_clean" or attacked]
    scored = set(q.scalars)
    refs = references(arms, recipe)
    out = _ranked_out(arms, refs)

    def cell(key: str, d: dict[str, Any]) -> str:
        if key == "server_vs_fedavg":
            return f"{d['server_bytes_per_round'] / (d['fedavg_bytes_per_round'] or 1):.2f}"
        v = d.get(key)
        if key in scored or key == "drop_vs_clean":
            return q.cell(v)
        if v is None:
            return "-"
        if key.endswith("_bytes_per_round"):
            return f"{v / 2**20:.3f}"
        return f"{v:.1f}"

    rows = [[m, *(cell(c.key, d) for c in cols)] for m, d in methods.items()]
    best = {
        c.key: best_methods(
            {m: methods[m].get(c.key) for m in arms}, out, q.rank_decimals, q.sign()
        )
        for c in cols
        if c.ranked
    }
    first = f"{q.name} {q.unit} (last evaluated round), traffic MiB per round"
    return {
        "columns": _columns(cols),
        "rows": rows,
        "best": best,
        "reference": refs,
        "caption": _caption(cols, refs, first, q) + _attacked_note(arms),
    }


def summary_table(
    summary: dict[str, Any], recipe: dict[str, Any], q: Quality = ACCURACY
) -> dict[str, Any]:
    """The table of several runs from a run summary's ``methods`` (as :func:`results_table`, each
    cell the mean ± sample standard deviation over the runs, ranked by the mean, and a last
    column ``n``: how many runs have the method)."""
    methods: dict[str, dict[str, Any]] = summary["methods"]
    arms = list(methods)
    attacked = any("@" in m for m in arms)
    cols = [
        c
        for c in columns_of(q)
        if (c.ranked or c.key in SUMMARY_TRAFFIC or c.key == "drop_vs_clean")
        and (c.key != "drop_vs_clean" or attacked)
    ]
    refs = references(arms, recipe)
    out = _ranked_out(arms, refs)

    def cell(key: str, d: dict[str, Any]) -> str:
        v = d.get(key)
        if v is None:
            return "-"
        if key.endswith("_bytes_per_round"):
            return f"{v['mean'] / 2**20:.3f}"  # traffic barely varies with the seed: the mean
        return f"{q.cell(v['mean'])}±{q.cell(v['std'])}"

    def n(d: dict[str, Any]) -> str:
        v = d.get(q.mean_local)
        return str(v["n"]) if v else "0"

    rows = [[m, *(cell(c.key, d) for c in cols), n(d)] for m, d in methods.items()]
    best = {
        c.key: best_methods(
            {m: (d[c.key]["mean"] if d.get(c.key) else None) for m, d in methods.items()},
            out,
            q.rank_decimals,
            q.sign(),
        )
        for c in cols
        if c.ranked
    }
    seeds = ", ".join(str(s) for s in summary.get("seeds", []))
    first = (
        f"{len(summary.get('runs', []))} runs (seeds {seeds}): {q.name} {q.unit} as mean ± std "
        "(sample, n − 1) over the runs, traffic MiB per round as the mean"
    )
    caption = _caption(cols, refs, first, q) + _attacked_note(arms)
    caption.insert(len(cols) + 1, "n: how many runs have the method")
    columns = [*_columns(cols), {"key": "n", "header": "n", "unit": "runs",
                                 "meaning": "how many runs have the method"}]  # fmt: skip
    return {"columns": columns, "rows": rows, "best": best, "reference": refs, "caption": caption}


def _columns(cols: Sequence[Column]) -> list[dict[str, str]]:
    method = {"key": "method", "header": "method", "unit": "", "meaning": "the arm of the run"}
    return [method, *({"key": c.key, "header": c.header, "unit": c.unit,
                       "meaning": c.meaning} for c in cols)]  # fmt: skip
