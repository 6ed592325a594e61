"""``fedmoe affinity``: expert–expert similarity of gate rows (Eq. 8) and expert–domain affinity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from fedmoe.affinity import Affinity, compute_affinity, dominant
from fedmoe.errors import UsageError
from fedmoe.io.affinity_file import affinity_to_manifest
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint_set import load_checkpoint_set
from fedmoe.io.manifest import STDIO, base_dir, dumps, relative
from fedmoe.io.partition_file import load_partition
from fedmoe.plan import tensor_sizes

from .common import Force, Json, Quiet, emit, handle_errors, pct, stderr_console

HELP = """Compare the gate rows of every client-expert (FedMoE-DA Eq. 8) and tabulate which domains
and labels each expert serves, from the checkpoints' routing statistics.

Reads only `gate.weight` and the metadata of each checkpoint (no expert bytes). The cosine
similarity of all M = N·E proxies is computed in blocks with an exact running top-k (ties kept),
so memory never grows with M². Writes the affinity artefact to stdout (default) or --out FILE.

Examples:

  fedmoe affinity r1/train-round.json | fedmoe plan-sync - --top-p 4 --out plan.json

  fedmoe affinity r1/ --partition p.json --plot affinity.png --out affinity.json
"""


def affinity(
    checkpoints: Annotated[
        list[str], typer.Argument(help="Client checkpoints, folder, manifest, -.")
    ],
    candidates: Annotated[
        int, typer.Option(help="Neighbours kept per client-expert; plan-sync needs ≥ P+1.")
    ] = 16,
    partition: Annotated[
        str | None, typer.Option(help="Partition manifest, to name domains and labels.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write an expert×domain heatmap PNG.")] = None,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Artefact path, or - for stdout.")
    ] = STDIO,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    console = stderr_console(quiet)
    if candidates < 1:
        raise UsageError(f"--candidates must be >= 1, got {candidates}")
    ckpts = load_checkpoint_set(checkpoints)
    if None in ckpts:
        raise UsageError(
            f"{ckpts[None].path} is a global model; affinity compares client checkpoints",
            hint="pass the checkpoints written by train-round",
        )
    clients = {int(c): v for c, v in ckpts.items() if c is not None}
    config = next(iter(clients.values())).config
    domain_names = class_names = None
    if partition is not None:
        part = load_partition(partition)
        domain_names = list(part.dataset.domain_names)
        class_names = list(part.dataset.class_names)
    with OutputSet(force) as outputs:
        if out != STDIO:
            outputs.reserve(Path(out))
        if plot is not None:
            outputs.reserve(plot)
        gates = {c: k.tensor("gate.weight") for c, k in clients.items()}
        routing = {c: k.meta.routing for c, k in clients.items()}
        aff = compute_affinity(gates, routing, candidates, config.num_classes)
        base = base_dir(out)
        inputs = [
            {
                "client": c,
                "path": relative(k.path, base),
                "sha256": k.sha256,
                "num_samples": k.meta.num_samples,
                "round": k.meta.round,
            }
            for c, k in sorted(clients.items())
        ]
        rnd = max(k.meta.round for k in clients.values())
        manifest = affinity_to_manifest(
            aff, config, tensor_sizes(config), inputs, rnd, domain_names, class_names
        )
        manifest["summary"] = summary(aff)
        text = dumps(manifest)
        if plot is not None:
            from fedmoe.plots import affinity_heatmap

            labels = [
                f"c{aff.index.key(m)[0]}e{aff.index.key(m)[1]}" for m in range(aff.index.size)
            ]
            names = manifest["expert_domain"]["names"]
            outputs.write_bytes(
                plot, affinity_heatmap(aff.by_domain, labels, names, "share of routed samples")
            )
        if out != STDIO:
            outputs.write_bytes(Path(out), text.encode())
    _table(console, aff, manifest)
    if out == STDIO:
        typer.echo(text, nl=False)
    else:
        emit(out, {"ok": True, "path": out, "summary": manifest["summary"]}, json_)


def summary(aff: Affinity) -> dict[str, Any]:
    """How the nearest other client-expert of each row relates to it."""
    index = aff.index
    nb = aff.neighbours
    dom, share = dominant(aff.by_domain)
    same_domain, other_client, sims = [], [], []
    for m in range(index.size):
        cols, vals = nb.row(m)
        others = [(int(c), float(v)) for c, v in zip(cols, vals, strict=True) if int(c) != m]
        if not others:
            continue
        c, v = others[0]
        sims.append(v)
        other_client.append(index.key(c)[0] != index.key(m)[0])
        if dom[m] >= 0 and dom[c] >= 0:
            same_domain.append(dom[m] == dom[c])
    return {
        "client_experts": index.size,
        "mean_nearest_similarity": round(float(np.mean(sims)), 6) if sims else None,
        "nearest_is_other_client": round(float(np.mean(other_client)), 6) if other_client else None,
        "nearest_same_dominant_domain": round(float(np.mean(same_domain)), 6)
        if same_domain
        else None,
        "mean_dominant_domain_share": round(float(share.mean()), 6),
    }


def _table(console: Any, aff: Affinity, manifest: dict[str, Any]) -> None:
    if console.quiet:
        return
    index = aff.index
    dnames = manifest["expert_domain"]["names"]
    lnames = manifest["expert_label"]["names"]
    dom, dshare = dominant(aff.by_domain)
    lab, lshare = dominant(aff.by_label)
    table = Table(title=f"affinity: {index.size} client-experts", title_justify="left")
    for col in (
        "client",
        "expert",
        "top domain",
        "top label",
        "nearest others (client:expert sim)",
    ):
        table.add_column(col, justify="right" if col in ("client", "expert") else "left")
    for m in range(index.size):
        if m >= 24:
            table.add_row("…", "", "", "", f"{index.size - m} more rows in the artefact")
            break
        c, e = index.key(m)
        cols, vals = aff.neighbours.row(m)
        near = " ".join(
            f"{index.key(int(x))[0]}:{index.key(int(x))[1]} {float(v):.2f}"
            for x, v in list(zip(cols, vals, strict=True))[:4]
            if int(x) != m
        )
        d = f"{dnames[dom[m]]} {100 * dshare[m]:.0f}%" if dom[m] >= 0 else "-"
        lb = f"{lnames[lab[m]]} {100 * lshare[m]:.0f}%" if lab[m] >= 0 else "-"
        table.add_row(str(c), str(e), d, lb, near)
    console.print(table)
    s = manifest["summary"]
    console.print(
        f"nearest neighbour: other client {pct(s['nearest_is_other_client'])}%, same dominant "
        f"domain {pct(s['nearest_same_dominant_domain'])}%, mean similarity "
        f"{s['mean_nearest_similarity']}"
    )


command = handle_errors(affinity)
