"""The affinity artefact of a round (FedMoE-DA, arXiv 2411.02115, Eq. 8): from the uploads the
server holds — this round's checkpoints and, for clients that sat out, their latest earlier ones
(stale, kept and marked) — to the per-layer neighbours and share tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmoe.affinity import Affinity, Upload, compute_affinity
from fedmoe.affinity.summary import summary
from fedmoe.errors import InputError
from fedmoe.io.affinity_file import affinity_to_manifest
from fedmoe.io.checkpoint import Checkpoint
from fedmoe.io.manifest import relative
from fedmoe.model.hf import ModelConfig
from fedmoe.model.schema import PartSizes


def affinity_artefact(
    fresh: dict[int, Checkpoint],
    stale: dict[int, Checkpoint],
    candidates: int,
    base: Path,
    domain_names: list[str] | None = None,
    class_names: list[str] | None = None,
    pooled: bool = False,
    inline: bool = True,
    centred: bool = False,
) -> tuple[Affinity, dict[str, Any]]:
    """Compute the affinity of ``fresh`` plus the ``stale`` clients not in it (``pooled``: one
    neighbour list for every MoE layer, see :func:`fedmoe.affinity.compute.compute_affinity`;
    ``inline=False``: the neighbours and share tables are left to a binary companion).

    Parameters
    ----------
    fresh
        This round's client checkpoints.
    stale
        Latest earlier checkpoints of other clients (ignored for clients in ``fresh``).
    candidates
        Neighbours kept per client-expert.
    base
        The folder the artefact's input paths are written relative to.
    """
    if not fresh:
        raise InputError("no checkpoint of this round to compute affinity over")
    current = max(k.meta.round for k in fresh.values())
    first = next(iter(fresh.values()))
    older = {c: k for c, k in stale.items() if c not in fresh}
    for c, k in older.items():
        if k.config != first.config:
            raise InputError(
                f"{k.path} has a different model_config than {first.path}",
                hint="every checkpoint of a federation must share one architecture",
            )
        if k.meta.round >= current:
            raise InputError(
                f"{k.path}: the earlier upload of client {c} is from round {k.meta.round}, "
                f"not before this round ({current})",
                hint="give this round's checkpoints as arguments and older ones with --stale",
            )
    held = dict(sorted({**older, **fresh}.items()))
    return affinity_of_uploads(
        {c: k.upload() for c, k in held.items()},
        {c: (relative(k.path, base), k.sha256) for c, k in held.items()},
        first.config,
        first.schema.sizes(),
        candidates,
        domain_names,
        class_names,
        pooled,
        inline,
        centred,
    )


def affinity_of_uploads(
    held: dict[int, Upload],
    sources: dict[int, tuple[str, str]],
    config: ModelConfig,
    sizes: PartSizes,
    candidates: int,
    domain_names: list[str] | None = None,
    class_names: list[str] | None = None,
    pooled: bool = False,
    inline: bool = True,
    centred: bool = False,
) -> tuple[Affinity, dict[str, Any]]:
    """The affinity artefact of the uploads the server holds (client id → upload, increasing),
    where ``sources`` names each upload (path or label, sha256) in the artefact's inputs: for an
    engine whose server receives uploads as messages, not files."""
    aff = compute_affinity(held, candidates, config.num_classes, pooled, centred)
    inputs = [
        {
            "client": c,
            "path": sources[c][0],
            "sha256": sources[c][1],
            "num_samples": up.num_samples,
            "round": up.round,
            "stale": c in aff.stale,
        }
        for c, up in held.items()
    ]
    manifest = affinity_to_manifest(aff, config, sizes, inputs, domain_names, class_names, inline)
    manifest["summary"] = summary(aff)
    return aff, manifest
