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
    ranked: bool  # accuracy columns: higher is better, the best method is marked
    meaning: str  # one line for the caption


COLUMNS = (
    Column("mean_local_acc", "local", "%", True,
           "personalised: each client on its own test split, mean over clients"),
    Column("worst_local_acc", "worst", "%", True,
           "the lowest personalised accuracy of any client"),
    Column("mean_global_acc", "global", "%", True,
           "accuracy on the shared global test set (all domains), mean over clients"),
    Column("drop_vs_clean", "drop", "pp", False,
           "attacked arm: its clean arm's local accuracy minus its own, percentage points"),
    Column("server_bytes_per_round", "server", "MiB/round", False,
           "MiB/round via the server (uploads, downloads, plan), mean over rounds"),
    Column("p2p_bytes_per_round", "p2p", "MiB/round", False,
           "MiB/round sent client to client (expert pulls), mean over rounds"),
    Column("server_vs_fedavg", "÷FedAvg", "ratio", False,
           "server traffic ÷ FedAvg's on the same model (1.00: as much)"),
    Column("wall_seconds", "s", "s", False,
           "wall-clock seconds of all rounds (train, aggregate, evaluate)"),
)  # fmt: skip
SUMMARY_COLUMNS = ("mean_local_acc", "worst_local_acc", "mean_global_acc", "drop_vs_clean",
                   "server_bytes_per_round", "p2p_bytes_per_round")  # fmt: skip


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


def best_methods(values: dict[str, float | None], excluded: set[str], decimals: int) -> list[str]:
    """The methods with the highest value, compared as shown (``decimals`` places), so that two
    cells that print the same are both marked; ``excluded`` methods and missing values are not
    ranked. Empty when nothing is left to rank."""
    shown = {
        m: round(v, decimals) for m, v in values.items() if v is not None and m not in excluded
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


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _caption(columns: Sequence[Column], refs: dict[str, str], first: str) -> list[str]:
    lines = [first]
    lines += [f"{c.header}: {c.meaning}" for c in columns]
    lines.append(f"{BEST_MARK} best compared method of an accuracy column (ties marked alike)")
    if refs:
        why = "; ".join(f"{m} {r.removeprefix('reference: ')}" for m, r in refs.items())
        lines.append(f"{REFERENCE_MARK} reference, not ranked: {why}")
    return lines


def results_table(methods: dict[str, dict[str, Any]], recipe: dict[str, Any]) -> dict[str, Any]:
    """The table of one run from its report's ``methods``.

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
    cols = [c for c in COLUMNS if c.key != "drop_vs_clean" or attacked]
    refs = references(arms, recipe)
    out = _ranked_out(arms, refs)

    def cell(key: str, d: dict[str, Any]) -> str:
        if key == "server_vs_fedavg":
            return f"{d['server_bytes_per_round'] / (d['fedavg_bytes_per_round'] or 1):.2f}"
        v = d.get(key)
        if key.endswith("_acc") or key == "drop_vs_clean":
            return _pct(v)
        if v is None:
            return "-"
        if key.endswith("_bytes_per_round"):
            return f"{v / 2**20:.3f}"
        return f"{v:.1f}"

    rows = [[m, *(cell(c.key, d) for c in cols)] for m, d in methods.items()]
    best = {
        c.key: best_methods({m: methods[m].get(c.key) for m in arms}, out, 3)
        for c in cols
        if c.ranked
    }
    first = "accuracy % (last evaluated round), traffic MiB per round"
    return {
        "columns": _columns(cols),
        "rows": rows,
        "best": best,
        "reference": refs,
        "caption": _caption(cols, refs, first) + _attacked_note(arms),
    }


def summary_table(summary: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """The table of several runs from a run summary's ``methods`` (as :func:`results_table`, each
    cell the mean ± sample standard deviation over the runs, ranked by the mean, and a last
    column ``n``: how many runs have the method)."""
    methods: dict[str, dict[str, Any]] = summary["methods"]
    arms = list(methods)
    attacked = any("@" in m for m in arms)
    cols = [
        c for c in COLUMNS if c.key in SUMMARY_COLUMNS and (c.key != "drop_vs_clean" or attacked)
    ]
    refs = references(arms, recipe)
    out = _ranked_out(arms, refs)

    def cell(key: str, d: dict[str, Any]) -> str:
        q = d.get(key)
        if q is None:
            return "-"
        if key.endswith("_bytes_per_round"):
            return f"{q['mean'] / 2**20:.3f}"  # traffic barely varies with the seed: the mean
        return f"{100 * q['mean']:.1f}±{100 * q['std']:.1f}"

    def n(d: dict[str, Any]) -> str:
        q = d.get("mean_local_acc")
        return str(q["n"]) if q else "0"

    rows = [[m, *(cell(c.key, d) for c in cols), n(d)] for m, d in methods.items()]
    best = {
        c.key: best_methods(
            {m: (d[c.key]["mean"] if d.get(c.key) else None) for m, d in methods.items()}, out, 3
        )
        for c in cols
        if c.ranked
    }
    seeds = ", ".join(str(s) for s in summary.get("seeds", []))
    first = (
        f"{len(summary.get('runs', []))} runs (seeds {seeds}): accuracy % as mean ± std "
        "(sample, n − 1) over the runs, traffic MiB per round as the mean"
    )
    caption = _caption(cols, refs, first) + _attacked_note(arms)
    caption.insert(len(cols) + 1, "n: how many runs have the method")
    columns = [*_columns(cols), {"key": "n", "header": "n", "unit": "runs",
                                 "meaning": "how many runs have the method"}]  # fmt: skip
    return {"columns": columns, "rows": rows, "best": best, "reference": refs, "caption": caption}


def _columns(cols: Sequence[Column]) -> list[dict[str, str]]:
    method = {"key": "method", "header": "method", "unit": "", "meaning": "the arm of the run"}
    return [method, *({"key": c.key, "header": c.header, "unit": c.unit,
                       "meaning": c.meaning} for c in cols)]  # fmt: skip
