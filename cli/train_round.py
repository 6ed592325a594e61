"""``fedmoe train-round``: train one local round for one client or for every client."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmoe.errors import InputError, UsageError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import Checkpoint, CheckpointMeta, save_checkpoint
from fedmoe.io.checkpoint_set import load_checkpoint_set
from fedmoe.io.manifest import dumps, header, relative
from fedmoe.io.partition_file import load_partition
from fedmoe.train import TrainConfig
from fedmoe.train.pool import Job, TrainPool, default_workers

from .common import Force, Json, Quiet, Seed, emit, handle_errors, stderr_console

HELP = """Train one local round (FedMoE-DA step 1) on a client's train split.

--client ID writes one checkpoint (--out FILE.safetensors) and FILE.json; --client all trains every
client one after the other in this process and writes --out DIR/client-XXX.safetensors plus
DIR/train-round.json, which the next round, affinity and aggregate accept as input.

--model is one global checkpoint (every client starts from it) or per-client checkpoints (a folder,
a train-round/aggregate manifest, or -), so clients keep personalised experts between rounds.

Threads: clients train in --workers processes (default: one per core), each on one torch thread,
so the cores are never oversubscribed; the result does not depend on the number of workers. Same
inputs and seed give byte-identical checkpoints.

Examples:

  fedmoe train-round --partition p.json --client all --model init.safetensors --out r1/

  fedmoe train-round --partition p.json --client 3 --model r1/aggregate.json --out c3.safetensors
"""


def start_states(models: dict[int | None, Checkpoint], clients: list[int]) -> dict[int, Checkpoint]:
    """Which checkpoint each client starts from: its own, else the single global model."""
    out = {}
    for cid in clients:
        if cid in models:
            out[cid] = models[cid]
        elif None in models:
            out[cid] = models[None]
        else:
            have = sorted(k for k in models if k is not None)
            raise InputError(
                f"no checkpoint for client {cid} (the models given cover clients {have})",
                hint="pass one global checkpoint or one per client",
            )
    return out


def train_round(
    partition: Annotated[str, typer.Option(help="Partition manifest (or -).")],
    model: Annotated[
        list[str], typer.Option(help="Global checkpoint, or per-client folder/manifest/files.")
    ],
    client: Annotated[str, typer.Option(help="Client id, or 'all'.")] = "all",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint file (one client) or folder (all).")
    ] = Path("round"),
    epochs: Annotated[int, typer.Option(help="Local epochs.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 32,
    optimizer: Annotated[str, typer.Option(help="adam, adamw or sgd.")] = "adam",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 0.0,
    balance_coef: Annotated[float, typer.Option(help="Load-balancing loss weight.")] = 0.01,
    round_: Annotated[
        int | None, typer.Option("--round", help="Round number (default: parent round + 1).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Training processes, one thread each (default: one per core)."),
    ] = None,
    seed: Seed = 0,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    console = stderr_console(quiet)
    cfg = TrainConfig(epochs, batch_size, lr, optimizer, weight_decay, balance_coef)
    part = load_partition(partition)
    if client == "all":
        if out.suffix == ".safetensors":
            raise UsageError(
                f"--out {out}: --client all writes one checkpoint per client into a folder",
                hint="give a folder, e.g. --out round1/",
            )
        ids = list(range(part.num_clients))
        paths = {cid: out / f"client-{cid:03d}.safetensors" for cid in ids}
        manifest_path = out / "train-round.json"
    else:
        try:
            ids = [int(client)]
        except ValueError:
            raise UsageError(f"--client {client!r}: expected an integer id or 'all'") from None
        part.client(ids[0])
        if out.suffix != ".safetensors":
            raise UsageError(
                f"--out {out}: with one --client, give a .safetensors file path",
                hint="or use --client all with an output folder",
            )
        paths = {ids[0]: out}
        manifest_path = out.with_suffix(".json")
    models = load_checkpoint_set(model)
    starts = start_states(models, ids)
    config = next(iter(models.values())).config
    config.check_data(part.dataset.input_shape, part.dataset.num_classes, str(partition))
    rnd = round_ if round_ is not None else max(c.meta.round for c in starts.values()) + 1
    rows: list[dict[str, Any]] = []
    with OutputSet(force) as outputs:
        for p in [*paths.values(), manifest_path]:
            outputs.reserve(p)
        progress = Progress(
            TextColumn("round {task.fields[round]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=quiet or not console.is_terminal,
        )
        spec = part.dataset_spec
        with (
            progress,
            TrainPool(spec, part.dataset, min(workers or default_workers(), len(ids))) as pool,
        ):
            if pool.fallback:
                console.print(f"[yellow]note: {pool.fallback}[/yellow]")
            task = progress.add_task("train", total=len(ids), round=rnd)
            for first in range(0, len(ids), 64):  # bounded memory: 64 clients in flight
                jobs = [
                    Job(config, starts[c].state(), part.client(c), cfg, seed, rnd, c)
                    for c in ids[first : first + 64]
                ]
                for update in pool.run(jobs):
                    cid = update.client
                    meta = CheckpointMeta(
                        config,
                        cid,
                        rnd,
                        update.num_samples,
                        seed,
                        "train",
                        parent_sha256=starts[cid].sha256,
                        routing=update.routing,
                    )
                    save_checkpoint(outputs, paths[cid], update.result.state, meta)
                    r = update.result
                    rows.append(
                        {
                            "client": cid,
                            "num_samples": update.num_samples,
                            "epoch_loss": [round(v, 6) for v in r.epoch_loss],
                            "epoch_balance": [round(v, 6) for v in r.epoch_balance],
                            "steps": r.steps,
                            "seconds": round(r.seconds, 4),
                            "samples_per_s": round(r.samples / r.seconds, 1)
                            if r.seconds > 0
                            else None,
                        }
                    )
                    progress.advance(task)
        base = manifest_path.parent
        manifest = {
            **header("train-round"),
            "round": rnd,
            "seed": seed,
            "train_config": cfg.__dict__,
            "threads_per_client": 1,
            "partition": {
                "path": relative(Path(partition), base) if partition != "-" else "-",
                "sha256": part.sha256,
            },
            "inputs": [
                {"path": relative(c.path, base), "sha256": c.sha256}
                for c in {id(c): c for c in starts.values()}.values()
            ],
            "checkpoints": [
                {
                    "client": cid,
                    "path": relative(paths[cid], base),
                    "sha256": outputs.staged_sha256(paths[cid]),
                    "num_samples": row["num_samples"],
                }
                for cid, row in zip(ids, rows, strict=True)
            ],
            "clients": rows,
        }
        outputs.write_bytes(manifest_path, dumps(manifest).encode())
    _summary(console, rows, rnd)
    emit(manifest_path, manifest, json_)


def _summary(console: Any, rows: list[dict[str, Any]], rnd: int) -> None:
    if console.quiet:
        return
    table = Table(title=f"train-round {rnd}", title_justify="left")
    for col in ("client", "samples", "loss first→last", "steps", "samples/s"):
        table.add_column(col, justify="right")
    for row in rows[:25]:
        losses = row["epoch_loss"]
        span = f"{losses[0]:.3f}→{losses[-1]:.3f}" if losses else "-"
        table.add_row(
            str(row["client"]),
            str(row["num_samples"]),
            span,
            str(row["steps"]),
            f"{row['samples_per_s'] or 0:,.0f}",
        )
    if len(rows) > 25:
        table.add_row("…", f"{len(rows) - 25} more", "", "", "")
    console.print(table)


command = handle_errors(train_round)
