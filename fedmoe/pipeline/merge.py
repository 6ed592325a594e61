"""The round's merge on files: every client's next model, from this round's checkpoints (and, for
clients that sat the round out, their current ones), by any method's merge spec
(:func:`fedmoe.round.plan_round`) and the one merge engine. Outputs stream tensor by tensor; a
group's result is computed once and written into each member's file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmoe import __version__
from fedmoe.aggregate.base import Aggregator, CrossExpert, RoundInputs
from fedmoe.aggregate.engine import Merger
from fedmoe.errors import InputError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import Checkpoint, CheckpointMeta
from fedmoe.io.checkpoint_set import CheckpointSource
from fedmoe.io.manifest import STDIO, dumps, header, relative
from fedmoe.io.plan_file import LoadedPlan
from fedmoe.io.safetensors_format import StreamWriter, TensorSpec
from fedmoe.model.schema import Role
from fedmoe.params import params_dict as method_params
from fedmoe.round import RoundPlan, plan_round

SHARED_FORMAT = "fedmoe-shared/2"


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
    for k in models.values():
        if k.config != config:
            raise InputError(
                f"{k.path} has a different model_config than {first.path}",
                hint="every checkpoint of a federation must share one architecture",
            )
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
    paths = {c: out / f"client-{c:03d}.safetensors" for c in ids}
    manifest_path = out / "aggregate.json"
    plan_sha = plan.sha256 if plan is not None else ""
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

    def write_model(
        path: Path, tensors: list[TensorSpec], metadata: dict[str, str], c: int
    ) -> None:
        with outputs.open(path) as handle:
            writer = StreamWriter(handle, tensors, metadata)
            for spec_t in writer.order:
                writer.write(spec_t.name, merger.tensor(c, spec_t.name))
            writer.close()

    entries = []
    with OutputSet(force) as outputs:
        for p in [*paths.values(), manifest_path]:
            outputs.reserve(p)
        for c in ids:
            own = models[c]
            meta = CheckpointMeta(
                config,
                c,
                round_,
                own.meta.num_samples,
                own.meta.seed,
                method.name,
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
                    "trained": c in fresh,
                }
            )
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
            write_model(server_path, server_specs, smeta, ids[0])
            server = {
                "path": server_path.name,
                "sha256": outputs.staged_sha256(server_path),
                "tensors": shared_names,
            }
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
