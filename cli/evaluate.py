"""``fedmoe evaluate``: personalised and global accuracy of client checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fedmoe.errors import InputError
from fedmoe.io.manifest import STDIO, header, write_manifest

if TYPE_CHECKING:
    pass

from .common import Force, Json, Quiet, emit, handle_errors, pct, stderr_console

HELP = """Accuracy of each client's model on its local test split (personalised), on the global
test set, and per domain. Prints the evaluation JSON on stdout (or writes --out FILE).

A single global checkpoint is evaluated as every client's model.

Examples:

  fedmoe evaluate --partition p.json r1/train-round.json

  fedmoe evaluate --partition p.json agg/ --out eval.json
"""


def evaluate(
    models: Annotated[list[str], typer.Argument(help="Checkpoints, folders or manifests (or -).")],
    partition: Annotated[str, typer.Option(help="Partition manifest.")],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Write the JSON here (default: stdout).")
    ] = (STDIO),
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    from fedmoe.io.atomic import check_writable
    from fedmoe.io.checkpoint_set import load_checkpoint_set
    from fedmoe.io.hf_folder import HFModel
    from fedmoe.io.partition_file import load_partition
    from fedmoe.train import evaluate_models

    console = stderr_console(quiet)
    if out != STDIO:
        check_writable(Path(out), force)  # refuse before any work, not after printing the table
    part = load_partition(partition)
    ckpts = load_checkpoint_set(models)
    unknown = sorted(c for c in ckpts if c is not None and c >= part.num_clients)
    if unknown:
        raise InputError(
            f"checkpoint for client {unknown[0]} but the partition has clients 0.."
            f"{part.num_clients - 1}"
        )
    if isinstance(next(iter(ckpts.values())), HFModel):
        report, summary = _language(ckpts, part), _lm_summary
    else:
        config = next(iter(ckpts.values())).moe_config
        config.check_data(part.dataset.input_shape, part.dataset.num_classes, str(partition))
        if set(ckpts) == {None}:
            states = {cid: ckpts[None].state() for cid in range(part.num_clients)}
        else:
            states = {cid: c.state() for cid, c in ckpts.items() if cid is not None}
        result = evaluate_models(config, states, part.dataset, part.clients, part.global_test)
        domains = list(part.dataset.domain_names)
        report, summary = {**header("evaluation"), **result, "domain_names": domains}, _summary
    if out != STDIO:
        write_manifest(report, Path(out), force=force)
    summary(console, report)
    if out == STDIO:
        write_manifest(report, STDIO) if not json_ else emit(None, report, True)
    else:
        emit(out, report, json_)


def _language(ckpts: dict[Any, Any], part: Any) -> dict[str, Any]:
    """Per-byte perplexity of Hugging Face language models (one loaded at a time)."""
    import torch

    from fedmoe.pipeline.train_lm import evaluate_lm_clients

    if set(ckpts) == {None}:
        picked = dict.fromkeys(range(part.num_clients), ckpts[None])
    else:
        picked = {c: k for c, k in ckpts.items() if c is not None}
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        result = evaluate_lm_clients(picked, part)
    finally:
        torch.set_num_threads(threads)
    return {**header("evaluation"), **result, "domain_names": list(part.dataset.domain_names)}


def _lm_summary(console: Any, report: dict[str, Any]) -> None:
    if console.quiet:
        return
    table = Table(title="evaluation (perplexity per byte)", title_justify="left")
    for col in ("client", "local test", "n", "global test"):
        table.add_column(col, justify="right")
    for row in report["clients"][:25]:
        table.add_row(
            str(row["id"]), f"{row['local_ppl'] or 0:.3f}", str(row["local_n"]),
            f"{row['global_ppl'] or 0:.3f}",
        )  # fmt: skip
    console.print(table)
    doms = ", ".join(
        f"{n} {v:.3f}" if v is not None else f"{n} -"
        for n, v in zip(report["domain_names"], report["local_ppl_by_domain"], strict=True)
    )
    console.print(
        f"mean local {report['mean_local_ppl']} · worst local {report['worst_local_ppl']} · "
        f"mean global {report['mean_global_ppl']} · local by domain: {doms}"
    )


def _summary(console: Any, report: dict[str, Any]) -> None:
    if console.quiet:
        return
    table = Table(title="evaluation (accuracy %)", title_justify="left")
    for col in ("client", "local test", "n", "global test"):
        table.add_column(col, justify="right")
    for row in report["clients"][:25]:
        table.add_row(
            str(row["id"]), pct(row["local_acc"]), str(row["local_n"]), pct(row["global_acc"])
        )
    console.print(table)
    doms = ", ".join(
        f"{n} {pct(v)}"
        for n, v in zip(report["domain_names"], report["local_acc_by_domain"], strict=True)
    )
    console.print(
        f"mean local {pct(report['mean_local_acc'])} · worst local "
        f"{pct(report['worst_local_acc'])} · mean global {pct(report['mean_global_acc'])} · "
        f"by domain: {doms}"
    )


command = handle_errors(evaluate)
