"""``fedmoe plan-sync``: the sparse aggregation matrix (Eq. 9–10) and the peer-to-peer sync plan."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedmoe.errors import ParamError, UsageError
from fedmoe.io.manifest import STDIO, base_dir, dumps, sha256_bytes
from fedmoe.params import default_of, from_mapping, help_of

if TYPE_CHECKING:
    from fedmoe.aggregate import FedMoEDA
    from fedmoe.round import SyncPlan

from .common import (
    ArraysFile,
    Force,
    Json,
    Quiet,
    emit,
    handle_errors,
    parse_params,
    stage_companion,
    stderr_console,
)

HELP = """Build FedMoE-DA's sparse aggregation matrices and the sync plan each client receives.

Each MoE layer gets its own matrix. Each client-expert keeps itself and its P most similar
client-experts (threshold: the (P+1)-th largest similarity of its row, self included; ties kept);
weights are a softmax with temperature τ over the kept set (Eq. 9-10). P = 0 means no expert
aggregation. The plan lists, per layer and target, its sources and weights; the transfers (which
experts move from which client to which, in bytes); and the traffic ledger: server bytes (shared
parts and gates up, shared parts (and shared gates) down, the plan), peer-to-peer bytes, and what
FedAvg of the whole model would have moved.

--gate: 'per-client' (default: each client keeps its own gate; measured better, see README) or
'shared' (the server averages the gate with the embedding).

Refresh interval I: with --previous-plan, the previous matrices are reused while
round - matrix_round < I (no affinity needed); otherwise they are recomputed from the affinity.
Partial participation: the matrices cover every client the affinity holds (stale ones too); only
the rows of --participants (default: the affinity's fresh clients) are applied this round, with
sources from participants only, renormalised. --interval sync: experts merge only when the
matrices are recomputed.

Examples:

  fedmoe affinity r1/ | fedmoe plan-sync - --top-p 4 --tau 0.1 > plan.json

  fedmoe plan-sync --previous-plan plan1.json --round 2 --participants 0,3,5 \\
      --refresh-interval 2 --out plan2.json

Large federations: --arrays FILE writes the matrices and transfers to a binary companion that
the JSON names by sha256; --per-client FILE also writes each participant's own small plan (its
rows, whose sources on other clients are the experts it fetches, and its peers), one JSON line
per client, and the plan records each line's byte range and sha256, so a client fetches only its
own:

  fedmoe affinity r1/ --arrays aff.bin | fedmoe plan-sync - --arrays plan.bin \\
      --per-client clients.jsonl --out plan.json
"""


def _o(name: str) -> Any:
    from fedmoe.aggregate import FedMoEDA

    return default_of(FedMoEDA, name)


def _h(name: str) -> str:
    from fedmoe.aggregate import FedMoEDA

    return help_of(FedMoEDA, name).capitalize() + "."


def plan_sync(
    affinity: Annotated[
        str | None, typer.Argument(help="Affinity artefact, or - for stdin.")
    ] = None,
    top_p: Annotated[int, typer.Option(help=_h("top_p"))] = _o("top_p"),
    tau: Annotated[float, typer.Option(help=_h("tau"))] = _o("tau"),
    gate: Annotated[str, typer.Option(help=_h("gate"))] = _o("gate").value,
    round_: Annotated[int | None, typer.Option("--round", help="This round's number.")] = None,
    refresh_interval: Annotated[int, typer.Option(help=_h("refresh_interval"))] = _o(
        "refresh_interval"
    ),
    interval: Annotated[str, typer.Option(help=_h("interval"))] = _o("interval").value,
    participants: Annotated[
        str | None,
        typer.Option(help="Clients taking part this round, e.g. 0,3,5 (default: the affinity's)."),
    ] = None,
    previous_plan: Annotated[
        str | None, typer.Option(help="Plan of an earlier round, reused within the interval.")
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Another fedmoe-da parameter as key=value (e.g. reduce=trimmed-mean, "
            "expert_trust=true); the plan fixes it for aggregate.",
        ),
    ] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Plan path, or - for stdout.")] = STDIO,
    arrays: ArraysFile = None,
    per_client: Annotated[
        Path | None,
        typer.Option(
            help="Also write each participant's own small plan, one JSON line each, to this file "
            "(the plan records each line's byte range and sha256)."
        ),
    ] = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    from fedmoe.aggregate import FedMoEDA
    from fedmoe.io.affinity_file import load_affinity
    from fedmoe.io.atomic import OutputSet
    from fedmoe.io.manifest import relative
    from fedmoe.io.plan_file import client_plans_entry, load_plan, plan_arrays
    from fedmoe.pipeline.sync import client_plans, sync_artefact, write_client_plans

    console = stderr_console(quiet)
    options = {
        "top_p": top_p,
        "tau": tau,
        "refresh_interval": refresh_interval,
        "gate": gate,
        "interval": interval,
        "candidates": max(_o("candidates"), top_p + 1),
    }
    extra = parse_params(param)
    for key in extra:
        if key in options and key != "candidates":
            raise UsageError(f"--param {key}: use --{key.replace('_', '-')} for this parameter")
    try:
        method: FedMoEDA = from_mapping(FedMoEDA, {**options, **extra}, where="--param")
    except ParamError as exc:
        if exc.key in options:
            raise  # worded as its option (--tau must be > 0)
        raise UsageError(f"--param {exc.worded(exc.key)}", hint=exc.hint) from None
    if affinity == STDIO and previous_plan == STDIO:
        raise UsageError("only one of the affinity and the previous plan can come from stdin")
    ids = None
    if participants is not None:
        try:
            ids = sorted({int(x) for x in participants.split(",") if x.strip()})
        except ValueError:
            raise UsageError(f"--participants {participants!r}: expected ids like 0,3,5") from None
        if ids and ids[0] < 0:
            raise UsageError(f"--participants {participants!r}: client ids are >= 0")
    prev = load_plan(previous_plan) if previous_plan is not None else None
    aff = load_affinity(affinity) if affinity is not None else None
    with OutputSet(force) as outputs:
        for path in (Path(out) if out != STDIO else None, arrays, per_client):
            if path is not None:
                outputs.reserve(path)
        plan, manifest = sync_artefact(
            method,
            round_,
            ids,
            aff,
            affinity,
            prev,
            previous_plan,
            base_dir(out),
            inline=arrays is None,
        )
        index_arrays: dict[str, Any] = {}
        if per_client is not None:
            with outputs.open(per_client) as handle:
                digest, size, index = write_client_plans(handle, client_plans(plan, manifest))
            manifest["client_plans"], index_arrays = client_plans_entry(
                relative(per_client, base_dir(out)), digest, size, index, inline=arrays is None
            )
        stage_companion(
            console,
            outputs,
            arrays,
            manifest,
            lambda: {**plan_arrays(plan), **index_arrays},
            base_dir(out),
            [m.index.size for m in plan.matrices],
        )
        text = dumps(manifest)
        if out != STDIO:
            outputs.write_bytes(Path(out), text.encode())
    _table(console, plan, manifest)
    if out == STDIO:
        typer.echo(text, nl=False)
    else:
        emit(
            out,
            {
                "ok": True,
                "path": out,
                "sha256": sha256_bytes(text.encode()),
                "ledger": manifest["ledger"],
            },
            json_,
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _table(console: Any, sync: SyncPlan, plan: dict[str, Any]) -> None:
    import numpy as np

    if console.quiet:
        return
    rows = sum(m.index.size for m in sync.matrices)
    entries = remote = cross = 0
    for m in sync.matrices:
        e = m.index.num_experts
        targets = m.targets
        entries += m.sources.size
        remote += int(np.count_nonzero(m.sources // e != targets // e))
        cross += int(np.count_nonzero(m.sources % e != targets % e))
    total = max(entries, 1)
    led = plan["ledger"]
    table = Table(
        title=f"sync plan, round {plan['round']} (P={plan['top_p']}, τ={plan['tau']}, "
        f"{'fresh' if plan['refreshed'] else 'reused from round ' + str(plan['matrix_round'])}"
        f", {len(plan['layers'])} MoE layer{'s' if len(plan['layers']) > 1 else ''})",
        title_justify="left",
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("client-experts (all layers)", str(rows))
    table.add_row(
        "participants / clients covered", f"{len(plan['participants'])} / {len(plan['clients'])}"
    )
    table.add_row("sources per target (mean)", f"{entries / max(rows, 1):.2f}")
    table.add_row("sources from other clients", f"{100 * remote / total:.0f}%")
    table.add_row("sources with another expert index", f"{100 * cross / total:.0f}%")
    table.add_row("peer-to-peer transfers (client pairs)", str(len(sync.transfers)))
    table.add_row("server bytes (up + down + plan)", _mib(led["server_total"]))
    table.add_row("peer-to-peer bytes", _mib(led["p2p"]))
    table.add_row("FedAvg of the whole model", _mib(led["fedavg_equivalent"]))
    table.add_row("server / FedAvg", f"{led['server_vs_fedavg']:.3f}")
    console.print(table)


command = handle_errors(plan_sync)
