"""Model checkpoints: one safetensors file per model, with provenance in ``__metadata__``.

Format ``fedmoe-moe/2`` (``fedmoe-moe/1`` is still read):

- tensors as :data:`fedmoe.model.schema.FEDMOE_LAYOUT` declares them: ``embed.*`` (φ),
  ``blocks.{l}.gate.weight`` / ``blocks.{l}.experts.*`` (hidden MoE layers, when ``moe_layers`` >
  1), ``gate.weight`` / ``gate.bias`` (G), ``experts.w1 (E, H, F)``, ``experts.b1 (E, F)``,
  ``experts.w2 (E, F, C)``, ``experts.b2 (E, C)`` (θ of the classifying layer), all float32;
- metadata (all strings): ``fedmoe_version``, ``format``, ``model_config`` (JSON), ``client_id``
  (an integer, or "global"), ``round``, ``num_samples``, ``parent_sha256``, ``seed``, ``method``,
  and ``routing`` (JSON, see :mod:`fedmoe.train.routing`; per MoE layer since format 2) once a
  client has trained.

Reading is lazy (``safe_open`` is mmap-backed): :meth:`Checkpoint.tensor` and
:meth:`Checkpoint.expert` read one tensor or one expert slice, never the whole file. Opening a
checkpoint and reading its upload (:meth:`Checkpoint.upload`) need no torch: the server-side
commands that read only gates (``affinity``) never import it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open

from fedmoe import __version__
from fedmoe.affinity.proxies import Upload
from fedmoe.errors import InputError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.manifest import sha256_file
from fedmoe.model import ModelSchema, expected_shapes, schema_for
from fedmoe.model.config import MoEConfig
from fedmoe.model.hf import ModelConfig

if TYPE_CHECKING:
    import torch

FORMAT = "fedmoe-moe/2"
READABLE_FORMATS = ("fedmoe-moe/1", FORMAT)
REQUIRED_META = ("format", "model_config", "client_id", "round", "num_samples")


@dataclass(frozen=True)
class CheckpointMeta:
    """Provenance of one checkpoint (written as strings into ``__metadata__``)."""

    config: ModelConfig  # the architecture
    client_id: int | None  # None for a global (server or initial) model
    round: int  # federated round that produced it (0 = initial model)
    num_samples: int  # training samples behind it (FedAvg weight)
    seed: int  # seed of the run that produced it
    method: str  # "init", "train", or the aggregation method
    parent_sha256: str = ""  # sha256 of the checkpoint it was derived from, if one
    routing: dict[str, Any] | None = None  # routing statistics, see fedmoe.train.routing
    extra: dict[str, str] = field(default_factory=dict)  # further provenance, kept by merges
    cluster: int | None = None  # clustered FL (IFCA): the cluster model it was trained from

    def to_metadata(self) -> dict[str, str]:
        """The str→str ``__metadata__`` map."""
        meta = dict(self.extra)  # provenance first: the core keys below always win
        meta |= {
            "fedmoe_version": __version__,
            "format": FORMAT,
            "model_config": self.config.to_json(),
            "client_id": "global" if self.client_id is None else str(self.client_id),
            "round": str(self.round),
            "num_samples": str(self.num_samples),
            "parent_sha256": self.parent_sha256,
            "seed": str(self.seed),
            "method": self.method,
        }
        if self.routing is not None:
            meta["routing"] = json.dumps(self.routing, separators=(",", ":"))
        if self.cluster is not None:
            meta["cluster"] = str(self.cluster)
        return meta


def parse_meta(meta: Mapping[str, str], where: str) -> CheckpointMeta:
    """Validate and parse a checkpoint's ``__metadata__``."""
    for key in REQUIRED_META:
        if key not in meta:
            raise InputError(
                f"{where}: metadata key '{key}' missing; not a fedmoe checkpoint",
                hint="create checkpoints with fedmoe init / train-round / aggregate",
            )
    if meta["format"] not in READABLE_FORMATS:
        raise InputError(
            f"{where}: format '{meta['format']}' is not one of {', '.join(READABLE_FORMATS)}"
        )
    config = MoEConfig.from_json(meta["model_config"], where)
    try:
        client = None if meta["client_id"] == "global" else int(meta["client_id"])
        rnd, num = int(meta["round"]), int(meta["num_samples"])
        seed = int(meta.get("seed", "0"))
        routing = json.loads(meta["routing"]) if meta.get("routing") else None
        cluster = int(meta["cluster"]) if "cluster" in meta else None
    except (ValueError, json.JSONDecodeError):
        raise InputError(
            f"{where}: malformed client_id/round/num_samples/routing/cluster metadata"
        ) from None
    limit = 2**53  # beyond what a float64 FedAvg weight represents exactly
    values = (("client_id", client), ("round", rnd), ("num_samples", num), ("seed", seed),
              ("cluster", cluster))  # fmt: skip
    for key, value in values:
        if value is not None and not 0 <= value < limit:
            raise InputError(
                f"{where}: metadata {key} = {value} is out of range (0 ≤ {key} < 2^53)",
                hint="re-create the checkpoint with fedmoe",
            )
    if routing is not None and not isinstance(routing, dict):
        raise InputError(f"{where}: routing metadata must be a JSON object")
    known = {*REQUIRED_META, "fedmoe_version", "parent_sha256", "seed", "method", "routing",
             "cluster"}  # fmt: skip
    extra = {k: v for k, v in meta.items() if k not in known}
    return CheckpointMeta(
        config,
        client,
        rnd,
        num,
        seed,
        meta.get("method", ""),
        meta.get("parent_sha256", ""),
        routing,
        extra,
        cluster,
    )


class Checkpoint:
    """An open checkpoint: parsed metadata, and lazy access to tensors and expert slices."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        where = str(path)
        if not self.path.is_file():
            raise InputError(f"{where}: no such checkpoint file", hint="check the path")
        try:
            handle = safe_open(str(self.path), framework="numpy")
            raw_meta = handle.metadata() or {}
            self.names: list[str] = sorted(handle.keys())
            header = {n: handle.get_slice(n) for n in self.names}
            self._dtypes = {n: piece.get_dtype() for n, piece in header.items()}
            self._shapes = {n: tuple(piece.get_shape()) for n, piece in header.items()}
            del handle, header  # an open handle keeps the file's pages resident: reopen lazily
        except Exception as exc:  # safetensors raises its own SafetensorError on bad files
            raise InputError(
                f"{where}: not a readable safetensors file ({str(exc).splitlines()[0]})",
                hint="the file may be truncated; re-create it",
            ) from None
        self.meta = parse_meta(raw_meta, where)
        shapes = expected_shapes(self.moe_config)
        if set(shapes) != set(self.names):
            missing = sorted(set(shapes) - set(self.names))
            unknown = sorted(set(self.names) - set(shapes))
            raise InputError(
                f"{where}: tensors do not match its model_config "
                f"(missing: {missing or 'none'}, unexpected: {unknown or 'none'})"
            )
        for name in self.names:
            if self._dtypes[name] != "F32":
                raise InputError(
                    f"{where}: tensor {name} is {self._dtypes[name]}; "
                    f"{FORMAT} checkpoints hold float32 tensors"
                )
            shape = self._shapes[name]
            if shape != shapes[name]:
                raise InputError(
                    f"{where}: tensor {name} has shape {list(shape)}, its model_config "
                    f"needs {list(shapes[name])}"
                )
        self._sha256: str | None = None
        self._torch: Any = None  # a torch handle, opened on the first tensor read

    @property
    def _pt(self) -> Any:
        if self._torch is None:
            self._torch = safe_open(str(self.path), framework="pt")
        return self._torch

    @property
    def config(self) -> ModelConfig:
        """The model config."""
        return self.meta.config

    @property
    def moe_config(self) -> MoEConfig:
        """The built-in model's config (what training and evaluation build a model from)."""
        config = self.meta.config
        if not isinstance(config, MoEConfig):
            raise InputError(
                f"{self.path}: a Hugging Face model folder; this step takes fedmoe checkpoints",
                hint="the server-side steps (affinity, plan-sync, aggregate) take model folders",
            )
        return config

    @property
    def schema(self) -> ModelSchema:
        """The roles of the model's tensors."""
        return schema_for(self.moe_config)

    def upload(self, proxies: bool = True) -> Upload:
        """What this client checkpoint sends the server: its gates' proxies (read alone, no
        expert byte; left out with ``proxies=False``, for a merge that does not need them),
        routing statistics and sample count."""
        meta = self.meta
        if meta.client_id is None:
            raise InputError(f"{self.path} is a global model, not a client's upload")
        schema = self.schema
        rows = tuple(
            self._array(schema.proxy(layer)) for layer in range(schema.num_layers if proxies else 0)
        )
        return Upload(
            meta.client_id, meta.num_samples, meta.round, rows, meta.routing, meta.cluster
        )

    @property
    def sha256(self) -> str:
        """sha256 of the file (computed once)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (from the header; no data read)."""
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of tensor ``name`` (from the header; no data read)."""
        from fedmoe.io.safetensors_format import FROM_CODE

        return FROM_CODE[self._dtypes[name]]

    def _array(self, name: str) -> Any:
        """Read one tensor as a NumPy array (no torch), refusing NaN/Inf: an upload's proxies."""
        a: np.ndarray = safe_open(str(self.path), framework="numpy").get_tensor(name)
        if not np.isfinite(a).all():
            raise InputError(
                f"{self.path}: tensor {name} contains NaN or Inf",
                hint="drop this client's update this round",
            )
        return a

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor, refusing NaN/Inf with an error that names the file, the tensor and,
        for a stacked expert tensor, the first expert at fault."""
        import torch

        t = self._pt.get_tensor(name)
        if t.is_floating_point() and not all_finite(t):
            entry = self.schema.entry(name)
            what = f"{self.path}: tensor {name}"
            if entry.expert_axis is not None:
                flat = torch.isfinite(t).movedim(entry.expert_axis, 0).reshape(t.shape[0], -1)
                bad = int(torch.nonzero(~flat.all(dim=1))[0])
                what += f" expert {bad}"
            check_finite(t, what)
        return t

    def expert(self, name: str, index: int) -> torch.Tensor:
        """Read slice ``[index]`` of expert tensor ``name`` (only that expert's bytes)."""
        t = self._pt.get_slice(name)[index]
        check_finite(t, f"{self.path}: tensor {name} expert {index}")
        return t

    def reads_whole(self, name: str, indices: list[int]) -> bool:
        """Whether :meth:`experts` reads the whole stacked tensor for ``indices`` (at least half
        of its experts wanted) rather than one slice each."""
        return 2 * len(indices) >= self.shape(name)[0]

    def experts(self, name: str, indices: list[int]) -> torch.Tensor:
        """Slices ``[indices]`` of stacked expert tensor ``name``, stacked (k, ...): see
        :meth:`reads_whole`."""
        if self.reads_whole(name, indices):
            return pick(self.tensor(name), indices)
        import torch

        return torch.stack([self.expert(name, j) for j in indices])

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor, by name."""
        return {name: self.tensor(name) for name in self.names}


def pick(whole: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Experts ``indices`` of a whole stacked tensor: the tensor itself when they are all of them
    in order (no copy), else a stacked copy."""
    return whole if indices == list(range(whole.shape[0])) else whole[indices]


def check_finite(t: torch.Tensor, what: str) -> None:
    """An :class:`InputError` naming ``what`` when ``t`` holds NaN or Inf."""
    if t.is_floating_point() and not all_finite(t):
        raise InputError(f"{what} contains NaN or Inf", hint="drop this client's update this round")


def all_finite(t: torch.Tensor) -> bool:
    """True when every value of ``t`` is finite. A NaN or Inf makes the sum non-finite, so a finite
    sum (one fast reduction) proves it; only a non-finite sum (or an overflowing one) pays for the
    element-wise check."""
    import torch

    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Open and validate a checkpoint."""
    return Checkpoint(Path(path))


def save_checkpoint(
    outputs: OutputSet, path: Path, state: Mapping[str, torch.Tensor], meta: CheckpointMeta
) -> None:
    """Stage ``state`` with ``meta`` as a checkpoint at ``path`` (published at commit)."""
    from fedmoe.io.safetensors_format import write_tensors

    for name, t in state.items():
        check_finite(t, f"model for {path}: tensor {name}")
    with outputs.open(path) as handle:
        write_tensors(handle, state, meta.to_metadata())
