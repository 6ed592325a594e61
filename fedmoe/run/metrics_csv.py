"""``metrics.csv``: the metrics log as one flat table, for spreadsheets and pandas.

One row per method and round, in the log's order (a round redone after an interruption appears
once, as its last line); one column per field. The per-domain lists are spread over one column per
domain, ``local_acc_by_domain.<domain>`` (``local_ppl_by_domain.<domain>`` for a language
model; the domain's name from the partition, else its index);
any other list or object is kept as compact JSON in one cell. Columns come in a fixed order: the
known fields first (:data:`ORDER`), then any other field by name, so the same kind of run always
gives the same header. Missing values are empty cells; numbers and booleans are written as JSON
writes them (``0.5``, ``true``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

ORDER = (
    "method",
    "round",
    "participants",
    "attack",
    "mean_local_acc",
    "worst_local_acc",
    "mean_global_acc",
    "local_acc_by_domain",
    "global_acc_by_domain",
    "mean_local_ppl",
    "worst_local_ppl",
    "mean_global_ppl",
    "local_ppl_by_domain",
    "global_ppl_by_domain",
    "server_bytes",
    "p2p_bytes",
    "fedavg_bytes",
    "matrix_round",
    "sources_other_client",
    "remote_same_domain",
    "sources_malicious",
    "malicious",
    "seconds",
    "train_seconds",
)  # the known fields of a metrics line, in the order of the table
SPREAD = (
    "local_acc_by_domain",
    "global_acc_by_domain",
    "local_ppl_by_domain",
    "global_ppl_by_domain",
)  # lists spread over one column per domain


def latest_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log's rows with a redone round's earlier lines left out (order otherwise kept)."""
    last = {(r.get("method"), r.get("round")): i for i, r in enumerate(rows)}
    return [r for i, r in enumerate(rows) if last[(r.get("method"), r.get("round"))] == i]


def domain_labels(count: int, domain_names: Sequence[str]) -> list[str]:
    """Column suffixes for ``count`` domains: their names when there are as many, else indices."""
    if len(domain_names) == count:
        return [str(n) for n in domain_names]
    return [str(i) for i in range(count)]


def flatten(row: dict[str, Any], domain_names: Sequence[str]) -> dict[str, Any]:
    """One metrics line as flat ``column → value`` (values still Python objects)."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if key in SPREAD and isinstance(value, list):
            for label, v in zip(domain_labels(len(value), domain_names), value, strict=True):
                flat[f"{key}.{label}"] = v
        elif key in SPREAD and value is None:
            continue  # a round without evaluation: its per-domain cells stay empty
        else:
            flat[key] = value
    return flat


def columns(rows: Sequence[dict[str, Any]], domain_names: Sequence[str]) -> list[str]:
    """The table's header for ``rows`` (flattened): known fields in :data:`ORDER` (a spread field
    as its per-domain columns in domain order), then the other fields by name."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(flatten(r, domain_names)))
    head: list[str] = []
    for key in ORDER:
        if key in seen:
            head.append(key)
        if key in SPREAD:
            head += [c for c in seen if c.startswith(f"{key}.")]
    return head + sorted(c for c in seen if c not in head)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def metrics_csv(rows: Sequence[dict[str, Any]], domain_names: Sequence[str]) -> str:
    """``metrics.csv`` of the metrics log ``rows`` (see the module docstring)."""
    kept = [flatten(r, domain_names) for r in latest_rows(rows)]
    head = columns(latest_rows(rows), domain_names)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for r in kept:
        writer.writerow([_cell(r.get(c)) for c in head])
    return buf.getvalue()
