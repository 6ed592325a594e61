"""``fedmoe affinity``: expert–expert similarity of gate rows (Eq. 8) and expert–domain affinity."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedmoe.aggregate.fedmoe_da import FedMoEDA
from fedmoe.errors import ParamError
from fedmoe.io.manifest import STDIO, base_dir, dumps
from fedmoe.params import default_of, help_of

if TYPE_CHECKING:
    from fedmoe.affinity import Affinity

from .common import (
    ArraysFile,
    Force,
    Json,
    LayoutFile,
    NumSamples,
    Quiet,
    emit,
    folder_options,
    handle_errors,
    pct,
    stage_companion,
    stderr_console,
)

HELP = """Compare the gate rows of every client-expert (FedMoE-DA Eq. 8) and tabulate which domains
and labels each expert serves, from the checkpoints' routing statistics.

Reads only the gate weight of each MoE layer and the metadata of each checkpoint (no expert
bytes); each MoE layer gets its own neighbours. The cosine similarity of all M = N·E proxies is
computed in blocks with an exact running top-k (ties kept), so memory never grows with M².
With --stale, clients that sat this round out keep their latest earlier proxies (marked stale), so
the matrix covers every client the server holds. Writes the affinity artefact to stdout (default)
or --out FILE.

Examples:

  fedmoe affinity r1/train-round.json | fedmoe plan-sync - --top-p 4 --out plan.json

  fedmoe affinity r1/ --partition p.json --plot affinity.png --out affinity.json

  fedmoe affinity r2/ --stale uploads/ --out affinity2.json

Large federations: --arrays FILE writes the neighbours and share tables to a binary companion
(the JSON names it by sha256; paths are relative to the JSON's folder, or to the working folder
on stdout), so the JSON stays small and plan-sync reads it fast:

  fedmoe affinity r1/ --arrays aff.arrays.safetensors | fedmoe plan-sync - --out plan.json
"""


def affinity(
    checkpoints: Annotated[
        list[str], typer.Argument(help="This round's client checkpoints, folder, manifest, -.")
    ],
    stale: Annotated[
        list[str] | None,
        typer.Option(
            help="Earlier uploads (checkpoints, folders, manifests) of clients that sat this "
            "round out; each client's latest is kept, marked stale. Repeatable."
        ),
    ] = None,
    candidates: Annotated[
        int, typer.Option(help=help_of(FedMoEDA, "candidates").capitalize() + "; ≥ P+1.")
    ] = default_of(FedMoEDA, "candidates"),
    pool_layers: Annotated[
        bool, typer.Option(help=help_of(FedMoEDA, "pool_layers").capitalize() + ".")
    ] = False,
    centred: Annotated[
        bool, typer.Option(help=help_of(FedMoEDA, "centred").capitalize() + ".")
    ] = False,
    partition: Annotated[
        str | None, typer.Option(help="Partition manifest, to name domains and labels.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write an expert×domain heatmap PNG.")] = None,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Artefact path, or - for stdout.")
    ] = STDIO,
    arrays: ArraysFile = None,
    layout: LayoutFile = None,
    num_samples: NumSamples = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    from fedmoe.io.atomic import OutputSet
    from fedmoe.io.checkpoint_set import client_checkpoints, newest_per_client
    from fedmoe.io.partition_file import load_partition
    from fedmoe.pipeline.affinity import affinity_artefact

    console = stderr_console(quiet)
    if candidates < 1:
        raise ParamError("candidates", candidates, "must be >= 1")
    options = folder_options(layout, num_samples)
    fresh = client_checkpoints(checkpoints, "affinity", options)
    earlier = newest_per_client([client_checkpoints([s], "affinity", options) for s in stale or []])
    domain_names = class_names = None
    if partition is not None:
        part = load_partition(partition)  # names only: the data is not read
        domain_names, class_names = list(part.domain_names), list(part.class_names)
    with OutputSet(force) as outputs:
        if out != STDIO:
            outputs.reserve(Path(out))
        if plot is not None:
            outputs.reserve(plot)
        if arrays is not None:
            outputs.reserve(arrays)
        aff, manifest = affinity_artefact(
            fresh,
            earlier,
            candidates,
            base_dir(out),
            domain_names,
            class_names,
            pool_layers,
            inline=arrays is None,
            centred=centred,
        )
        from fedmoe.io.affinity_file import affinity_arrays

        stage_companion(
            console,
            outputs,
            arrays,
            manifest,
            lambda: affinity_arrays(aff),
            base_dir(out),
            [la.index.size for la in aff.layers],
        )
        text = dumps(manifest)
        if plot is not None:
            from fedmoe.plots import affinity_heatmap

            last = aff.layers[-1]
            labels = [
                f"c{last.index.key(m)[0]}e{last.index.key(m)[1]}" for m in range(last.index.size)
            ]
            names = manifest["layers"][-1]["expert_domain"]["names"]
            outputs.write_bytes(
                plot, affinity_heatmap(last.by_domain, labels, names, "share of routed samples")
            )
        if out != STDIO:
            outputs.write_bytes(Path(out), text.encode())
    _table(console, aff, manifest)
    if out == STDIO:
        typer.echo(text, nl=False)
    else:
        emit(out, {"ok": True, "path": out, "summary": manifest["summary"]}, json_)


def _table(console: Any, full: Affinity, manifest: dict[str, Any]) -> None:
    from fedmoe.affinity import dominant

    if console.quiet:
        return
    aff = full.layers[-1]  # the classifying layer
    index = aff.index
    dnames = manifest["layers"][-1]["expert_domain"]["names"]
    lnames = manifest["layers"][-1]["expert_label"]["names"]
    dom, dshare = dominant(aff.by_domain)
    lab, lshare = dominant(aff.by_label)
    layers = f", last of {len(full.layers)} MoE layers" if len(full.layers) > 1 else ""
    n_stale = len(full.stale)
    stale = f", {n_stale} stale client{'s' if n_stale > 1 else ''}" if n_stale else ""
    table = Table(
        title=f"affinity: {index.size} client-experts{layers}{stale}", title_justify="left"
    )
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
