"""``fedmoe aggregate``: the FedMoE-DA merge (and its baselines) over client checkpoints, or a plain
weighted merge of any safetensors files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from fedmoe import __version__
from fedmoe.aggregate import AGGREGATORS, ClientInfo, FedMoEDA
from fedmoe.aggregate.engine import merge_client
from fedmoe.aggregate.linear import MappedFile, merged_metadata, plan_linear, write_linear
from fedmoe.errors import InputError, UsageError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import CheckpointMeta
from fedmoe.io.checkpoint_set import CheckpointSource, load_checkpoint_set
from fedmoe.io.manifest import dumps, header, relative, sha256_file
from fedmoe.io.partition_file import load_partition
from fedmoe.io.plan_file import load_plan
from fedmoe.io.safetensors_format import StreamWriter, TensorSpec

from .common import Force, Json, Quiet, emit, handle_errors, stderr_console

FEDERATED = tuple(AGGREGATORS)
PLAIN = ("mean", "fedavg", "linear")

HELP = f"""Merge checkpoints.

[bold]Federated mode[/bold] (--out is a folder): one personalised checkpoint per client,
DIR/client-XXX.safetensors, the server's shared parts DIR/server.safetensors (when every client
receives the same ones), and DIR/aggregate.json (accepted by train-round --model). Methods:
{"; ".join(f"{k}: {v.summary}" for k, v in AGGREGATORS.items())}. --plan implies fedmoe-da (Eq. 11:
θ_(i,j) ← Σ a θ_(i',j'), sources may be other clients and other expert indices); its gate mode
comes from the plan.

[bold]Plain mode[/bold] (--out ends in .safetensors): out = Σ w_f · file_f over any compatible
safetensors files (as mergekit's linear merge): --method mean (equal weights), fedavg (weights from
each file's num_samples metadata) or linear with --weights. Names, shapes and dtypes must match
(--on-missing intersection merges the common names). Inputs are streamed; metadata is kept.

Both modes refuse NaN/Inf, unknown clients, plans whose weights do not sum to 1 and mixed model
configs, and then write nothing.

Examples:

  fedmoe affinity r1/ | fedmoe plan-sync - | fedmoe aggregate --plan - r1/ --out agg1/

  fedmoe aggregate --method naive-moe r1/train-round.json --out agg1/

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
    gate: Annotated[
        str | None, typer.Option(help="Federated: 'per-client' or 'shared' gate (default: plan's).")
    ] = None,
    partition: Annotated[
        str | None, typer.Option(help="Partition manifest (oracle-domain reads true domains).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Plain: comma-separated weights, one per file.")
    ] = None,
    on_missing: Annotated[str, typer.Option(help="Plain: 'error' or 'intersection'.")] = "error",
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    console = stderr_console(quiet)
    if out.suffix == ".safetensors":
        if plan is not None:
            raise UsageError("--plan needs a folder --out (one checkpoint per client)")
        _plain(checkpoints, out, method or "mean", weights, on_missing, force, json_, console)
    else:
        if weights is not None:
            raise UsageError("--weights is for a plain merge into one .safetensors --out")
        _federated(checkpoints, out, plan, method, gate, partition, force, json_, console)


def _federated(
    inputs: list[str],
    out: Path,
    plan: str | None,
    method: str | None,
    gate: str | None,
    partition: str | None,
    force: bool,
    json_: bool,
    console: Any,
) -> None:
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
    ckpts = load_checkpoint_set(inputs)
    if None in ckpts:
        raise UsageError(
            f"{ckpts[None].path} is a global model; aggregate merges client checkpoints",
            hint="pass the checkpoints written by train-round",
        )
    clients = {int(c): k for c, k in ckpts.items() if c is not None}
    ids = sorted(clients)
    config = clients[ids[0]].config
    plan_meta: dict[str, Any] = {}
    plan_sha = ""
    if plan is not None:
        loaded = load_plan(plan)
        matrix, plan_meta, plan_sha = loaded.matrix, loaded.manifest, loaded.sha256
        if plan_meta.get("model_config") != json.loads(config.to_json()):
            raise InputError(
                "the sync plan was made for a different model_config than the checkpoints"
            )
        aggregator: Any = FedMoEDA(matrix)
        gate_mode = gate or plan_meta.get("gate", "per-client")
    else:
        aggregator = AGGREGATORS[name]()
        gate_mode = gate or "per-client"
    if gate_mode not in ("per-client", "shared"):
        raise UsageError(f"--gate must be 'per-client' or 'shared', got '{gate_mode}'")
    groups: dict[int, int] = {}
    if partition is not None:
        part = load_partition(partition)
        for cid in ids:
            part.client(cid)  # an unknown client id is an input error
            counts = part.manifest["clients"][cid]["domain_counts"]
            groups[cid] = int(np.argmax(counts))
    infos = [
        ClientInfo(c, clients[c].meta.num_samples, clients[c].meta.routing, groups.get(c))
        for c in ids
    ]
    spec = aggregator.spec(infos, config.num_experts, gate_mode == "shared")
    source = CheckpointSource(clients)
    first = clients[ids[0]]
    names = list(first.names)
    dtypes = {n: first.dtype(n) for n in names}
    specs = [TensorSpec(n, dtypes[n], first.shape(n)) for n in names]
    paths = {c: out / f"client-{c:03d}.safetensors" for c in ids}
    manifest_path = out / "aggregate.json"
    uniform = len({spec.shared[c] for c in ids}) == 1
    shared_names = [
        n for n in names if n.startswith("embed.") or (n.startswith("gate.") and spec.gate_shared)
    ]
    cache: dict[tuple[object, ...], Any] = {}
    entries = []
    provenance = json.dumps(
        {
            "method": name,
            "plan_sha256": plan_sha,
            "sources": sorted(k.sha256 for k in clients.values()),
        },
        separators=(",", ":"),
    )

    def write_model(
        path: Path, tensors: list[TensorSpec], metadata: dict[str, str], c: int
    ) -> None:
        """Stream client ``c``'s merged tensors (those in ``tensors``) into ``path``."""
        with outputs.open(path) as handle:
            writer = StreamWriter(handle, tensors, metadata)
            order = [s.name for s in writer.order]
            for tname, tensor in merge_client(spec, source, c, order, dtypes, cache):
                writer.write(tname, tensor)
            writer.close()

    with OutputSet(force) as outputs:
        for p in [*paths.values(), manifest_path]:
            outputs.reserve(p)
        for c in ids:
            own = clients[c]
            meta = CheckpointMeta(
                config,
                c,
                own.meta.round,
                own.meta.num_samples,
                own.meta.seed,
                name,
                parent_sha256=own.sha256,
                routing=own.meta.routing,
                extra={**own.meta.extra, "merge": provenance},
            )
            write_model(paths[c], specs, meta.to_metadata(), c)
            entries.append(
                {
                    "client": c,
                    "path": relative(paths[c], out),
                    "sha256": outputs.staged_sha256(paths[c]),
                    "num_samples": own.meta.num_samples,
                }
            )
        server = None
        if uniform and shared_names:
            server_path = out / "server.safetensors"
            outputs.reserve(server_path)
            server_specs = [s for s in specs if s.name in shared_names]
            smeta = {
                "fedmoe_version": __version__,
                "format": "fedmoe-shared/1",
                "model_config": config.to_json(),
                "round": str(first.meta.round),
                "method": name,
                "num_samples": str(sum(k.meta.num_samples for k in clients.values())),
            }
            write_model(server_path, server_specs, smeta, ids[0])
            server = {
                "path": server_path.name,
                "sha256": outputs.staged_sha256(server_path),
                "tensors": shared_names,
            }
        manifest = {
            **header("aggregate"),
            "method": name,
            "round": first.meta.round,
            "gate": "shared" if spec.gate_shared else "per-client",
            "plan": None
            if plan is None
            else {"path": plan if plan == "-" else relative(Path(plan), out), "sha256": plan_sha},
            "inputs": [
                {"client": c, "path": relative(clients[c].path, out), "sha256": clients[c].sha256}
                for c in ids
            ],
            "checkpoints": entries,
            "server": server,
        }
        outputs.write_bytes(manifest_path, dumps(manifest).encode())
    if not console.quiet:
        console.print(
            f"aggregate ({name}, gate {manifest['gate']}): {len(ids)} personalised checkpoints in {out}"
            + (", shared parts in server.safetensors" if server else "")
        )
    emit(manifest_path, manifest, json_)


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
    if method not in PLAIN:
        raise UsageError(f"plain --method must be one of {', '.join(PLAIN)}, got '{method}'")
    if len(inputs) < 1:
        raise UsageError("give at least one file to merge")
    files = [MappedFile(Path(p)) for p in inputs]
    try:
        if weights is not None:
            try:
                w = [float(x) for x in weights.split(",")]
            except ValueError:
                raise UsageError(f"--weights {weights!r}: expected numbers like 0.5,0.5") from None
            if len(w) != len(files):
                raise UsageError(f"--weights has {len(w)} values for {len(files)} files")
            used = "linear"
        elif method == "linear":
            raise UsageError("--method linear needs --weights")
        elif method == "fedavg":
            try:
                counts = [float(f.metadata["num_samples"]) for f in files]
            except (KeyError, ValueError):
                raise InputError(
                    "fedavg needs a num_samples metadata entry in every file",
                    hint="use --method mean or --weights",
                ) from None
            total = sum(counts)
            if total <= 0:
                raise InputError("fedavg: num_samples sum to 0")
            w, used = [c / total for c in counts], "fedavg"
        else:
            w, used = [1.0 / len(files)] * len(files), "mean"
        if any(not np.isfinite(x) for x in w):
            raise UsageError("--weights must be finite")
        specs = plan_linear(files, on_missing)
        digests = [sha256_file(f.path) for f in files]
        meta = merged_metadata(files, w, used, digests)
        with OutputSet(force) as outputs, outputs.open(out) as handle:
            write_linear(handle, files, w, specs, meta)
    finally:
        for f in files:
            f.close()
    if not console.quiet:
        table = Table(title=f"merge ({used})", title_justify="left")
        table.add_column("file")
        table.add_column("weight", justify="right")
        for f, x in zip(files, w, strict=True):
            table.add_row(str(f.path), f"{x:.4f}")
        console.print(table)
        console.print(f"{len(specs)} tensors → {out}")
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


command = handle_errors(aggregate)
