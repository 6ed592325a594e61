"""``fedmoe plan-sync``: the sparse aggregation matrix (Eq. 9–10) and the peer-to-peer sync plan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedmoe.errors import InputError, UsageError
from fedmoe.io.affinity_file import load_affinity
from fedmoe.io.atomic import OutputSet
from fedmoe.io.manifest import STDIO, base_dir, dumps, relative, sha256_bytes
from fedmoe.io.plan_file import PlanSettings, build_plan, load_plan
from fedmoe.model.config import MoEConfig
from fedmoe.plan import TensorSizes, aggregation_matrix

from .common import Force, Json, Quiet, emit, handle_errors, stderr_console

GATE_MODES = ("per-client", "shared")

HELP = """Build FedMoE-DA's sparse aggregation matrix and the sync plan each client receives.

Each client-expert keeps itself and its P most similar client-experts (threshold: the (P+1)-th
largest similarity of its row, self included; ties kept); weights are a softmax with temperature
τ over the kept set (Eq. 9-10). P = 0 means no expert aggregation. The plan lists, per target, its
sources and weights; the transfers (which experts move from which client to which, in bytes); and
the traffic ledger: server bytes (embedding and gate up, embedding (and shared gate) down, the
plan), peer-to-peer bytes, and what FedAvg of the whole model would have moved.

--gate: 'per-client' (default: each client keeps its own gate; measured better, see README) or
'shared' (the server averages the gate with the embedding).

Refresh interval I: with --previous-plan and --round r, the previous matrix (with its own P and
τ) is reused while r - its matrix_round < I (no affinity needed); otherwise it is recomputed.

Examples:

  fedmoe affinity r1/ | fedmoe plan-sync - --top-p 4 --tau 0.1 > plan.json

  fedmoe plan-sync --previous-plan plan1.json --round 2 --refresh-interval 5 --out plan2.json
"""


def plan_sync(
    affinity: Annotated[
        str | None, typer.Argument(help="Affinity artefact, or - for stdin.")
    ] = None,
    top_p: Annotated[int, typer.Option(help="P: similar client-experts kept besides itself.")] = 4,
    tau: Annotated[float, typer.Option(help="Softmax temperature τ over the kept set.")] = 0.1,
    gate: Annotated[str, typer.Option(help="'per-client' or 'shared' gate.")] = "per-client",
    round_: Annotated[int | None, typer.Option("--round", help="This round's number.")] = None,
    refresh_interval: Annotated[int, typer.Option(help="I: recompute A every I rounds.")] = 1,
    previous_plan: Annotated[
        str | None, typer.Option(help="Plan of an earlier round, reused within the interval.")
    ] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Plan path, or - for stdout.")] = STDIO,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    console = stderr_console(quiet)
    if gate not in GATE_MODES:
        raise UsageError(f"--gate must be one of {', '.join(GATE_MODES)}, got '{gate}'")
    if refresh_interval < 1:
        raise UsageError(f"--refresh-interval must be >= 1, got {refresh_interval}")
    base = base_dir(out)
    prev = load_plan(previous_plan) if previous_plan is not None else None
    reuse = False
    if prev is not None:
        prev_round = _int(prev.field("matrix_round"), "matrix_round", prev.where)
        rnd = round_ if round_ is not None else _int(prev.field("round"), "round", prev.where) + 1
        reuse = rnd - prev_round < refresh_interval
    if reuse and prev is not None:
        matrix = prev.matrix
        top_p, tau = _int(prev.field("top_p"), "top_p", prev.where), float(prev.field("tau"))
        config, sizes = _plan_model(prev.field("model_config"), prev.field("sizes"), prev.where)
        matrix_round = prev_round
        source: dict[str, Any] | None = None
    else:
        if affinity is None:
            raise UsageError(
                "an affinity artefact is needed to compute the matrix this round",
                hint="fedmoe affinity CKPTS | fedmoe plan-sync -",
            )
        aff, config, sizes, am, digest = load_affinity(affinity)
        matrix = aggregation_matrix(aff.neighbours, aff.index, top_p, tau)
        rnd = round_ if round_ is not None else _int(am.get("round", 0), "round", str(affinity))
        matrix_round = rnd
        text_src = "<stdin>" if affinity == STDIO else relative(Path(affinity), base)
        source = {"path": text_src, "sha256": digest}
    previous = None
    if prev is not None:
        where = "<stdin>" if previous_plan == STDIO else relative(Path(str(previous_plan)), base)
        previous = {"path": where, "sha256": prev.sha256, "reused": reuse}
    settings = PlanSettings(rnd, matrix_round, top_p, tau, refresh_interval, gate)
    plan, _ = build_plan(matrix, settings, config, sizes, source, previous)
    if len(matrix.index.clients) == 0:
        raise InputError("the plan covers no client")
    text = dumps(plan)
    if out != STDIO:
        with OutputSet(force) as outputs:
            outputs.write_bytes(Path(out), text.encode())
    _table(console, plan)
    if out == STDIO:
        typer.echo(text, nl=False)
    else:
        emit(
            out,
            {
                "ok": True,
                "path": out,
                "sha256": sha256_bytes(text.encode()),
                "ledger": plan["ledger"],
            },
            json_,
        )


def _int(value: Any, key: str, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: '{key}' must be an integer, got {value!r}") from None


def _plan_model(config: Any, sizes: Any, where: str) -> tuple[MoEConfig, TensorSizes]:
    """The model config and part sizes a plan records."""
    try:
        cfg = MoEConfig.from_dict(config, where)
        sz = TensorSizes(**{k: int(sizes[k]) for k in ("embed", "gate", "expert", "num_experts")})
    except (UsageError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: malformed model_config or sizes ({exc})") from None
    return cfg, sz


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _table(console: Any, plan: dict[str, Any]) -> None:
    if console.quiet:
        return
    rows = plan["targets"]
    n_src = [len(r["sources"]) for r in rows]
    remote = sum(1 for r in rows for s in r["sources"] if s["client"] != r["client"])
    cross = sum(1 for r in rows for s in r["sources"] if s["expert"] != r["expert"])
    total = max(sum(n_src), 1)
    led = plan["ledger"]
    table = Table(
        title=f"sync plan, round {plan['round']} (P={plan['top_p']}, τ={plan['tau']}, "
        f"{'fresh' if plan['refreshed'] else 'reused from round ' + str(plan['matrix_round'])})",
        title_justify="left",
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("client-experts", str(len(rows)))
    table.add_row("sources per target (mean)", f"{sum(n_src) / max(len(rows), 1):.2f}")
    table.add_row("sources from other clients", f"{100 * remote / total:.0f}%")
    table.add_row("sources with another expert index", f"{100 * cross / total:.0f}%")
    table.add_row("peer-to-peer transfers (client pairs)", str(len(plan["transfers"])))
    table.add_row("server bytes (up + down + plan)", _mib(led["server_total"]))
    table.add_row("peer-to-peer bytes", _mib(led["p2p"]))
    table.add_row("FedAvg of the whole model", _mib(led["fedavg_equivalent"]))
    table.add_row("server / FedAvg", f"{led['server_vs_fedavg']:.3f}")
    console.print(table)


command = handle_errors(plan_sync)
