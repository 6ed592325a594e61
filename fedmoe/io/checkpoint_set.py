"""Sets of client checkpoints, named the ways a user names them: files, a folder, or a manifest
(``train-round`` or ``aggregate``, from a file or ``-``) that lists ``checkpoints``.

A manifest's entries carry a sha256 that is checked, so a checkpoint swapped under a manifest is
refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmoe.errors import InputError
from fedmoe.io.checkpoint import Checkpoint, open_checkpoint
from fedmoe.io.manifest import STDIO, malformed, read_manifest, relative, require, resolve

SET_KINDS = ("train-round", "aggregate", "init")
SERVER_FILE = "server.safetensors"


def checkpoint_entries(checkpoints: list[Checkpoint], base: Path) -> list[dict[str, Any]]:
    """Manifest entries ``{client, path, sha256, num_samples}`` with paths relative to ``base``."""
    return [
        {
            "client": "global" if c.meta.client_id is None else c.meta.client_id,
            "path": relative(c.path, base),
            "sha256": c.sha256,
            "num_samples": c.meta.num_samples,
        }
        for c in checkpoints
    ]


def _from_manifest(source: str) -> list[Checkpoint]:
    manifest, base, _ = read_manifest(source, SET_KINDS)
    where = "<stdin>" if source == STDIO else source
    out = []
    with malformed(where, f"{manifest['kind']} manifest", "re-create it with fedmoe"):
        entries = [
            (resolve(str(require(e, "path", where)), base), str(require(e, "sha256", where)))
            for e in list(require(manifest, "checkpoints", where))
            if isinstance(require(e, "path", where), str)
        ]
        if len(entries) != len(manifest["checkpoints"]):
            raise InputError(f"{where}: every 'checkpoints' entry needs a string 'path'")
    for path, digest in entries:
        ckpt = open_checkpoint(path)
        if ckpt.sha256 != digest:
            raise InputError(
                f"{path}: sha256 differs from the one {where} records",
                hint="the checkpoint changed after the manifest was written; re-create both",
            )
        out.append(ckpt)
    return out


def load_checkpoint_set(inputs: list[str]) -> dict[int | None, Checkpoint]:
    """Open every checkpoint the inputs name, keyed by client id (None for a global model).

    Raises
    ------
    InputError
        For a missing path, an unreadable checkpoint, two checkpoints of the same client, or
        checkpoints of different model configs.
    """
    found: list[Checkpoint] = []
    for item in inputs:
        path = Path(item)
        if item == STDIO or path.suffix == ".json":
            found.extend(_from_manifest(item))
        elif path.is_dir():
            # server.safetensors is aggregate's copy of the shared parts, not a client model
            files = sorted(f for f in path.glob("*.safetensors") if f.name != SERVER_FILE)
            if not files:
                raise InputError(f"{path}: folder holds no .safetensors checkpoint")
            found.extend(open_checkpoint(f) for f in files)
        else:
            found.append(open_checkpoint(path))
    if not found:
        raise InputError(
            "no checkpoint given", hint="name checkpoint files, a folder or a manifest"
        )
    by_client: dict[int | None, Checkpoint] = {}
    for ckpt in found:
        cid = ckpt.meta.client_id
        if cid in by_client:
            who = "global model" if cid is None else f"client {cid}"
            raise InputError(
                f"two checkpoints for {who}: {by_client[cid].path} and {ckpt.path}",
                hint="pass one checkpoint per client",
            )
        by_client[cid] = ckpt
    configs = {c.config for c in by_client.values()}
    if len(configs) > 1:
        first = next(iter(by_client.values()))
        other = next(c for c in by_client.values() if c.config != first.config)
        raise InputError(
            f"{other.path} has a different model_config than {first.path}",
            hint="every checkpoint of a federation must share one architecture",
        )
    return by_client


class CheckpointSource:
    """A merge-engine source over opened checkpoints (reads one tensor, or some experts of one
    stacked tensor, at a time)."""

    def __init__(self, checkpoints: dict[int, Checkpoint]) -> None:
        self.checkpoints = checkpoints

    def tensor(self, client: int, name: str) -> Any:
        return self.checkpoints[client].tensor(name)

    def experts(self, client: int, name: str, indices: list[int]) -> Any:
        return self.checkpoints[client].experts(name, indices)


def client_checkpoints(inputs: list[str], what: str) -> dict[int, Checkpoint]:
    """The client checkpoints the inputs name (a global model is refused), by client id."""
    found = load_checkpoint_set(inputs)
    if None in found:
        raise InputError(
            f"{found[None].path} is a global model; {what} takes client checkpoints",
            hint="pass the checkpoints written by train-round or aggregate",
        )
    return {c: k for c, k in sorted((c, k) for c, k in found.items() if c is not None)}


def newest_per_client(sets: list[dict[int, Checkpoint]]) -> dict[int, Checkpoint]:
    """Across several checkpoint sets, each client's checkpoint of the latest round (on a tie, the
    earlier set wins)."""
    out: dict[int, Checkpoint] = {}
    for found in sets:
        for c, ckpt in found.items():
            if c not in out or ckpt.meta.round > out[c].meta.round:
                out[c] = ckpt
    return dict(sorted(out.items()))
