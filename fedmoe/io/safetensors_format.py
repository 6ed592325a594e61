"""Writing the safetensors format ourselves, so that a file can be streamed tensor by tensor.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON (``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}``,
padded with spaces to a multiple of 8), then the raw little-endian tensor bytes. Tensors are laid
out in name order, so the same tensors and metadata always give the same bytes.

Knowing every output's shape and dtype up front is enough to write the header first and then each
tensor as soon as it is computed: a merge never holds more than one output tensor in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_CODE: dict[str, torch.dtype] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor in a file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        count = 1
        for s in self.shape:
            count *= s
        return count * torch.empty((), dtype=self.dtype).element_size()


class Sink(Protocol):
    """Where a file's bytes go: an open binary file, or a wrapper around one."""

    def write(self, data: Any, /) -> int:
        """Write ``data``; returns the bytes written."""
        ...


@dataclass(frozen=True)
class OutputFile:
    """One safetensors file to write: its tensors, metadata, and whose model they come from."""

    path: Path
    specs: list[TensorSpec]
    metadata: dict[str, str]
    client: int  # the client whose output model the tensors are


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy little-endian byte view of a tensor's data (a copy if not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())  # type: ignore[arg-type]


def header_bytes(specs: list[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and padded JSON header for ``specs`` laid out in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))  # canonical key order
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class StreamWriter:
    """Write a safetensors file whose tensors arrive one at a time, in name order.

    Parameters
    ----------
    handle
        A binary file opened for writing (e.g. from :class:`fedmoe.io.atomic.OutputSet`).
    specs
        Every tensor the file will hold.
    metadata
        The ``__metadata__`` str→str map.
    """

    def __init__(self, handle: Sink, specs: list[TensorSpec], metadata: Mapping[str, str]) -> None:
        self._handle = handle
        self._specs = sorted(specs, key=lambda s: s.name)
        self._next = 0
        handle.write(header_bytes(self._specs, metadata))

    @property
    def order(self) -> list[TensorSpec]:
        """The tensors in the order :meth:`write` expects them."""
        return list(self._specs)

    def _expect(self, name: str) -> TensorSpec:
        if self._next >= len(self._specs):
            raise ValueError(f"tensor {name}: every declared tensor was already written")
        spec = self._specs[self._next]
        if name != spec.name:
            raise ValueError(f"tensor {name} written where {spec.name} was declared")
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; its name, dtype and shape must match the declared spec."""
        self._handle.write(self.next_bytes(name, tensor))

    def next_bytes(self, name: str, tensor: torch.Tensor) -> memoryview:
        """The bytes of the next tensor, checked against its spec, for the caller to write (the
        stream counts them as written)."""
        spec = self._expect(name)
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name} does not match the declared {spec}")
        self._next += 1
        return raw_bytes(tensor)

    def write_raw(self, name: str, chunks: Iterable[memoryview | bytes]) -> None:
        """Write the next tensor from raw little-endian byte chunks (for chunked merges)."""
        spec = self._expect(name)
        written = 0
        for chunk in chunks:
            size = memoryview(chunk).nbytes
            if written + size > spec.nbytes:
                raise ValueError(f"tensor {name}: more bytes than its declared {spec.nbytes}")
            self._handle.write(chunk)
            written += size
        if written != spec.nbytes:
            raise ValueError(f"tensor {name}: wrote {written} bytes, declared {spec.nbytes}")
        self._next += 1

    def close(self) -> None:
        """Check that every declared tensor was written."""
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            raise ValueError(f"safetensors stream closed before tensor {missing} was written")


def write_tensors(
    handle: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write in-memory ``tensors`` as one safetensors file."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = StreamWriter(handle, specs, metadata)
    for spec in writer.order:
        writer.write(spec.name, tensors[spec.name])
    writer.close()


def read_header(buffer: memoryview | bytes, where: str) -> tuple[dict[str, object], int]:
    """Parse a safetensors header from the start of ``buffer``; returns it and the data offset."""
    if len(buffer) < 8:
        raise ValueError(f"{where}: shorter than a safetensors header")
    (size,) = struct.unpack("<Q", bytes(buffer[:8]))
    if size > len(buffer) - 8 or size > 100_000_000:
        raise ValueError(f"{where}: header length {size} exceeds the file")
    try:
        header = json.loads(bytes(buffer[8 : 8 + size]))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{where}: header is not JSON (or is nested too deeply)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: header is not a JSON object")
    return header, 8 + size
