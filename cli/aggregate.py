"""``fedmoe aggregate``: the FedMoE-DA merge (and its baselines) over client checkpoints, or a plain
weighted merge of any safetensors files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.table import Table

from fedmoe.aggregate.registry import AGGREGATORS
from fedmoe.errors import InputError, ParamError, UsageError
from fedmoe.io.manifest import sha256_file

if TYPE_CHECKING:
    from fedmoe.aggregate import Aggregator
    from fedmoe.io.checkpoint import Checkpoint
    from fedmoe.io.partition_file import LoadedPartition

from .common import (
    Force,
    Json,
    LayoutFile,
    NumSamples,
    Quiet,
    emit,
    folder_options,
    handle_errors,
    parse_params,
    stderr_console,
)

FEDERATED = tuple(AGGREGATORS)
PLAIN = ("mean", "fedavg", "linear")

HELP = f"""Merge checkpoints.

[bold]Federated mode[/bold] (--out is a folder): one checkpoint per client,
DIR/client-XXX.safetensors, the server's shared parts DIR/server.safetensors (when every client
receives the same ones), and DIR/aggregate.json (accepted by train-round --model). Methods:
{"; ".join(f"{k}: {v.summary}" for k, v in AGGREGATORS.items())}. --plan implies fedmoe-da (Eq. 11
per MoE layer: θ_(i,j) ← Σ a θ_(i',j'), sources may be other clients and other expert indices);
its parameters (gate mode, interval) come from the plan. Method parameters (--param key=value):
{"; ".join(f"{k}: {', '.join(v.parameters())}" for k, v in AGGREGATORS.items() if v.parameters())}.

Partial participation: give this round's checkpoints as arguments and the current models of the
clients that sat out with --previous. Every client gets a model: FedAvg, naive-moe and the oracle
give their new (group) model to every client of the group; with fedmoe-da a client that sat out
gets the new shared parts and keeps its own experts.

[bold]Plain mode[/bold] (--out ends in .safetensors): out = Σ w_f · file_f over any compatible
safetensors files (as mergekit's linear merge): --method mean (equal weights), fedavg (weights from
each file's num_samples metadata) or linear with --weights. Names, shapes and dtypes must match
(--on-missing intersection merges the common names). Inputs are streamed; metadata is kept.

Both modes refuse NaN/Inf, unknown clients, plans whose weights do not sum to 1 and mixed model
configs, and then write nothing.

Examples:

  fedmoe affinity r1/ | fedmoe plan-sync - | fedmoe aggregate --plan - r1/ --out agg1/

  fedmoe aggregate --method naive-moe r1/train-round.json --out agg1/

  fedmoe aggregate --method fedavg -p reduce=median r2/ --previous agg1/ --out agg2/

  fedmoe aggregate a.safetensors b.safetensors --weights 0.7,0.3 --out merged.safetensors
"""


def aggregate(
    checkpoints: Annotated[
        list[str], typer.Argument(help="Checkpoints, folders, manifests, or -.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder (federated) or .safetensors.")],
    plan: Annotated[str | None, typer.Option(help="Sync plan (fedmoe-da), or - for stdin.")] = None,
    method: Annotated[
        str | None,
        typer.Option(help=f"Federated: {', '.join(FEDERATED)}. Plain: {', '.join(PLAIN)}."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Federated: a method parameter, key=value (e.g. reduce=median). Repeatable.",
        ),
    ] = None,
    previous: Annotated[
        list[str] | None,
        typer.Option(
            help="Federated: current models of clients that sat this round out (folder or "
            "aggregate manifest); they receive the round's new shared parts or group model."
        ),
    ] = None,
    gate: Annotated[
        str | None, typer.Option(help="Federated fedmoe-da: must match the plan's gate if given.")
    ] = None,
    partition: Annotated[
        str | None, typer.Option(help="Partition manifest (oracle-domain reads true domains).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Plain: comma-separated weights, one per file.")
    ] = None,
    on_missing: Annotated[str, typer.Option(help="Plain: 'error' or 'intersection'.")] = "error",
    layout: LayoutFile = None,
    num_samples: NumSamples = None,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    console = stderr_console(quiet)
    if out.suffix == ".safetensors":
        if plan is not None:
            raise UsageError("--plan needs a folder --out (one checkpoint per client)")
        if param or previous:
            raise UsageError("--param and --previous are for a federated merge into a folder --out")
        _plain(checkpoints, out, method or "mean", weights, on_missing, force, json_, console)
    elif _model_folders(checkpoints) and (weights is not None or method in ("mean", "linear")):
        if plan is not None or param or previous:
            raise UsageError("--plan, --param and --previous are for a federated merge")
        _plain_folders(
            checkpoints, out, method or "mean", weights, on_missing, force, json_, console
        )
    else:
        if weights is not None:
            raise UsageError(
                "--weights is for a plain merge (into one .safetensors --out, or of model folders)"
            )
        options = folder_options(layout, num_samples)
        _federated(
            checkpoints,
            out,
            plan,
            method,
            param,
            previous,
            gate,
            partition,
            force,
            json_,
            console,
            options,
        )


def _federated(
    inputs: list[str],
    out: Path,
    plan: str | None,
    method: str | None,
    param: list[str] | None,
    previous: list[str] | None,
    gate: str | None,
    partition: str | None,
    force: bool,
    json_: bool,
    console: Any,
    options: Any = None,
) -> None:
    from fedmoe.aggregate import AGGREGATORS, make_method
    from fedmoe.io.checkpoint_set import client_checkpoints
    from fedmoe.io.partition_file import load_partition
    from fedmoe.io.plan_file import load_plan
    from fedmoe.pipeline.merge import merge_round

    if plan is not None and method not in (None, "fedmoe-da"):
        raise UsageError(
            f"--plan is the fedmoe-da merge; it cannot be combined with --method {method}"
        )
    name = "fedmoe-da" if plan is not None else (method or "")
    if name not in AGGREGATORS:
        raise UsageError(
            f"federated --method must be one of {', '.join(FEDERATED)}"
            + (f", got '{method}'" if method else ""),
            hint="fedmoe-da needs --plan PLAN",
        )
    if name == "fedmoe-da" and plan is None:
        raise UsageError("fedmoe-da needs --plan PLAN (from fedmoe plan-sync)")
    if "-" in inputs and plan == "-":
        raise UsageError("only one of the plan and the checkpoints can come from stdin")
    fresh = client_checkpoints(inputs, "aggregate", options)
    part = load_partition(partition) if partition is not None else None  # no data is read
    carried = _carried(previous or [], part, options)
    params: dict[str, Any] = parse_params(param)
    loaded = None
    aggregator: Aggregator
    if plan is not None:  # the plan fixes fedmoe-da's parameters (its matrices were made with them)
        loaded = load_plan(plan)
        aggregator = loaded.plan.method
        if params:
            raise UsageError(
                "--param: the sync plan fixes fedmoe-da's parameters",
                hint="give them to fedmoe plan-sync instead",
            )
        if gate is not None and gate != aggregator.gate.value:
            raise UsageError(
                f"--gate {gate}: the sync plan was made for the {aggregator.gate.value} gate",
                hint=f"re-plan with fedmoe plan-sync --gate {gate}",
            )
    else:
        if gate is not None:
            raise UsageError("--gate is a fedmoe-da option; it comes with the sync plan")
        try:
            aggregator = make_method(name, params)
        except ParamError as exc:  # given as --param key=value
            raise UsageError(f"--param {exc.worded(exc.key)}", hint=exc.hint) from None
    groups: dict[int, int] = {}
    if part is not None:
        for cid in sorted({*fresh, *carried}):
            part.client(cid)  # an unknown client id is an input error
            groups[cid] = part.dominant_domain(cid)
    _, manifest = merge_round(fresh, carried, aggregator, loaded, plan, groups, out, force)
    if not console.quiet:
        kept = len(manifest["carried"])
        console.print(
            f"aggregate ({name}, gate {manifest['gate']}): {len(manifest['checkpoints'])} "
            f"checkpoints in {out}"
            + (f" ({kept} carried over from clients that sat out)" if kept else "")
            + (", shared parts in server.safetensors" if manifest["server"] else "")
        )
    emit(out / "aggregate.json", manifest, json_)


def _carried(
    previous: list[str], part: LoadedPartition | None, options: Any = None
) -> dict[int, Checkpoint]:
    """The current models of the clients that sat the round out: per-client checkpoints, or one
    global model (e.g. the initial one) for every client of ``--partition``."""
    from fedmoe.io.checkpoint_set import load_checkpoint_set

    if not previous:
        return {}
    found = load_checkpoint_set(previous, options)
    if None not in found:
        return {int(c): k for c, k in sorted(found.items()) if c is not None}
    if len(found) > 1 or part is None:
        raise UsageError(
            f"--previous {found[None].path} is a global model",
            hint="give --partition too, so that every client of the federation receives a model",
        )
    return {c: found[None] for c in range(part.num_clients)}


def _plain(
    inputs: list[str],
    out: Path,
    method: str,
    weights: str | None,
    on_missing: str,
    force: bool,
    json_: bool,
    console: Any,
) -> None:
    from fedmoe.io.atomic import OutputSet
    from fedmoe.io.linear_merge import MappedFile, merged_metadata, plan_linear, write_linear

    if method not in PLAIN:
        raise UsageError(f"plain --method must be one of {', '.join(PLAIN)}, got '{method}'")
    if len(inputs) < 1:
        raise UsageError("give at least one file to merge")
    files = [MappedFile(p) for p in _plain_files(inputs)]
    try:
        w, used = _weights(files, method, weights)
        specs = plan_linear(files, on_missing)
        digests = [sha256_file(f.path) for f in files]
        meta = merged_metadata(files, w, used, digests)
        with OutputSet(force) as outputs, outputs.open(out) as handle:
            write_linear(handle, files, w, specs, meta)
    finally:
        for f in files:
            f.close()
    _print_weights(console, used, "file", files, w, f"{len(specs)} tensors → {out}")
    emit(
        out,
        {
            "ok": True,
            "path": str(out),
            "sha256": sha256_file(out),
            "weights": w,
            "tensors": len(specs),
        },
        json_,
    )


def _print_weights(
    console: Any, used: str, what: str, inputs: Sequence[Any], w: list[float], tail: str
) -> None:
    """The plain merge's table of inputs and weights, then ``tail``."""
    if console.quiet:
        return
    table = Table(title=f"merge ({used})", title_justify="left")
    table.add_column(what)
    table.add_column("weight", justify="right")
    for f, x in zip(inputs, w, strict=True):
        table.add_row(str(f.path), f"{x:.4f}")
    console.print(table)
    console.print(tail)


def _model_folders(inputs: list[str]) -> bool:
    """True when every input is a model folder (a ``config.json`` beside its safetensors)."""
    from fedmoe.io.hf_folder import is_hf_folder

    return bool(inputs) and all(is_hf_folder(Path(i)) for i in inputs)


def _weights(files: list[Any], method: str, weights: str | None) -> tuple[list[float], str]:
    """The plain merge's weights, one per input, and the method they amount to."""
    if weights is not None:
        try:
            w = [float(x) for x in weights.split(",")]
        except ValueError:
            raise UsageError(f"--weights {weights!r}: expected numbers like 0.5,0.5") from None
        if len(w) != len(files):
            raise UsageError(f"--weights has {len(w)} values for {len(files)} inputs")
        if any(not np.isfinite(x) for x in w):
            raise UsageError("--weights must be finite")
        return w, "linear"
    if method == "linear":
        raise UsageError("--method linear needs --weights")
    if method == "fedavg":
        try:
            counts = [int(f.metadata["num_samples"]) for f in files]
        except (KeyError, ValueError):
            raise InputError(
                "fedavg needs an integer num_samples metadata entry in every file",
                hint="use --method mean or --weights",
            ) from None
        for f, c in zip(files, counts, strict=True):
            if not 0 <= c < 2**53:
                raise InputError(
                    f"{f.path}: num_samples = {c} is not a sample count",
                    hint="use --method mean or --weights",
                )
        total = sum(counts)
        if total <= 0:
            raise InputError("fedavg: num_samples sum to 0")
        return [c / total for c in counts], "fedavg"
    return [1.0 / len(files)] * len(files), "mean"


def _plain_folders(
    inputs: list[str],
    out: Path,
    method: str,
    weights: str | None,
    on_missing: str,
    force: bool,
    json_: bool,
    console: Any,
) -> None:
    """A plain merge of whole model folders (every tensor, as mergekit's linear merge) into one
    folder in the first input's layout."""
    from fedmoe.io.atomic import OutputSet
    from fedmoe.io.hf_folder import folder_digest
    from fedmoe.io.linear_merge import (
        MappedFolder,
        merged_metadata,
        plan_linear,
        write_linear_folder,
    )

    folders: list[MappedFolder] = []
    try:
        for item in inputs:
            folders.append(MappedFolder(Path(item)))
        w, used = _weights(folders, method, weights)
        specs = plan_linear(list(folders), on_missing)
        digests = [
            folder_digest({p.name: sha256_file(p) for p in f.path.iterdir() if p.is_file()})
            for f in folders
        ]
        meta = merged_metadata(list(folders), w, used, digests)
        with OutputSet(force) as outputs:
            shards = write_linear_folder(outputs, out, folders, w, specs, meta)
    finally:
        for f in folders:
            f.close()
    _print_weights(
        console,
        used,
        "model folder",
        folders,
        w,
        f"{len(specs)} tensors in {shards} shard(s) → {out}",
    )
    emit(out, {"ok": True, "path": str(out), "weights": w, "tensors": len(specs)}, json_)


def _plain_files(inputs: list[str]) -> list[Path]:
    """The files a plain merge reads: each file given, and every ``.safetensors`` file of each
    folder given (in name order)."""
    from fedmoe.io.hf_folder import is_hf_folder

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if is_hf_folder(path):
            raise UsageError(
                f"{path} is a model folder; a plain merge of model folders writes a folder",
                hint="give a folder --out (fedmoe aggregate A/ B/ --method mean --out merged/)",
            )
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise InputError(f"{path}: folder holds no .safetensors file")
            out.extend(found)
        else:
            out.append(path)
    return out


command = handle_errors(aggregate)
