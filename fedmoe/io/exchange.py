"""The expert exchange of FedMoE-DA (arXiv 2411.02115, Sec. III, step 4): clients publish their
experts and fetch the peers' experts they need, directly, never through the server.

Each round a client publishes one safetensors file under the exchange root, at
``<method>/round-RRR/client-CCC.safetensors``, holding its experts only. Its tensors are named
``layer-LLL/expert-JJJJJ/<model tensor name>`` (for a stacked tensor, its slice j), so the file's
name order keeps each expert's tensors in one contiguous byte range. An expert's digest is the
sha256 of that range. The client reports (key, range, digest) of each expert to the server with
its small parts; the server relays them, unread, in each target's plan rows; the target reads
only the byte range of each expert its rows name, checks the digest, and parses the bytes against
its own model schema. A byte changed after publishing is refused with the client, layer and expert
named, and the round is not applied.

Locations are fsspec URLs: a local folder (a plain path or ``file://``), an object store
(``s3://``, ``gs://``, with the matching fsspec backend installed) or an HTTP server (``http://``:
fetching only; publishing needs a store that takes writes). Byte ranges come from
``cat_file(path, start, end)``, which local files seek, and HTTP and object stores answer with a
range request.

Departure from the paper: it does not say how experts travel between peers; this is our design.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedmoe.errors import InputError, OutputError
from fedmoe.io.safetensors_format import TensorSpec, header_bytes, raw_bytes
from fedmoe.model.schema import ModelSchema, TensorEntry

EXCHANGE_FORMAT = "fedmoe-exchange/1"
_KEY = re.compile(
    r"[A-Za-z0-9_@+-][A-Za-z0-9._@+-]*/round-\d{3,}/client-\d{3,}\.safetensors"
)  # no ../ escapes


@dataclass(frozen=True)
class ExpertRef:
    """Where one published expert lies, and its digest: what the plan carries for a source."""

    key: str  # the file, relative to the exchange root
    start: int  # first byte of the expert's tensors in the file
    end: int  # one past the last byte
    sha256: str  # of bytes [start, end)

    def to_list(self) -> list[Any]:
        """Compact JSON form ``[key, start, end, sha256]``."""
        return [self.key, self.start, self.end, self.sha256]

    @classmethod
    def from_list(cls, data: Any, where: str) -> ExpertRef:
        """Inverse of :meth:`to_list`; ``where`` names the message for errors."""
        ok = (
            isinstance(data, list)
            and len(data) == 4
            and isinstance(data[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in data[1:3])
            and isinstance(data[3], str)
            and 0 <= data[1] <= data[2]
            and _KEY.fullmatch(data[0]) is not None
        )
        if not ok:
            raise InputError(f"{where}: an expert reference is not [key, start, end, sha256]")
        return cls(data[0], data[1], data[2], data[3])


def _slices(schema: ModelSchema, layer: int, expert: int) -> list[tuple[str, TensorEntry]]:
    """The model tensors of one expert, in the order they are published: (published name, entry)."""
    out = []
    for entry in schema.experts(layer):
        if entry.stacked or entry.expert == expert:
            out.append((f"layer-{layer:03d}/expert-{expert:05d}/{entry.name}", entry))
    return sorted(out)


def _piece(entry: TensorEntry, state: Mapping[str, torch.Tensor], expert: int) -> torch.Tensor:
    t = state[entry.name]
    if entry.stacked:
        assert entry.expert_axis is not None
        return t.select(entry.expert_axis, expert).contiguous()
    return t


def exchange_key(method: str, round_: int, client: int) -> str:
    """Where ``client`` publishes its experts of ``round_`` for ``method``."""
    return f"{method}/round-{round_:03d}/client-{client:03d}.safetensors"


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise InputError(
            f"exchange location {url}: {exc}",
            hint="give a folder, or a URL whose fsspec backend is installed (e.g. s3fs for s3://)",
        ) from None
    return fs, root.rstrip("/")


def publish_experts(
    url: str, key: str, schema: ModelSchema, state: Mapping[str, torch.Tensor], client: int
) -> dict[tuple[int, int], ExpertRef]:
    """Publish ``client``'s experts at ``key`` under the exchange root ``url``.

    Returns
    -------
    dict
        (MoE layer, expert) → its reference.
    """
    specs: list[TensorSpec] = []
    pieces: dict[str, torch.Tensor] = {}
    for layer, num in enumerate(schema.num_experts):
        for j in range(num):
            for name, entry in _slices(schema, layer, j):
                t = _piece(entry, state, j)
                pieces[name] = t
                specs.append(TensorSpec(name, t.dtype, tuple(t.shape)))
    specs.sort(key=lambda s: s.name)
    meta = {"fedmoe_format": EXCHANGE_FORMAT, "client_id": str(client)}
    head = header_bytes(specs, meta)
    body = bytearray(head)
    refs: dict[tuple[int, int], ExpertRef] = {}
    for layer, num in enumerate(schema.num_experts):
        for j in range(num):
            start = len(body)
            digest = hashlib.sha256()
            for name, _ in _slices(schema, layer, j):
                data = raw_bytes(pieces[name])
                body += data
                digest.update(data)
            refs[(layer, j)] = ExpertRef(key, start, len(body), digest.hexdigest())
    fs, root = _fs(url)
    path = f"{root}/{key}"
    try:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        part = path + ".part"
        fs.pipe_file(part, bytes(body))
        fs.mv(part, path)
    except (OSError, NotImplementedError) as exc:
        raise OutputError(
            f"cannot publish to the exchange {url}: {exc}",
            hint="give every client an exchange location it can write to (a folder or a store)",
        ) from None
    return refs


class ExpertFetcher:
    """Reads the experts a target's rows name from the peers' published files, checking each
    against its digest; counts the bytes it moved. One per merge: fetched experts are kept until
    it is dropped."""

    def __init__(self, url: str, schema: ModelSchema, dtypes: Mapping[str, torch.dtype]) -> None:
        self.url = url
        self.schema = schema
        self.dtypes = dtypes  # the fetching client's own: every client shares one architecture
        self._fs, self._root = _fs(url)
        self.bytes_moved = 0
        self._cache: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}

    def expert(
        self, client: int, layer: int, expert: int, ref: ExpertRef
    ) -> dict[str, torch.Tensor]:
        """Model tensor name → this expert's piece (its slice of a stacked tensor, or the
        per-expert tensor), from ``client``'s published file."""
        key = (client, layer, expert)
        if key in self._cache:
            return self._cache[key]
        what = f"client {client}'s expert {expert} of MoE layer {layer}"
        slices = _slices(self.schema, layer, expert)
        shapes: list[tuple[TensorEntry, tuple[int, ...]]] = []
        for _, entry in slices:
            dims = list(entry.shape)
            if entry.stacked:
                assert entry.expert_axis is not None
                del dims[entry.expert_axis]
            shapes.append((entry, tuple(dims)))
        need = sum(_numel(s) * e.itemsize for e, s in shapes)
        if ref.end - ref.start != need:
            raise InputError(
                f"{what}: the plan gives {ref.end - ref.start} bytes at {ref.key}, the model's "
                f"expert has {need}",
                hint="every client of a federation must share one architecture",
            )
        try:
            data = self._fs.cat_file(f"{self._root}/{ref.key}", start=ref.start, end=ref.end)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{what}: cannot read {ref.key} from the exchange {self.url} ({exc})",
                hint="check that the exchange location is the one the peers publish to",
            ) from None
        self.bytes_moved += len(data)
        got = hashlib.sha256(data).hexdigest()
        if len(data) != need or got != ref.sha256:
            raise InputError(
                f"{what}: the bytes at {ref.key} do not match the sha256 it published "
                f"({got[:12]}… ≠ {ref.sha256[:12]}…); refused, the round is not applied",
                hint="the published file was changed after publishing: find out who changed it, "
                "then run the round again",
            )
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for entry, shape in shapes:
            n = _numel(shape) * entry.itemsize
            dtype = self.dtypes[entry.name]
            buf = bytearray(data[offset : offset + n])
            out[entry.name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
            offset += n
        self._cache[key] = out
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def refs_to_json(refs: Mapping[tuple[int, int], ExpertRef]) -> str:
    """``{"layer/expert": [key, start, end, sha256]}`` as compact JSON (for a message)."""
    return json.dumps(
        {f"{layer}/{j}": r.to_list() for (layer, j), r in sorted(refs.items())},
        separators=(",", ":"),
    )


def refs_from_json(text: str, where: str) -> dict[tuple[int, int], ExpertRef]:
    """Inverse of :func:`refs_to_json`."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise InputError(f"{where}: expert references are not JSON") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expert references are not a JSON object")
    out: dict[tuple[int, int], ExpertRef] = {}
    for k, v in data.items():
        layer, _, j = k.partition("/")
        if not (layer.isdigit() and j.isdigit()):
            raise InputError(f"{where}: expert reference key {k!r} is not 'layer/expert'")
        out[(int(layer), int(j))] = ExpertRef.from_list(v, where)
    return out


__all__ = [
    "EXCHANGE_FORMAT",
    "ExpertFetcher",
    "ExpertRef",
    "exchange_key",
    "publish_experts",
    "refs_from_json",
    "refs_to_json",
]
