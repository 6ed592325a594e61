"""``fedmoe run``: a whole federation from a recipe, every method on the same split and the same
initial model, through the same library functions the subcommands use.

Per method and round: every participating client trains (``train_client``); the method builds its
merge (FedMoE-DA: ``compute_affinity`` → ``aggregation_matrix``, refreshed every I rounds); the one
merge engine applies it; the round's traffic is counted and the models evaluated. After each round
the clients' checkpoints are written to ``state/<method>/`` and a line is appended to
``metrics.jsonl``, so ``--resume`` continues from the last complete round with the same result as
an uninterrupted run (every random draw derives from (seed, round, client), never from history).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmoe.affinity import Affinity, compute_affinity
from fedmoe.aggregate import AGGREGATORS, ClientInfo, FedMoEDA
from fedmoe.aggregate.engine import merge_states
from fedmoe.data import Dataset, DataSpec, load_dataset
from fedmoe.errors import InputError
from fedmoe.io.atomic import OutputSet, write_atomic
from fedmoe.io.checkpoint import CheckpointMeta, open_checkpoint, save_checkpoint
from fedmoe.io.manifest import dumps
from fedmoe.io.partition_file import partition_to_manifest
from fedmoe.io.plan_file import PlanSettings, build_plan
from fedmoe.model import MoEConfig, init_model, state_of
from fedmoe.partition import Partition, get_partitioner, make_partition
from fedmoe.plan import (
    AggregationMatrix,
    Ledger,
    TensorSizes,
    aggregation_matrix,
    tensor_sizes,
)
from fedmoe.run.recipe import Recipe
from fedmoe.train import evaluate_models
from fedmoe.train.pool import Job, TrainPool

Progress = Callable[[str, int, int, dict[str, Any]], None]


@dataclass(frozen=True)
class RunContext:
    """Everything shared by the methods of one run."""

    recipe: Recipe
    spec: DataSpec  # where the dataset comes from (worker processes load it themselves)
    dataset: Dataset
    partition: Partition
    config: MoEConfig
    sizes: TensorSizes
    initial: dict[str, torch.Tensor]
    out: Path


def participants(recipe: Recipe, round_: int, num_clients: int) -> list[int]:
    """Clients sampled in ``round_`` (all when participation is 1), from (seed, round) only."""
    if recipe.participation >= 1.0:
        return list(range(num_clients))
    k = max(1, round(recipe.participation * num_clients))
    rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, round_, 7]))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def baseline_ledger(method: str, sizes: TensorSizes, n: int) -> Ledger:
    """Traffic of the server-mediated baselines: the whole model up and down (none for local)."""
    moved = 0 if method == "local" else 2 * n * sizes.model
    return Ledger(n, moved // 2, moved // 2, 0, 0, 2 * n * sizes.model, 0)


def prepare(recipe: Recipe, out: Path) -> RunContext:
    """Load the data, split it, build the initial model."""
    spec = DataSpec(recipe.data.dataset, recipe.data.label_column, recipe.data.domain_column)
    dataset = load_dataset(spec)
    p = recipe.partition
    partition = make_partition(
        dataset.y,
        dataset.domain,
        p.clients,
        get_partitioner(p.scheme, dict(p.options)),
        recipe.seed,
        p.global_test,
        p.local_test,
        has_domains=dataset.has_domains,
    )
    m = recipe.model
    config = MoEConfig(
        dataset.input_shape,
        dataset.num_classes,
        m.embed,
        m.embed_hidden,
        m.embed_dim,
        m.num_experts,
        m.top_k,
        m.expert_hidden,
        m.gate_bias,
    )
    initial = state_of(init_model(config, recipe.seed))
    return RunContext(recipe, spec, dataset, partition, config, tensor_sizes(config), initial, out)


def write_setup(ctx: RunContext, resolved: dict[str, Any]) -> None:
    """The run folder's recipe, partition manifest and initial checkpoint."""
    import yaml

    with OutputSet(force=True) as outputs:
        outputs.write_bytes(
            ctx.out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False).encode()
        )
        manifest = partition_to_manifest(ctx.partition, ctx.dataset, ctx.spec, ctx.out)
        outputs.write_bytes(ctx.out / "partition.json", dumps(manifest).encode())
        meta = CheckpointMeta(ctx.config, None, 0, 0, ctx.recipe.seed, "init")
        save_checkpoint(outputs, ctx.out / "init.safetensors", ctx.initial, meta)


def _group_of(partition: Partition) -> dict[int, int]:
    """Each client's dominant true domain (the oracle's groups)."""
    return {c: int(np.argmax(partition.domain_counts[c])) for c in range(len(partition.clients))}


def _save_state(
    ctx: RunContext,
    method: str,
    round_: int,
    states: dict[int, dict[str, torch.Tensor]],
    samples: dict[int, int],
    folder: Path,
) -> None:
    with OutputSet(force=True) as outputs:
        for c, st in states.items():
            meta = CheckpointMeta(ctx.config, c, round_, samples.get(c, 0), ctx.recipe.seed, method)
            save_checkpoint(outputs, folder / f"client-{c:03d}.safetensors", st, meta)


def _load_state(folder: Path, clients: int) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for c in range(clients):
        out[c] = open_checkpoint(folder / f"client-{c:03d}.safetensors").state()
    return out


def append_line(path: Path, line: str) -> None:
    """Append one line; a fragment left by an interrupted write is cut off first."""
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def completed_rounds(metrics_path: Path) -> dict[str, int]:
    """Method → last round recorded in ``metrics.jsonl``."""
    done: dict[str, int] = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text("utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by an interruption: that round is redone
            done[row["method"]] = max(done.get(row["method"], 0), int(row["round"]))
    return done


def run_method(
    ctx: RunContext,
    method: str,
    resume_from: int,
    progress: Progress | None = None,
    pool: TrainPool | None = None,
) -> None:
    """All rounds of one method, appending to ``metrics.jsonl`` after each.

    ``pool`` trains the clients (in worker processes); by default they train in this process.
    """
    if pool is None:
        with TrainPool(ctx.spec, ctx.dataset, 1) as local_pool:
            run_method(ctx, method, resume_from, progress, local_pool)
        return
    recipe, config = ctx.recipe, ctx.config
    n = len(ctx.partition.clients)
    state_dir = ctx.out / "state" / method
    if resume_from > 0:
        states = _load_state(state_dir / f"round-{resume_from:03d}", n)
    else:
        states = {c: ctx.initial for c in range(n)}
    samples = {c: int(ctx.partition.clients[c].train.size) for c in range(n)}
    routing: dict[int, dict[str, Any] | None] = {c: None for c in range(n)}
    groups = _group_of(ctx.partition)
    matrix: AggregationMatrix | None = None
    matrix_round = 0
    fm = recipe.fedmoe
    if method == "fedmoe-da" and resume_from > 0 and fm.refresh_interval > 1:
        matrix, matrix_round = _reload_matrix(ctx, resume_from)
    for rnd in range(resume_from + 1, recipe.rounds + 1):
        start = time.perf_counter()
        active = participants(recipe, rnd, n)
        jobs = [
            Job(config, states[c], ctx.partition.clients[c], recipe.train, recipe.seed, rnd, c)
            for c in active
        ]
        trained: dict[int, dict[str, torch.Tensor]] = {}
        for up in pool.run(jobs):
            trained[up.client] = up.result.state
            routing[up.client] = up.routing
        train_s = time.perf_counter() - start
        infos = [ClientInfo(c, samples[c], routing[c], groups[c]) for c in active]
        gate_shared = fm.gate == "shared"
        extra: dict[str, Any] = {}
        if method == "fedmoe-da":
            refresh = (
                matrix is None
                or rnd - matrix_round >= fm.refresh_interval
                or (tuple(matrix.index.clients) != tuple(active))
            )
            if refresh:
                aff = compute_affinity(
                    {c: trained[c]["gate.weight"] for c in active},
                    {c: routing[c] for c in active},
                    fm.candidates,
                    config.num_classes,
                )
                matrix = aggregation_matrix(aff.neighbours, aff.index, fm.top_p, fm.tau)
                matrix_round = rnd
                _save_affinity_summary(ctx, aff, rnd)
            assert matrix is not None
            spec = FedMoEDA(matrix).spec(infos, config.num_experts, gate_shared)
            settings = PlanSettings(
                rnd, matrix_round, fm.top_p, fm.tau, fm.refresh_interval, fm.gate
            )
            plan, ledger = build_plan(matrix, settings, config, ctx.sizes)
            write_atomic(
                ctx.out / "plans" / f"round-{rnd:03d}.json", dumps(plan).encode(), force=True
            )
            extra["sources_other_client"] = _remote_share(matrix)
            extra["remote_same_domain"] = _same_domain_share(matrix, groups)
        else:
            spec = AGGREGATORS[method]().spec(infos, config.num_experts, gate_shared)
            ledger = baseline_ledger(method, ctx.sizes, len(active))
        merged = merge_states(spec, trained)
        states = {**states, **merged}
        row: dict[str, Any] = {
            "method": method,
            "round": rnd,
            "participants": len(active),
            "server_bytes": ledger.server_total,
            "p2p_bytes": ledger.p2p,
            "fedavg_bytes": ledger.fedavg_equivalent,
            **extra,
        }
        if rnd % recipe.eval_every == 0 or rnd == recipe.rounds:
            ev = evaluate_models(
                config, states, ctx.dataset, ctx.partition.clients, ctx.partition.global_test
            )
            row.update(
                {
                    k: ev[k]
                    for k in (
                        "mean_local_acc",
                        "worst_local_acc",
                        "mean_global_acc",
                        "local_acc_by_domain",
                        "global_acc_by_domain",
                    )
                }
            )
        row["seconds"] = round(time.perf_counter() - start, 4)
        row["train_seconds"] = round(train_s, 4)
        folder = state_dir / f"round-{rnd:03d}"
        _save_state(ctx, method, rnd, states, samples, folder)
        append_line(ctx.out / "metrics.jsonl", json.dumps(row, separators=(",", ":")))
        old = state_dir / f"round-{rnd - 1:03d}"
        if old.is_dir():
            shutil.rmtree(old)
        if progress is not None:
            progress(method, rnd, recipe.rounds, row)


def _remote_share(matrix: AggregationMatrix) -> float:
    e = matrix.index.num_experts
    remote = (matrix.targets // e) != (matrix.sources // e)
    return round(float(remote.mean()), 6) if remote.size else 0.0


def _same_domain_share(matrix: AggregationMatrix, groups: dict[int, int]) -> float | None:
    """Weight share of remote sources whose client has the target client's dominant true domain
    (a diagnostic of domain awareness; the method itself never sees domains)."""
    e = matrix.index.num_experts
    clients = np.asarray(matrix.index.clients)
    tgt = clients[matrix.targets // e]
    src = clients[matrix.sources // e]
    remote = tgt != src
    if not remote.any():
        return None
    same = np.array(
        [groups[int(a)] == groups[int(b)] for a, b in zip(tgt[remote], src[remote], strict=True)]
    )
    w = matrix.weights[remote]
    return round(float((w * same).sum() / w.sum()), 6)


def _save_affinity_summary(ctx: RunContext, aff: Affinity, rnd: int) -> None:
    """The latest expert–domain table, for the report's heatmap."""
    data = {
        "round": rnd,
        "clients": list(aff.index.clients),
        "num_experts": aff.index.num_experts,
        "domain_names": list(ctx.dataset.domain_names),
        "by_domain": [[round(float(v), 4) for v in row] for row in aff.by_domain],
    }
    write_atomic(ctx.out / "affinity.json", dumps(data).encode(), force=True)


def _reload_matrix(ctx: RunContext, last_round: int) -> tuple[AggregationMatrix | None, int]:
    """The matrix in force after ``last_round`` (from that round's saved plan)."""
    from fedmoe.io.plan_file import load_plan

    path = ctx.out / "plans" / f"round-{last_round:03d}.json"
    if not path.is_file():
        return None, 0
    loaded = load_plan(path)
    return loaded.matrix, int(loaded.field("matrix_round"))


def check_resume(out: Path, recipe_data: dict[str, Any]) -> None:
    """Refuse to resume a run folder made from a different recipe."""
    import yaml

    path = out / "recipe.yaml"
    if not path.is_file():
        raise InputError(f"{out}: no recipe.yaml; nothing to resume", hint="run without --resume")
    saved = yaml.safe_load(path.read_text("utf-8"))
    if saved != recipe_data:
        raise InputError(
            f"{out}: was started from a different recipe; resuming would mix two runs",
            hint="resume with the same recipe and -c overrides, or use a new --out",
        )
