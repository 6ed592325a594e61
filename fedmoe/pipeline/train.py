"""One local round of some clients (FedMoE-DA, arXiv 2411.02115, Sec. III, step 1), from their
starting checkpoints to their trained checkpoints and the ``train-round`` manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmoe.errors import InputError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import Checkpoint, CheckpointMeta, save_checkpoint
from fedmoe.io.checkpoint_set import check_same_architecture
from fedmoe.io.manifest import dumps, header, relative
from fedmoe.io.partition_file import LoadedPartition
from fedmoe.pipeline.pool import Job, TrainPool
from fedmoe.train import TrainConfig

BATCH = 64  # clients in flight at once: bounded memory however many clients train


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


def train_clients(
    part: LoadedPartition,
    partition_ref: str,
    starts: dict[int, Checkpoint],
    cfg: TrainConfig,
    seed: int,
    round_: int,
    paths: dict[int, Path],
    manifest_path: Path,
    pool: TrainPool,
    force: bool = False,
    advance: Callable[[], None] | None = None,
    candidates: list[Checkpoint] | None = None,
) -> dict[str, Any]:
    """Train every client of ``paths`` one round and publish their checkpoints and the manifest
    together (nothing is written if any client fails).

    Parameters
    ----------
    part, partition_ref
        The partition and how its manifest was named (``-`` for stdin).
    starts
        Client → the checkpoint it starts from.
    cfg, seed, round_
        Training hyper-parameters, the run seed and the round number.
    paths, manifest_path
        Where each client's checkpoint and the manifest go.
    pool
        The training processes.
    advance
        Called once per trained client (progress).
    candidates
        Clustered FL (IFCA): every client starts from the candidate with the lowest loss on its
        train split instead of its entry of ``starts``; the checkpoint records the choice
        (``cluster``) and the candidate as its parent.

    Returns
    -------
    dict
        The ``train-round`` manifest.
    """
    ids = sorted(paths)
    if candidates:
        check_same_architecture(candidates)
        starts = {c: candidates[0] for c in ids}  # replaced by each client's choice
    config = next(iter(starts.values())).moe_config
    options = tuple(k.state() for k in candidates or ())
    rows: dict[int, dict[str, Any]] = {}
    with OutputSet(force) as outputs:
        for p in [*paths.values(), manifest_path]:
            outputs.reserve(p)
        for first in range(0, len(ids), BATCH):
            batch = ids[first : first + BATCH]
            # with candidates a job's start is its choice among them; the state passed is unused
            begin = {c: options[0] if options else starts[c].state() for c in batch}
            jobs = [
                Job(config, begin[c], part.client(c), cfg, seed, round_, c, options) for c in batch
            ]
            for update in pool.run(jobs):
                cid = update.client
                if candidates and update.choice is not None:
                    starts[cid] = candidates[update.choice]
                meta = CheckpointMeta(
                    config,
                    cid,
                    round_,
                    update.num_samples,
                    seed,
                    "train",
                    parent_sha256=starts[cid].sha256,
                    routing=update.routing,
                    cluster=update.choice,
                )
                save_checkpoint(outputs, paths[cid], update.result.state, meta)
                r = update.result
                rows[cid] = {
                    "client": cid,
                    "num_samples": update.num_samples,
                    "epoch_loss": [round(v, 6) for v in r.epoch_loss],
                    "epoch_balance": [round(v, 6) for v in r.epoch_balance],
                    "steps": r.steps,
                    "seconds": round(r.seconds, 4),
                    "samples_per_s": round(r.samples / r.seconds, 1) if r.seconds > 0 else None,
                }
                if update.choice is not None:
                    rows[cid]["cluster"] = update.choice
                    rows[cid]["candidate_losses"] = [round(v, 6) for v in update.candidate_losses]
                if advance is not None:
                    advance()
        manifest = train_manifest(
            round_, seed, {**cfg.to_dict()}, part, partition_ref,
            {i: k for i, k in enumerate(candidates)} if candidates else starts,
            {c: outputs.staged_sha256(paths[c]) for c in ids}, paths, rows, manifest_path.parent,
            threads_per_client=1,
        )  # fmt: skip
        outputs.write_bytes(manifest_path, dumps(manifest).encode())
    return manifest


def train_manifest(
    round_: int,
    seed: int,
    train_config: dict[str, Any],
    part: LoadedPartition,
    partition_ref: str,
    starts: dict[int, Checkpoint],
    digests: dict[int, str],
    paths: dict[int, Path],
    rows: dict[int, dict[str, Any]],
    base: Path,
    threads_per_client: int | None = None,
) -> dict[str, Any]:
    """The ``train-round`` manifest: the round, its training settings, the partition and start
    models it used, and each client's output (path relative to ``base``, sha256, sample count)
    and training row."""
    ids = sorted(paths)
    threads = {} if threads_per_client is None else {"threads_per_client": threads_per_client}
    return {
        **header("train-round"),
        "round": round_,
        "seed": seed,
        "train_config": train_config,
        **threads,
        "partition": {
            "path": relative(Path(partition_ref), base) if partition_ref != "-" else "-",
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
                "sha256": digests[cid],
                "num_samples": rows[cid]["num_samples"],
            }
            for cid in ids
        ],
        "clients": [rows[c] for c in ids],
    }
