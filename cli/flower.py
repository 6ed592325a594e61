"""``fedmoe flower``: a recipe's federation on Flower, without writing Flower code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    Force,
    Json,
    Overrides,
    Quiet,
    RecipeFile,
    emit,
    handle_errors,
    parse_overrides,
    stderr_console,
)
from .report import make_report

HELP = """Run a recipe on Flower (needs the flower extra): every method of the recipe, round by
round, with the same participants, plans and metrics as fedmoe run, but each client is a Flower
ClientApp on its own SuperNode and the ServerApp sees only the small parts (shared and gate
tensors), routing statistics and sample counts. Under FedMoE-DA each client publishes its experts
to --exchange and fetches the experts its plan rows name from there, by byte range, checking each
against the sha256 its publisher reported; the server never holds an expert.

--engine simulation runs Flower's Simulation Engine (Ray) in this process, one virtual SuperNode
per client. --engine deployment starts a SuperLink and one SuperNode per client on 127.0.0.1 in
insecure mode (a local trial of a deployment; across machines, start them yourself as the README's
"Running on Flower" shows) and submits the run to them.

The run folder gets recipe.yaml, partition.json, metrics.jsonl, rounds/<method>/round-XXX/
{affinity,plan}.json, report.json and the plots, as fedmoe run writes them; each metrics line also
has moved_server_bytes and moved_p2p_bytes, the bytes that actually moved. Clients keep their
models in --client-dir. Attack recipes and seed lists run with fedmoe run only.

Examples:
  fedmoe flower recipes/quickstart.yaml --out runs/flower
  fedmoe flower recipes/quickstart.yaml --out runs/flower-dep --engine deployment -c rounds=2
"""


def flower(
    recipe: RecipeFile,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/flower"),
    config: Overrides = None,
    engine: Annotated[
        str, typer.Option(help="simulation (Ray, this process) or deployment (local processes).")
    ] = "simulation",
    exchange: Annotated[
        str | None,
        typer.Option(help="Where clients publish and fetch experts (default: OUT/exchange)."),
    ] = None,
    client_dir: Annotated[
        Path | None, typer.Option(help="Where clients keep their models (default: OUT/clients).")
    ] = None,
    cpus: Annotated[
        int | None, typer.Option(help="Simulation: CPUs for the clients (default: all).")
    ] = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    from fedmoe.errors import UsageError
    from fedmoe.run import load_recipe

    console = stderr_console(quiet)
    overrides = parse_overrides(config)
    rec, _ = load_recipe(recipe, overrides)
    if engine not in ("simulation", "deployment"):
        raise UsageError(f"--engine {engine}: unknown engine", hint="use simulation or deployment")
    try:
        from fedmoe.flower import launch
    except ImportError as exc:
        raise UsageError(
            f"Flower is not installed ({exc.name} is missing)",
            hint="pip install 'fedmoe[flower]'",
        ) from None
    from fedmoe.errors import OutputError
    from fedmoe.flower.client import ClientSettings
    from fedmoe.flower.server import ServerSettings, check_recipe
    from fedmoe.io.run_folder import RunFolder

    check_recipe(rec)
    if RunFolder(out).started() and not force:
        raise OutputError(
            f"{out} already holds a run", hint="pass --force to replace it, or use a new --out"
        )

    server = ServerSettings(
        str(recipe.resolve()),
        str(out.resolve()),
        tuple(f"{k}={v}" for k, v in overrides.items()),
        force,
    )
    client = ClientSettings(
        exchange or str((out / "exchange").resolve()),
        str((client_dir or out / "clients").resolve()),
    )
    n = rec.partition.clients
    if not quiet:
        console.print(f"Flower {engine}: {n} clients, methods {', '.join(rec.arms)}")
    if engine == "simulation":
        folder = launch.simulate(server, client, n, cpus)
    else:
        folder = launch.deploy(server, client, n, console=None if quiet else console)
    path, report = make_report(folder, console)
    emit(path, report, json_)


command = handle_errors(flower)
