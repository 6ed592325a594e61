"""Sets of client checkpoints, named the ways a user names them: files, a folder, or a manifest
(``train-round`` or ``aggregate``, from a file or ``-``) that lists ``checkpoints``.

A manifest's entries carry a sha256 that is checked, so a checkpoint swapped under a manifest is
refused.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from fedmoe.errors import InputError
from fedmoe.io.checkpoint import Checkpoint, open_checkpoint, pick
from fedmoe.io.hf_options import FolderOptions, is_hf_folder
from fedmoe.io.manifest import STDIO, malformed, read_manifest, relative, require, resolve
from fedmoe.model.hf import HFConfig

SET_KINDS = ("train-round", "aggregate", "init", "clusters")
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


def open_model(path: Path, options: FolderOptions | None = None) -> Checkpoint:
    """A checkpoint file, or a Hugging Face model folder."""
    if is_hf_folder(path):
        from fedmoe.io.hf_folder import HFModel

        return HFModel(path, options)
    return open_checkpoint(path)


def _from_manifest(source: str, options: FolderOptions | None) -> list[Checkpoint]:
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
        ckpt = open_model(path, options)
        if ckpt.sha256 != digest:
            raise InputError(
                f"{path}: sha256 differs from the one {where} records",
                hint="the checkpoint changed after the manifest was written; re-create both",
            )
        out.append(ckpt)
    return out


def load_checkpoint_set(
    inputs: list[str], options: FolderOptions | None = None
) -> dict[int | None, Checkpoint]:
    """Open every checkpoint the inputs name, keyed by client id (None for a global model): files,
    folders of files, manifests, Hugging Face model folders, and folders of those (one per client).

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
            found.extend(_from_manifest(item, options))
        elif is_hf_folder(path):
            from fedmoe.io.hf_folder import HFModel

            found.append(HFModel(path, options))
        elif path.is_dir():
            # server.safetensors is aggregate's copy of the shared parts, not a client model
            files = sorted(f for f in path.glob("*.safetensors") if f.name != SERVER_FILE)
            folders = sorted(f for f in path.iterdir() if is_hf_folder(f)) if not files else []
            if not files and not folders:
                raise InputError(
                    f"{path}: folder holds no .safetensors checkpoint and no model folder"
                )
            found.extend(open_checkpoint(f) for f in files)
            if folders:
                from fedmoe.io.hf_folder import HFModel

                found.extend(HFModel(f, options) for f in folders)
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
    check_same_architecture(list(by_client.values()))
    return by_client


def load_candidates(inputs: list[str], minimum: int = 2) -> list[Checkpoint]:
    """The models a clustered-FL client chooses its start among (IFCA's k cluster models), in
    cluster order: files in the order given, a folder's files by name, or a ``clusters`` manifest
    (what ``fedmoe run`` writes to each round's ``clusters/``) in its order. A client chooses
    among at least ``minimum`` (a run's IFCA with k = 1 keeps one).

    Raises
    ------
    InputError
        For fewer than two candidates, a missing or unreadable file, or mixed architectures.
    """
    found: list[Checkpoint] = []
    for item in inputs:
        path = Path(item)
        if item == STDIO or path.suffix == ".json":
            found.extend(_from_manifest(item, None))
        elif path.is_dir():
            files = sorted(f for f in path.glob("*.safetensors") if f.name != SERVER_FILE)
            if not files:
                raise InputError(f"{path}: folder holds no .safetensors checkpoint")
            found.extend(open_checkpoint(f) for f in files)
        else:
            found.append(open_checkpoint(path))
    if len(found) < minimum:
        raise InputError(
            f"{len(found)} candidate model given; choosing needs at least {minimum}",
            hint="pass the k cluster models (files, a folder or their clusters.json)",
        )
    check_same_architecture(found)
    return found


def check_same_architecture(models: list[Checkpoint]) -> None:
    """Refuse models of different architectures, naming the first difference."""
    if not models:
        return
    first = models[0]
    for other in models[1:]:
        if other.config == first.config:
            continue
        what = "a different model_config"
        a, b = first.config, other.config
        if isinstance(a, HFConfig) and isinstance(b, HFConfig):
            what = f"a different config.json ({b.differs(a)})"
        elif type(a) is not type(b):
            what = "a different kind of model"
        raise InputError(
            f"{other.path} has {what} than {first.path}",
            hint="every model of a federation must share one architecture",
        )


READ_CACHE_BYTES = 128 << 20  # whole stacked expert tensors kept for the other targets they feed


class CheckpointSource:
    """A merge-engine source over opened checkpoints (reads one tensor, or some experts of one
    stacked tensor, at a time).

    Under Eq. 11 a client's stacked expert tensor feeds several targets, each merged in turn; the
    whole tensors read for :meth:`experts` are kept (least recently used first out, at most
    ``cache_bytes``), so each is read and checked once rather than once per target. Callers only
    read what they get."""

    def __init__(
        self, checkpoints: dict[int, Checkpoint], cache_bytes: int = READ_CACHE_BYTES
    ) -> None:
        self.checkpoints = checkpoints
        self._whole: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self._bytes = 0
        self._limit = cache_bytes

    def tensor(self, client: int, name: str) -> Any:
        return self.checkpoints[client].tensor(name)

    def experts(self, client: int, name: str, indices: list[int]) -> Any:
        key = (client, name)
        whole = self._whole.get(key)
        if whole is None:
            ckpt = self.checkpoints[client]
            if not ckpt.reads_whole(name, indices):  # a few experts: read only their bytes
                return ckpt.experts(name, indices)
            whole = ckpt.tensor(name)
            self._keep(key, whole)
        else:
            self._whole.move_to_end(key)
        return pick(whole, indices)

    def _keep(self, key: tuple[int, str], t: Any) -> None:
        size = t.numel() * t.element_size()
        if size > self._limit:
            return
        self._whole[key] = t
        self._bytes += size
        while self._bytes > self._limit:
            _, old = self._whole.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()


def client_checkpoints(
    inputs: list[str], what: str, options: FolderOptions | None = None
) -> dict[int, Checkpoint]:
    """The client checkpoints the inputs name (a global model is refused), by client id."""
    found = load_checkpoint_set(inputs, options)
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
