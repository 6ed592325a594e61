"""``fedmoe train-round``: train one local round for one client, some clients or every client."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmoe.errors import UsageError
from fedmoe.params import default_of, from_mapping, help_of

if TYPE_CHECKING:
    from fedmoe.train import TrainConfig

from .common import (
    Force,
    Json,
    Quiet,
    Seed,
    emit,
    handle_errors,
    precision_note,
    stderr_console,
)

HELP = """Train one local round (FedMoE-DA step 1) on clients' train splits.

--client ID writes one checkpoint (--out FILE.safetensors) and FILE.json; --client all (or a list,
--client 0,3,5: the round's participants) writes --out DIR/client-XXX.safetensors plus
DIR/train-round.json, which affinity, aggregate and the next round accept as input.

--model is one global checkpoint (every client starts from it) or per-client checkpoints (a folder,
a train-round/aggregate manifest, or -), so clients keep personalised experts between rounds.

Threads: clients train in --workers processes (default: one per core), each on one torch thread,
so the cores are never oversubscribed; the result does not depend on the number of workers. Same
inputs and seed give byte-identical checkpoints.

Examples:

  fedmoe train-round --partition p.json --client all --model init.safetensors --out r1/

  fedmoe train-round --partition p.json --client 0,4,7 --model agg1/aggregate.json --out r2/

  fedmoe train-round --partition p.json --client 3 --model r1/aggregate.json --out c3.safetensors

  fedmoe train-round --partition p.json --candidates k0.safetensors k1.safetensors --out r1/

(--candidates: clustered FL, IFCA; --prox-mu: FedProx's proximal term.)
"""


def _t(name: str) -> Any:
    from fedmoe.train import TrainConfig

    return default_of(TrainConfig, name)


def _h(name: str) -> str:
    from fedmoe.train import TrainConfig

    return help_of(TrainConfig, name).capitalize() + "."


def parse_clients(client: str, num_clients: int) -> list[int]:
    """'all', one id or a comma-separated list of ids → sorted distinct ids."""
    if client == "all":
        return list(range(num_clients))
    try:
        ids = sorted({int(x) for x in client.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--client {client!r}: expected 'all', an id or ids like 0,3,5") from None
    if not ids:
        raise UsageError("--client names no client")
    return ids


def train_round(
    partition: Annotated[str, typer.Option(help="Partition manifest (or -).")],
    model: Annotated[
        list[str] | None,
        typer.Option(help="Global checkpoint, or per-client folder/manifest/files."),
    ] = None,
    client: Annotated[str, typer.Option(help="Client id, ids (0,3,5), or 'all'.")] = "all",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint file (one client) or folder.")
    ] = Path("round"),
    epochs: Annotated[int, typer.Option(help=_h("epochs"))] = _t("epochs"),
    batch_size: Annotated[int, typer.Option(help=_h("batch_size"))] = _t("batch_size"),
    optimizer: Annotated[str, typer.Option(help=_h("optimizer"))] = _t("optimizer").value,
    lr: Annotated[float, typer.Option(help=_h("lr"))] = _t("lr"),
    weight_decay: Annotated[float, typer.Option(help=_h("weight_decay"))] = _t("weight_decay"),
    balance_coef: Annotated[float, typer.Option(help=_h("balance_coef"))] = _t("balance_coef"),
    prox_mu: Annotated[float, typer.Option(help=_h("prox_mu"))] = _t("prox_mu"),
    precision: Annotated[str, typer.Option(help=_h("precision"))] = _t("precision").value,
    candidates: Annotated[
        list[str] | None,
        typer.Option(
            help="Clustered FL (IFCA): the k cluster models (files, a folder or clusters.json); "
            "each client starts from the one with the lowest loss on its train split, instead "
            "of --model."
        ),
    ] = None,
    round_: Annotated[
        int | None, typer.Option("--round", help="Round number (default: parent round + 1).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Training processes, one thread each (default: one per core)."),
    ] = None,
    train: Annotated[
        str,
        typer.Option(
            help="Hugging Face language models: which tensors train, 'all' or 'experts' (the "
            "routed experts and routers)."
        ),
    ] = "all",
    seed: Seed = 0,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    from fedmoe.io.checkpoint_set import load_candidates, load_checkpoint_set
    from fedmoe.io.hf_folder import HFModel
    from fedmoe.io.partition_file import load_partition
    from fedmoe.pipeline.pool import TrainPool, default_workers
    from fedmoe.pipeline.train import start_states, train_clients
    from fedmoe.train import TrainConfig

    console = stderr_console(quiet)
    cfg: TrainConfig = from_mapping(
        TrainConfig,
        {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": optimizer,
            "weight_decay": weight_decay,
            "balance_coef": balance_coef,
            "prox_mu": prox_mu,
            "precision": precision,
        },
    )
    precision_note(cfg, console)
    part = load_partition(partition)
    single = client != "all" and "," not in client
    ids = parse_clients(client, part.num_clients)
    for cid in ids:
        part.client(cid)  # an unknown id is an input error naming the valid range
    if bool(model) == bool(candidates):
        raise UsageError(
            "give either --model (the models clients start from) or --candidates (IFCA's "
            "cluster models)",
            hint="see fedmoe train-round --help",
        )
    options = load_candidates(candidates) if candidates else None
    models: dict[int | None, Any] = (
        {None: options[0]} if options else load_checkpoint_set(model or [])
    )
    language = isinstance(next(iter(models.values())), HFModel)
    if language:  # Hugging Face model folders in, model folders out
        if out.suffix == ".safetensors":
            raise UsageError(
                f"--out {out}: Hugging Face models are written as folders",
                hint="give a folder, e.g. --out round1/",
            )
        paths = {cid: out / f"client-{cid:03d}" for cid in ids}
        manifest_path = out / "train-round.json"
    elif single:
        if out.suffix != ".safetensors":
            raise UsageError(
                f"--out {out}: with one --client, give a .safetensors file path",
                hint="or use --client all (or a list) with an output folder",
            )
        paths = {ids[0]: out}
        manifest_path = out.with_suffix(".json")
    else:
        if out.suffix == ".safetensors":
            raise UsageError(
                f"--out {out}: several clients write one checkpoint each into a folder",
                hint="give a folder, e.g. --out round1/",
            )
        paths = {cid: out / f"client-{cid:03d}.safetensors" for cid in ids}
        manifest_path = out / "train-round.json"
    starts = start_states(models, ids)
    rnd = round_ if round_ is not None else max(c.meta.round for c in starts.values()) + 1
    if train not in ("all", "experts"):
        raise UsageError(f"--train {train!r}: expected 'all' or 'experts'")
    if language:
        _train_language(
            part, partition, starts, cfg, seed, rnd, paths, manifest_path, train, force, console
        )
        emit(manifest_path, json.loads(manifest_path.read_text()), json_)
        return
    config = next(iter(models.values())).moe_config
    config.check_data(part.input_shape, part.num_classes, str(partition))
    progress = _progress(console)
    pool = TrainPool(
        part.dataset_spec,
        part.fingerprint,
        lambda: part.dataset,
        min(workers or default_workers(), len(ids)),
    )
    with progress, pool:
        if pool.fallback:
            console.print(f"[yellow]note: {pool.fallback}[/yellow]")
        task = progress.add_task("train", total=len(ids), round=rnd)
        manifest = train_clients(
            part,
            partition,
            starts,
            cfg,
            seed,
            rnd,
            paths,
            manifest_path,
            pool,
            force,
            lambda: progress.advance(task),
            options,
        )
    _summary(console, manifest["clients"], rnd)
    emit(manifest_path, manifest, json_)


def _train_language(
    part: Any, partition: str, starts: Any, cfg: Any, seed: int, rnd: int, paths: Any,
    manifest_path: Path, train: str, force: bool, console: Any,
) -> None:  # fmt: skip
    """One round of Hugging Face MoE language models, clients one after another."""
    import torch

    from fedmoe.model.hf import TrainParts
    from fedmoe.pipeline.train_lm import train_lm_clients

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # one process: every core for its steps
    progress = _progress(console)
    try:
        with progress:
            task = progress.add_task("train", total=len(paths), round=rnd)
            manifest = train_lm_clients(
                part, partition, starts, cfg, seed, rnd, paths, manifest_path,
                TrainParts(train), force, lambda: progress.advance(task),
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    _summary(console, manifest["clients"], rnd)


def _progress(console: Any) -> Progress:
    """The per-client progress bar of a round (only on a terminal, never with --quiet)."""
    return Progress(
        TextColumn("round {task.fields[round]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console.quiet or not console.is_terminal,
    )


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
