"""Hugging Face model folders: ``config.json`` with ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, read lazily and written back in the same layout and sharding.

A folder is one client's model. :class:`HFModel` gives the same reading interface as a fedmoe
checkpoint (:class:`~fedmoe.io.checkpoint.Checkpoint`), so affinity, planning and the one merge
engine serve both; the roles of its tensors come from the family's declared layout
(:mod:`fedmoe.model.hf`), never from matching names in code.

Provenance lives in every shard's safetensors metadata beside ``format: pt`` (which
``transformers`` requires): ``fedmoe_format``, ``client_id``, ``round``, ``num_samples``, ``seed``,
``method``, ``parent_sha256`` and, once fedmoe merged it, ``merge``. A folder a user's own script
wrote has none of it: its client id then comes from the folder's name (``client-3``, ``site_07``)
and its sample count from ``--num-samples``.

A folder's digest is the sha256 of its files' names and sha256s (:func:`folder_digest`), so a
changed shard, index or config changes it.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedmoe import __version__
from fedmoe.errors import InputError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import Checkpoint, CheckpointMeta, check_finite
from fedmoe.io.digest import sha256_bytes, sha256_file
from fedmoe.io.hf_options import CONFIG, FolderOptions, is_hf_folder
from fedmoe.io.safetensors_format import (
    FROM_CODE,
    OutputFile,
    StreamWriter,
    TensorSpec,
    read_header,
)
from fedmoe.model.hf import HF_ARCHS, HFConfig, TinyLM
from fedmoe.model.schema import ModelSchema

FORMAT = "fedmoe-hf/1"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
MAX_JSON_BYTES = 64 << 20  # config.json and the index are small; refuse absurd ones


def folder_digest(files: Mapping[str, str]) -> str:
    """The digest of a folder from its files' names and sha256s."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return sha256_bytes(lines.encode())


def _read_json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {what} is larger than {MAX_JSON_BYTES >> 20} MiB")
        with open(path, encoding="utf-8") as handle:
            return json.load(handle, parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise InputError(
            f"{path}: not a readable {what} ({str(exc).splitlines()[0]})",
            hint="re-save the model folder",
        ) from None


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _client_from_name(path: Path) -> int | None:
    m = re.search(r"(\d+)\Z", path.name)
    return int(m.group(1)) if m else None


class HFModel(Checkpoint):
    """An open Hugging Face MoE model folder: parsed config and provenance, the schema of its
    tensors, and lazy access to tensors and expert slices across its shards."""

    def __init__(self, path: Path, options: FolderOptions | None = None) -> None:
        self.path = Path(path)
        opts = options or FolderOptions()
        if not is_hf_folder(self.path):
            raise InputError(f"{path}: not a model folder (no {CONFIG})", hint="check the path")
        raw = _read_json(self.path / CONFIG, CONFIG)
        if not isinstance(raw, dict):
            raise InputError(f"{self.path / CONFIG}: not a JSON object")
        config = HFConfig.from_dict(raw)
        arch = opts.arch or HF_ARCHS.get(str(raw.get("model_type", "")))
        if arch is None:
            raise InputError(
                f"{self.path / CONFIG}: model_type '{raw.get('model_type', '')}' has no built-in "
                f"layout (built in: {', '.join(HF_ARCHS)})",
                hint="declare the architecture in a YAML file and pass it with --layout FILE",
            )
        self.arch = arch
        self._handles: dict[str, Any] = {}
        self._maps: dict[str, tuple[mmap.mmap, int, dict[str, Any]]] = {}
        self.shard_of: dict[str, str] = self._weight_map()
        held: dict[str, str] = {}
        for shard in sorted(set(self.shard_of.values())):
            handle = self._open(shard)
            for name in list(handle.keys()):
                if name in held:
                    raise InputError(
                        f"{self.path / shard}: tensor {name} is also in {held[name]}",
                        hint="re-save the model folder",
                    )
                held[name] = shard
                if self.shard_of.get(name) != shard:
                    raise InputError(
                        f"{self.path / shard}: holds tensor {name}, which {INDEX} does not map "
                        "to it (missing index entry)",
                        hint="re-save the model folder (its index and shards disagree)",
                    )
        for name, shard in sorted(self.shard_of.items()):
            if held.get(name) != shard:
                raise InputError(
                    f"{self.path / INDEX}: maps tensor {name} to {shard}, which does not hold it",
                    hint="re-save the model folder (its index and shards disagree)",
                )
        self.names: list[str] = sorted(self.shard_of)
        shapes, sizes = {}, {}
        for name in self.names:
            piece = self._handles[self.shard_of[name]].get_slice(name)
            code = piece.get_dtype()
            if code not in FLOAT_CODES:
                raise InputError(
                    f"{self.path / self.shard_of[name]}: tensor {name} is {code}; model "
                    f"tensors must be one of {', '.join(FLOAT_CODES)}"
                )
            shapes[name] = tuple(piece.get_shape())
            sizes[name] = FROM_CODE[code].itemsize
        try:
            self._schema = arch.layout.resolve(shapes, sizes)
        except InputError as exc:
            raise InputError(
                f"{self.path}: {exc.message}",
                hint=f"declare the layout in a YAML file and pass it with --layout FILE "
                f"(layout used: {arch.layout.name})",
            ) from None
        self._check_routers(raw, shapes)
        self.meta = self._meta(config, opts)
        self._sha256: str | None = None

    # -- opening -------------------------------------------------------------------------------

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            data = _read_json(index, "safetensors index")
            wmap = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise InputError(
                    f"{index}: no 'weight_map' object", hint="re-save the model folder"
                )
            for name, shard in wmap.items():
                if (
                    not isinstance(shard, str)
                    or "/" in shard
                    or "\\" in shard
                    or shard
                    in (
                        "",
                        ".",
                        "..",
                    )
                ):
                    raise InputError(
                        f"{index}: tensor {name} maps to {shard!r}, not a file of the folder"
                    )
                if not (self.path / shard).is_file():
                    raise InputError(
                        f"{index}: tensor {name} is in shard {shard}, which is missing",
                        hint="copy the whole model folder",
                    )
            return {str(k): str(v) for k, v in wmap.items()}
        if (self.path / SINGLE).is_file():
            handle = self._open(SINGLE)
            return dict.fromkeys(list(handle.keys()), SINGLE)
        raise InputError(
            f"{self.path}: no {SINGLE} and no {INDEX}", hint="save the model with safetensors"
        )

    def _open(self, shard: str) -> Any:
        if shard not in self._handles:
            where = self.path / shard
            try:
                self._handles[shard] = safe_open(str(where), framework="pt")
            except Exception as exc:  # safetensors raises its own error type on bad files
                raise InputError(
                    f"{where}: not a readable safetensors file ({str(exc).splitlines()[0]})",
                    hint="the shard may be truncated; copy it again",
                ) from None
        return self._handles[shard]

    def _check_routers(self, raw: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        e, h = self.arch.num_experts(raw), raw.get(self.arch.hidden_key)
        for layer in range(self._schema.num_layers):
            name = self._schema.proxy(layer)
            want = (e, h)
            if shapes[name] != want:
                raise InputError(
                    f"{self.path / self.shard_of[name]}: router {name} has shape "
                    f"{list(shapes[name])}, config.json needs [{e}, {h}] "
                    f"({'/'.join(self.arch.experts_keys)}, {self.arch.hidden_key})",
                    hint="the shard and config.json are of different models",
                )

    def _meta(self, config: HFConfig, opts: FolderOptions) -> CheckpointMeta:
        first = self._handles[self.shard_of[self.names[0]]]
        meta = dict(first.metadata() or {})
        where = str(self.path / self.shard_of[self.names[0]])
        if meta.get("fedmoe_format") == FORMAT:
            try:
                client = None if meta["client_id"] == "global" else int(meta["client_id"])
                round_, seed = int(meta.get("round", "0")), int(meta.get("seed", "0"))
                num = int(meta["num_samples"])
                routing = json.loads(meta["routing"]) if meta.get("routing") else None
            except (KeyError, ValueError, json.JSONDecodeError):
                raise InputError(
                    f"{where}: malformed fedmoe metadata (client_id, round, num_samples, routing)",
                    hint="re-create the folder with fedmoe",
                ) from None
            if routing is not None and not isinstance(routing, dict):
                raise InputError(f"{where}: routing metadata must be a JSON object")
            known = {"format", "fedmoe_format", "fedmoe_version", "client_id", "round", "seed"}
            known |= {"num_samples", "routing", "method", "parent_sha256"}
            extra = {k: v for k, v in meta.items() if k not in known}
            method, parent = meta.get("method", ""), meta.get("parent_sha256", "")
        else:
            named = _client_from_name(self.path)
            if named is None:
                raise InputError(
                    f"{self.path}: no fedmoe metadata and no client id at the end of the "
                    "folder's name",
                    hint="name client folders like client-3 (the number is the client id)",
                )
            # a user-trained folder is taken as round 1 (trained once from a common start)
            client, round_, seed, routing, extra, method, parent = named, 1, 0, None, {}, "", ""
            num = -1
        if client is not None and client in opts.samples:
            num = opts.samples[client]
        elif num < 0 and opts.default_samples is not None:
            num = opts.default_samples
        if num < 0:
            raise InputError(
                f"{self.path}: no sample count for client {client} in its metadata",
                hint=f"pass --num-samples {client}=N (or --num-samples '*=1' for equal weights)",
            )
        limit = 2**53
        for key, value in (("client_id", client), ("round", round_), ("num_samples", num)):
            if value is not None and not 0 <= value < limit:
                raise InputError(f"{where}: metadata {key} = {value} is out of range")
        return CheckpointMeta(config, client, round_, num, seed, method, parent, routing, extra)

    # -- the reading interface of a checkpoint --------------------------------------------------

    @property
    def schema(self) -> ModelSchema:
        """The roles of the model's tensors, from the family's layout."""
        return self._schema

    @property
    def files(self) -> list[str]:
        """Every regular file of the folder, by name (config, tokenizer, shards, index)."""
        return sorted(
            p.name for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")
        )

    @property
    def shards(self) -> list[str]:
        """The shard files, in name order."""
        return sorted(set(self.shard_of.values()))

    @property
    def sha256(self) -> str:
        """The folder's digest (:func:`folder_digest`), computed once."""
        if self._sha256 is None:
            self._sha256 = folder_digest({f: sha256_file(self.path / f) for f in self.files})
        return self._sha256

    def _slice(self, name: str) -> Any:
        return self._handles[self.shard_of[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return FROM_CODE[self._slice(name).get_dtype()]

    def _view(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a view of its shard's memory map: no copy, and no anonymous memory
        (the pages are the page cache's; the map is private, so a write never reaches the file)."""
        shard = self.shard_of[name]
        if shard not in self._maps:
            self._maps[shard] = _map_shard(self.path / shard)
        mm, start, header = self._maps[shard]
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype = FROM_CODE[entry["dtype"]]
        shape = tuple(entry["shape"])
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin).view(shape)

    def _array(self, name: str) -> Any:
        """A gate (an upload's proxy rows) as a torch tensor: shards hold bfloat16, which NumPy
        cannot represent."""
        return self.tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        t = self._view(name)
        check_finite(t, f"{self.path / self.shard_of[name]}: tensor {name}")
        return t

    def expert(self, name: str, index: int) -> torch.Tensor:
        t = self._view(name)[index]
        check_finite(t, f"{self.path / self.shard_of[name]}: tensor {name} expert {index}")
        return t


def _map_shard(path: Path) -> tuple[mmap.mmap, int, dict[str, Any]]:
    """A private read map of a shard, its data offset and its header (checked by ``safe_open``
    when the folder was opened)."""
    with open(path, "rb") as handle:
        mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    header, start = read_header(memoryview(mm)[: min(len(mm), 8 + (100 << 20))], str(path))
    return mm, start, header


def hf_metadata(meta: CheckpointMeta) -> dict[str, str]:
    """A shard's ``__metadata__``: ``format: pt`` and fedmoe's provenance."""
    out = dict(meta.extra)
    out |= {
        "format": "pt",
        "fedmoe_format": FORMAT,
        "fedmoe_version": __version__,
        "client_id": "global" if meta.client_id is None else str(meta.client_id),
        "round": str(meta.round),
        "num_samples": str(meta.num_samples),
        "seed": str(meta.seed),
        "method": meta.method,
        "parent_sha256": meta.parent_sha256,
    }
    if meta.routing is not None:
        out["routing"] = json.dumps(meta.routing, separators=(",", ":"))
    return out


def hf_outputs(dest: Path, like: HFModel, meta: CheckpointMeta, client: int) -> list[OutputFile]:
    """The shards of a model folder at ``dest`` in ``like``'s layout and sharding: the same
    tensors in the same shard files, with fedmoe's provenance beside ``format: pt``."""
    metadata = hf_metadata(meta)
    return [
        OutputFile(
            dest / shard,
            [
                TensorSpec(n, like.dtype(n), like.shape(n))
                for n in like.names
                if like.shard_of[n] == shard
            ],
            metadata,
            client,
        )
        for shard in like.shards
    ]


def copy_hf_files(outputs: OutputSet, dest: Path, like: HFModel) -> str:
    """Stage every other file of ``like`` (config, index, generation and tokenizer files) at
    ``dest``, beside the shards already staged there; returns the folder's digest."""
    outputs.own_folder(dest)  # a forced replacement leaves no stale file of the old model
    digests = {shard: outputs.staged_sha256(dest / shard) for shard in like.shards}
    for name in like.files:
        if name in digests or name.endswith(".safetensors"):  # a shard the index does not use
            continue
        data = (like.path / name).read_bytes()
        outputs.write_bytes(dest / name, data)
        digests[name] = sha256_bytes(data)
    return folder_digest(digests)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError(
            "training or evaluating a Hugging Face model needs transformers, which is not installed",
            hint="pip install 'fedmoe[hf]'",
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # stderr is for fedmoe's own report
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        pass
    return transformers


def load_lm(model: HFModel) -> Any:
    """The folder's model as a ``transformers`` causal LM in float32 (for training on CPU)."""
    tf = _transformers()
    try:
        lm = tf.AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(
            f"{model.path}: transformers cannot load it ({str(exc).splitlines()[0]})",
            hint="check that the folder is a causal language model of an installed family",
        ) from None
    return lm


def new_lm(config: Mapping[str, Any], seed: int) -> Any:
    """A freshly initialised causal LM of ``config`` (a config.json as a dict); the initialisation
    draws from a generator seeded with ``seed`` and leaves torch's global generator as it was."""
    tf = _transformers()
    data = dict(config)
    kind = data.pop("model_type", None)
    try:
        cfg = tf.AutoConfig.for_model(kind, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"model config: {str(exc).splitlines()[0]}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.AutoModelForCausalLM.from_config(cfg)


def stage_lm(
    outputs: OutputSet, dest: Path, lm: Any, meta: CheckpointMeta, like: HFModel | None = None
) -> str:
    """Stage ``lm`` as a model folder at ``dest`` in the layout ``transformers`` saves (the
    published per-expert one), with fedmoe's provenance in every shard's metadata; the other files
    of ``like`` (tokenizer, generation config) are copied. Returns the folder's digest."""
    outputs.own_folder(dest)  # a forced replacement leaves no stale file of the old model
    import tempfile

    metadata = hf_metadata(meta)
    digests: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=".fedmoe-lm-") as tmp:
        lm.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as handle:
                    names = sorted(handle.keys())
                    specs = [
                        TensorSpec(
                            n, FROM_CODE[handle.get_slice(n).get_dtype()],
                            tuple(handle.get_slice(n).get_shape()),
                        )
                        for n in names
                    ]  # fmt: skip
                    with outputs.open(dest / f.name) as out:
                        writer = StreamWriter(out, specs, metadata)
                        for spec in writer.order:
                            writer.write(spec.name, handle.get_tensor(spec.name))
                        writer.close()
                digests[f.name] = outputs.staged_sha256(dest / f.name)
            else:
                data = f.read_bytes()
                outputs.write_bytes(dest / f.name, data)
                digests[f.name] = sha256_bytes(data)
    if like is not None:
        for name in like.files:
            if name not in digests and not name.endswith(".safetensors") and name != INDEX:
                data = (like.path / name).read_bytes()
                outputs.write_bytes(dest / name, data)
                digests[name] = sha256_bytes(data)
    return folder_digest(digests)


def stage_new_lm(
    outputs: OutputSet, dest: Path, spec: TinyLM, seed: int, parent_sha256: str = ""
) -> str:
    """Stage a new, randomly initialised model folder of ``spec`` at ``dest`` (the global start
    model of ``fedmoe init --hf`` and of a language-model recipe). Returns the folder's digest."""
    data = spec.config_json()
    meta = CheckpointMeta(HFConfig.from_dict(data), None, 0, 0, seed, "init", parent_sha256)
    return stage_lm(outputs, dest, new_lm(data, seed), meta)
