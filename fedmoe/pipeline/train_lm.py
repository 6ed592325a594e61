"""One local round of Hugging Face MoE language models, and their evaluation (FedMoE-DA, arXiv 2411.02115, Sec. III,
step 1): each client fine-tunes its model folder on its byte windows and writes a model folder
with its routing statistics by domain; the ``train-round`` manifest lists the folders.

Clients train one after another in this process (a language model's step already uses every
torch thread), each from its own seed (:func:`fedmoe.train.client.client_seed`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmoe.data.text import tokens_of
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import Checkpoint, CheckpointMeta
from fedmoe.io.hf_folder import HFModel, load_lm, stage_lm
from fedmoe.io.manifest import dumps
from fedmoe.io.partition_file import LoadedPartition
from fedmoe.model.hf import TrainParts
from fedmoe.model.schema import Role
from fedmoe.pipeline.train import train_manifest
from fedmoe.train import TrainConfig
from fedmoe.train.client import client_seed
from fedmoe.train.lm import lm_routing, train_lm


def expert_params(model: HFModel, lm: Any) -> Callable[[str], bool]:
    """Parameter name → True for a routed expert or router tensor of ``lm``: its parameters are
    resolved by the folder's own layout (whose rules cover the stacked layout ``transformers``
    holds in memory too), so the roles come from the declared schema, not from name matching."""
    shapes = {name: tuple(p.shape) for name, p in lm.named_parameters()}
    schema = model.arch.layout.resolve(shapes)
    trained = {e.name for e in schema.entries if e.role is not Role.SHARED}
    return trained.__contains__


def train_lm_clients(
    part: LoadedPartition,
    partition_ref: str,
    starts: dict[int, Checkpoint],
    cfg: TrainConfig,
    seed: int,
    round_: int,
    paths: dict[int, Path],
    manifest_path: Path,
    parts: TrainParts = TrainParts.ALL,
    force: bool = False,
    advance: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train every client of ``paths`` one round and publish their model folders and the manifest
    together (nothing is written if any client fails)."""
    tokens = tokens_of(part.dataset.x)
    domains = part.dataset.domain
    ids = sorted(paths)
    rows: dict[int, dict[str, Any]] = {}
    digests: dict[int, str] = {}
    with OutputSet(force) as outputs:
        outputs.reserve(manifest_path)
        for cid in ids:
            start = starts[cid]
            assert isinstance(start, HFModel)
            lm = load_lm(start)
            train = part.client(cid).train
            is_expert = expert_params(start, lm) if parts is TrainParts.EXPERTS else None
            result = train_lm(
                lm, tokens[train], cfg, client_seed(seed, round_, cid), parts, is_expert
            )
            top_k = int(getattr(lm.config, "num_experts_per_tok", 2))
            routing = lm_routing(lm, tokens[train], domains[train], part.dataset.num_domains, top_k)
            meta = CheckpointMeta(
                start.config, cid, round_, int(train.shape[0]), seed, "train",
                parent_sha256=start.sha256, routing=routing,
            )  # fmt: skip
            digests[cid] = stage_lm(outputs, paths[cid], lm, meta, like=start)
            rows[cid] = {
                "client": cid,
                "num_samples": int(train.shape[0]),
                "epoch_loss": [round(v, 6) for v in result.epoch_loss],
                "steps": result.steps,
                "seconds": round(result.seconds, 4),
                "samples_per_s": round(result.samples / result.seconds, 1)
                if result.seconds > 0
                else None,
            }
            if advance is not None:
                advance()
        manifest = train_manifest(
            round_, seed, {**cfg.to_dict(), "parts": parts.value}, part, partition_ref, starts,
            digests, paths, rows, manifest_path.parent,
        )  # fmt: skip
        outputs.write_bytes(manifest_path, dumps(manifest).encode())
    return manifest


def evaluate_lm_clients(models: dict[int, Checkpoint], part: LoadedPartition) -> dict[str, Any]:
    """Per-byte perplexity of each client's model folder on its local test split and on the
    global test set, overall and per domain (:func:`fedmoe.train.lm.evaluate_lms`; one model
    loaded at a time)."""
    from functools import partial

    from fedmoe.train.lm import evaluate_lms

    loaders = {c: partial(load_lm, k) for c, k in models.items() if isinstance(k, HFModel)}
    data = part.dataset
    return evaluate_lms(
        loaders, tokens_of(data.x), data.domain, data.num_domains, part.clients, part.global_test
    )
