"""The round's merge on files: every client's next model, from this round's checkpoints (and, for
clients that sat the round out, their current ones), by any method's merge spec
(:func:`fedmoe.round.plan_round`) and the one merge engine. Outputs stream tensor by tensor; a
group's result is computed once and written into each member's file."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

from fedmoe import __version__
from fedmoe.aggregate.base import Aggregator, CrossExpert, RoundInputs
from fedmoe.aggregate.engine import Merger
from fedmoe.errors import InputError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import Checkpoint, CheckpointMeta
from fedmoe.io.checkpoint_set import CheckpointSource, check_same_architecture
from fedmoe.io.hf_folder import HFModel, copy_hf_files, hf_outputs
from fedmoe.io.manifest import STDIO, dumps, header, relative
from fedmoe.io.plan_file import LoadedPlan
from fedmoe.io.safetensors_format import OutputFile, StreamWriter, TensorSpec
from fedmoe.model.schema import Role
from fedmoe.params import params_dict as method_params
from fedmoe.round import RoundPlan, plan_round

SHARED_FORMAT = "fedmoe-shared/2"
MAX_OPEN = 256  # output files written at once


def stream_outputs(outputs: OutputSet, files: list[OutputFile], merger: Merger) -> None:
    """Write every output file tensor-major: each tensor is computed (once per group) and written
    into every file that holds it, then released, so peak memory is a few tensors, not a model.
    With more than :data:`MAX_OPEN` files they are written in batches and a group's results stay
    cached across batches (one model's worth at most).

    The merge computes and hashes in this thread while one writer thread writes the finished
    tensors (at most :data:`IN_FLIGHT` waiting), so the computing and the disk overlap; each file's
    sha256 is taken from the bytes it is given, never by reading the file back.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))  # a core for the writer thread: no oversubscribing
    try:
        _stream(outputs, files, merger)
    finally:
        torch.set_num_threads(threads)


def _stream(outputs: OutputSet, files: list[OutputFile], merger: Merger) -> None:
    single = len(files) <= MAX_OPEN
    for lo in range(0, len(files), MAX_OPEN):
        with ExitStack() as stack:
            route: dict[str, list[tuple[int, StreamWriter, HashingHandle]]] = {}
            hashed: list[tuple[Path, HashingHandle]] = []
            writers = []
            for f in files[lo : lo + MAX_OPEN]:
                handle = HashingHandle(stack.enter_context(outputs.open(f.path)))
                hashed.append((f.path, handle))
                writer = StreamWriter(handle, f.specs, f.metadata)
                writers.append(writer)
                for spec in writer.order:
                    route.setdefault(spec.name, []).append((f.client, writer, handle))
            with WriterThread() as background:
                for name in sorted(route):
                    for client, writer, handle in route[name]:
                        data = writer.next_bytes(name, merger.tensor(client, name))
                        background.put(handle, data)  # hashed and written by the writer thread
                    if single:
                        merger.release(name)
            for writer in writers:
                writer.close()
            for path, handle in hashed:
                outputs.record_sha256(path, handle.hexdigest())


IN_FLIGHT = 2  # finished tensors waiting for the writer thread


class HashingHandle:
    """A binary file handle that hashes what is written through it (or given to :meth:`update`
    and written to :attr:`raw` by someone else, in order)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.raw = handle
        self._digest = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        """Hash ``data``, the next bytes of the file."""
        self._digest.update(data)

    def write(self, data: bytes | memoryview) -> int:
        self.update(data)
        return self.raw.write(data)

    def hexdigest(self) -> str:
        """sha256 of everything hashed so far."""
        return self._digest.hexdigest()


class WriterThread:
    """Writes ``(handle, bytes)`` items in order on one background thread (a
    :class:`HashingHandle` hashes them there too: hashlib releases the GIL, so hashing overlaps
    the merge); an error there is raised again in the caller's thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[BinaryIO | HashingHandle, memoryview] | None] = queue.Queue(
            IN_FLIGHT
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WriterThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0].write(item[1])
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def put(self, handle: BinaryIO | HashingHandle, data: memoryview) -> None:
        """Queue one write (blocks while :data:`IN_FLIGHT` are waiting)."""
        if self._error is not None:
            raise self._error
        self._queue.put((handle, data))

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def merge_round(
    fresh: dict[int, Checkpoint],
    carried: dict[int, Checkpoint],
    method: Aggregator,
    plan: LoadedPlan | None,
    plan_source: str | None,
    groups: dict[int, int],
    out: Path,
    force: bool = False,
) -> tuple[RoundPlan, dict[str, Any]]:
    """Merge one round into ``out``: ``client-XXX.safetensors`` for every client,
    ``server.safetensors`` (the shared parts, when every client receives the same) and
    ``aggregate.json``, published together.

    Parameters
    ----------
    fresh
        This round's trained checkpoints (the participants).
    carried
        Current models of the clients that sat the round out; a participant's entry, when it is
        the model its trained checkpoint started from, serves the ``expert_trust`` defence.
    method
        The aggregation method.
    plan, plan_source
        FedMoE-DA's sync plan and how it was named.
    groups
        True domain group of each client (the oracle only).
    out
        The output folder.
    """
    if not fresh:
        raise InputError("no checkpoint of this round to aggregate")
    # a participant's start model: the given checkpoint its trained one was made from
    starts = {
        c: carried[c]
        for c, k in fresh.items()
        if c in carried and carried[c].sha256 == k.meta.parent_sha256
    }
    carried = {c: k for c, k in carried.items() if c not in fresh}
    models = dict(sorted({**carried, **fresh}.items()))
    first = next(iter(fresh.values()))
    config, schema = first.config, first.schema
    check_same_architecture([first, *models.values()])
    if plan is not None and plan.config != config:
        raise InputError(
            f"{plan.where}: the sync plan was made for a different model_config than the "
            "checkpoints"
        )
    if plan is not None:  # a plan made from this round's uploads names them: refuse others
        for c, digest in dict(plan.manifest.get("uploads") or {}).items():
            got = fresh.get(int(c))
            if got is not None and got.sha256 != digest:
                raise InputError(
                    f"{got.path}: is not the checkpoint of client {c} that {plan.where} was "
                    "computed from (sha256 differs)",
                    hint="aggregate the checkpoints the plan was made from, or re-plan",
                )
    if plan is not None:  # a plan reused within its interval is bound to its round instead
        for k in fresh.values():
            if k.meta.round != plan.plan.round:
                raise InputError(
                    f"{k.path}: a checkpoint of round {k.meta.round}, but {plan.where} is the "
                    f"plan of round {plan.plan.round}",
                    hint="aggregate each round's checkpoints with that round's plan",
                )
    round_ = max(k.meta.round for k in fresh.values())
    ids = tuple(models)
    inputs = RoundInputs(
        round_, schema, ids, {c: k.upload(proxies=False) for c, k in fresh.items()}, groups
    )
    rplan = plan_round(inputs, method, plan.plan if plan is not None else None)
    spec = rplan.spec
    names = list(schema.names)
    dtypes = {n: first.dtype(n) for n in names}
    specs = [TensorSpec(n, dtypes[n], first.shape(n)) for n in names]
    needs = {  # defences that need each participant's model from the start of the round
        "expert_trust": any(isinstance(m, CrossExpert) and m.defence.trust for m in spec.experts),
        "expert_reduce aligned-mean": any(
            isinstance(m, CrossExpert) and m.defence.reduce.needs_start for m in spec.experts
        ),
        "reduce aligned-mean": spec.reduce.needs_start,
    }
    needed = [what for what, on in needs.items() if on]
    missing = sorted(set(fresh) - set(starts))
    if needed and missing:
        raise InputError(
            f"{needed[0]} needs each participant's model from the start of the round; client "
            f"{missing[0]}'s is not among the models given",
            hint="pass the previous round's models (or the initial one) with --previous",
        )
    merger = Merger(
        spec, schema, CheckpointSource(models), dtypes, CheckpointSource(starts) if needed else None
    )
    folders = isinstance(first, HFModel)  # Hugging Face folders in, folders out
    paths = {
        c: out / (f"client-{c:03d}" if folders else f"client-{c:03d}.safetensors") for c in ids
    }
    manifest_path = out / "aggregate.json"
    plan_sha = plan.sha256 if plan is not None else ""
    with ThreadPoolExecutor(2) as pool:  # the inputs' digests, hashed on two cores
        list(pool.map(lambda k: k.sha256, [*models.values(), *starts.values()]))
    provenance = json.dumps(
        {
            "method": method.name,
            "plan_sha256": plan_sha,
            "sources": sorted(k.sha256 for k in fresh.values()),
        },
        separators=(",", ":"),
    )
    shared_names = [
        e.name
        for e in schema.entries
        if e.role is Role.SHARED or (e.role is Role.GATE and len(spec.gate) == 1)
    ]
    one_group = len(spec.shared) == 1 and set(spec.shared[0].members) == set(ids)

    entries = []
    with OutputSet(force) as outputs:
        for c, p in paths.items():
            own = models[c]
            for f in own.files if isinstance(own, HFModel) else [""]:
                outputs.reserve(p / f if f else p)
        outputs.reserve(manifest_path)
        files: list[OutputFile] = []
        metas: dict[int, CheckpointMeta] = {}
        for c in ids:
            own = models[c]
            metas[c] = CheckpointMeta(
                config,
                c,
                round_,
                own.meta.num_samples,
                own.meta.seed,
                method.name,
                parent_sha256=own.sha256,
                routing=own.meta.routing,
                extra={**own.meta.extra, "merge": provenance},
                cluster=own.meta.cluster,
            )
            if isinstance(own, HFModel):
                files.extend(hf_outputs(paths[c], own, metas[c], c))
            else:
                files.append(OutputFile(paths[c], specs, metas[c].to_metadata(), c))
        server = None
        if one_group and shared_names:
            server_path = out / "server.safetensors"
            outputs.reserve(server_path)
            smeta = {
                "fedmoe_version": __version__,
                "format": SHARED_FORMAT,
                "model_config": config.to_json(),
                "round": str(round_),
                "method": method.name,
                "num_samples": str(sum(k.meta.num_samples for k in fresh.values())),
            }
            server_specs = [s for s in specs if s.name in shared_names]
            files.append(OutputFile(server_path, server_specs, smeta, ids[0]))
            server = {"path": server_path.name, "sha256": "", "tensors": shared_names}
        stream_outputs(outputs, files, merger)
        for c in ids:
            own = models[c]
            if isinstance(own, HFModel):
                digest = copy_hf_files(outputs, paths[c], own)
            else:
                digest = outputs.staged_sha256(paths[c])
            entries.append(
                {
                    "client": c,
                    "path": relative(paths[c], out),
                    "sha256": digest,
                    "num_samples": own.meta.num_samples,
                    "trained": c in fresh,
                }
            )
        if server is not None:
            server["sha256"] = outputs.staged_sha256(out / "server.safetensors")
        manifest = {
            **header("aggregate"),
            "method": method.name,
            "params": method_params(method),
            "round": round_,
            "gate": "shared" if spec.gate else "per-client",
            "plan": None
            if plan is None
            else {
                "path": plan_source
                if plan_source == STDIO
                else relative(Path(str(plan_source)), out),
                "sha256": plan_sha,
            },
            "inputs": [
                {"client": c, "path": relative(k.path, out), "sha256": k.sha256}
                for c, k in fresh.items()
            ],
            "carried": [
                {"client": c, "path": relative(k.path, out), "sha256": k.sha256}
                for c, k in carried.items()
            ],
            "checkpoints": entries,
            "server": server,
            "ledger": rplan.ledger.to_dict(),
        }
        outputs.write_bytes(manifest_path, dumps(manifest).encode())
    return rplan, manifest
