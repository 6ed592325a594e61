"""A plain linear merge of any compatible safetensors files: out = Σ w_f · file_f, tensor by tensor.

This is what mergekit's ``linear`` method does, without its stack-then-sum: each output tensor is
produced in chunks of 2 MiB; for a chunk, every input's slice is read into one reused buffer and
added into one accumulator, both of which stay in cache, so every input byte is read once. One
worker thread per core computes chunks ahead while the previous ones are written; peak extra
memory is a few chunks per worker whatever the file sizes. Floating tensors are accumulated in float32
(float64 for float64) and rounded once to their dtype.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from fedmoe.errors import InputError, UsageError
from fedmoe.io.safetensors_format import (
    FROM_CODE,
    StreamWriter,
    TensorSpec,
    raw_bytes,
    read_header,
)

CHUNK_BYTES = 2 << 20
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # drops a read window's pages (not on Windows)
_SPILL = 2 << 20  # bytes past a window that its faults may have mapped too

# torch warns once per process that a tensor over a read-only buffer must not be written; the
# windows of MappedFile are only ever read, so that one warning is taken here, silenced
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)
ON_MISSING = ("error", "intersection")


@dataclass(frozen=True)
class MappedTensor:
    """A tensor inside a mapped file: dtype, shape, byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class MappedFile:
    """A safetensors file opened for streaming: its header parsed, its data read chunk by chunk.

    Data is read with ``readinto`` into caller-owned buffers rather than mapped, so the page cache
    never counts as this process's memory and the only memory a merge holds is its chunk buffers.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{path}: no such file", hint="check the path")
        try:
            self._map: mmap.mmap | None = None  # the whole file, mapped by window()
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
            size = self.path.stat().st_size
            head = self._file.read(min(size, 8))
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 <= header_len <= min(size - 8, 100_000_000):
                raise ValueError("bad header length")
            header, data_start = read_header(head + self._file.read(header_len), str(path))
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{path}: not a readable safetensors file ({exc})",
                hint="the file may be truncated; re-create it",
            ) from None
        meta: Any = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise InputError(
                f"{path}: __metadata__ must map strings to strings (the safetensors format)",
                hint="re-save the file with a safetensors writer",
            )
        self.metadata: dict[str, str] = dict(meta)
        self.tensors: dict[str, MappedTensor] = {}
        entries: dict[str, Any] = header
        for name, info in entries.items():
            try:
                dtype = FROM_CODE[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                lo, hi = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise InputError(
                    f"{path}: tensor {name} has a malformed or unsupported entry"
                ) from None
            if not 0 <= lo <= hi or data_start + hi > size:
                raise InputError(
                    f"{path}: tensor {name} lies beyond the end of the file (truncated)"
                )
            if TensorSpec(name, dtype, shape).nbytes != hi - lo:
                raise InputError(f"{path}: tensor {name} byte range does not match its shape")
            self.tensors[name] = MappedTensor(dtype, shape, data_start + lo, data_start + hi)
        # the format lays tensors out back to back: byte ranges may neither overlap nor leave gaps
        spans = sorted((t.start, t.end, n) for n, t in self.tensors.items())
        expected = data_start
        for lo_b, hi_b, name in spans:
            if lo_b != expected:
                what = "overlaps the tensor before it" if lo_b < expected else "leaves a gap"
                raise InputError(
                    f"{path}: tensor {name}'s byte range {what}",
                    hint="the file is not valid safetensors; re-save it",
                )
            expected = hi_b

    def read_into(self, name: str, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (a flat tensor of the tensor's dtype) from element ``offset`` of ``name``.

        Positional reads (``preadv``), so several threads may read the same file at once.
        """
        t = self.tensors[name]
        nbytes = out.numel() * out.element_size()
        view = raw_bytes(out)
        start = t.start + offset * out.element_size()
        fd = self._file.fileno()
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], start + got)
            if not n:
                raise InputError(f"{self.path}: tensor {name} ends early (file truncated)")
            got += n
        return out

    @contextmanager
    def window(self, name: str, offset: int, count: int) -> Iterator[torch.Tensor]:
        """Elements ``[offset, offset + count)`` of tensor ``name``, as a read-only tensor over
        the file's mapping, whose pages are dropped again on exit (so at most a chunk per input
        counts as this process's memory). Summing straight from the page cache reads each input
        byte once, where :meth:`read_into` copies it into a buffer first. The file is mapped
        once, shared and read-only (no memory is committed for it), so threads never contend to
        map and unmap. Like any mapping (safetensors' own included), a file truncated by another
        process while it is read is a bus error, not an :class:`InputError`; its size was
        checked at open."""
        t = self.tensors[name]
        if count == 0:
            yield torch.empty(0, dtype=t.dtype)
            return
        size = torch.empty((), dtype=t.dtype).element_size()
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        start = t.start + offset * size
        end = start + count * size
        try:
            yield torch.frombuffer(self._map, dtype=t.dtype, count=count, offset=start)
        finally:
            # the window's pages, and those the kernel mapped past its end with them (a fault
            # maps a whole folio of the page cache, up to 2 MiB): a neighbouring window being
            # read meanwhile only faults its pages in again
            first = start - start % mmap.PAGESIZE
            last = min(len(self._map), end + _SPILL)
            if _DONTNEED is not None:
                self._map.madvise(_DONTNEED, first, last - first)

    def close(self) -> None:
        """Close the file."""
        if self._map is not None:
            with suppress(BufferError):  # a view still held elsewhere: unmapped when collected
                self._map.close()
            self._map = None
        self._file.close()


class Mapped(Protocol):
    """A file or a model folder opened for streaming (:class:`MappedFile`, :class:`MappedFolder`)."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, MappedTensor]

    def read_into(self, name: str, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` from element ``offset`` of tensor ``name``."""
        ...

    def window(self, name: str, offset: int, count: int) -> AbstractContextManager[torch.Tensor]:
        """Elements ``[offset, offset + count)`` of tensor ``name``, mapped while in use."""
        ...

    def close(self) -> None:
        """Release the files."""
        ...


class MappedFolder:
    """A model folder (``config.json`` beside ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``) opened for streaming: every shard's tensors by name."""

    def __init__(self, path: Path) -> None:
        import json

        from fedmoe.io.hf_folder import INDEX, SINGLE

        self.path = Path(path)
        index = self.path / INDEX
        weight_map: dict[str, str] | None = None
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                weight_map = data["weight_map"]
                ok = isinstance(weight_map, dict) and all(
                    isinstance(k, str) and isinstance(v, str) and "/" not in v and v != ".."
                    for k, v in weight_map.items()
                )
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                ok = False
            if not ok or not weight_map:
                raise InputError(
                    f"{index}: not a readable index (a weight_map of tensor → shard file)",
                    hint="re-save the model with save_pretrained",
                )
            self.shards = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            self.shards = [SINGLE]
        else:
            raise InputError(
                f"{self.path}: no {SINGLE} and no {INDEX}", hint="save the model with safetensors"
            )
        self.files: dict[str, MappedFile] = {}
        try:
            for shard in self.shards:
                self.files[shard] = MappedFile(self.path / shard)
        except InputError:
            self.close()
            raise
        self.tensors: dict[str, MappedTensor] = {}
        self.shard_of: dict[str, str] = {}
        for shard, f in self.files.items():
            for name, t in f.tensors.items():
                if name in self.tensors:
                    self.close()
                    raise InputError(f"{self.path}: tensor {name} is in two shards")
                self.tensors[name] = t
                self.shard_of[name] = shard
        if weight_map is not None and weight_map != self.shard_of:
            self.close()
            wrong = sorted(set(weight_map.items()) ^ set(self.shard_of.items()))[0][0]
            raise InputError(
                f"{index}: maps tensor {wrong} to a shard that does not hold it (or misses it)",
                hint="re-save the model with save_pretrained",
            )
        self.metadata: dict[str, str] = self.files[self.shards[0]].metadata

    def read_into(self, name: str, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` from element ``offset`` of tensor ``name`` (from the shard holding it)."""
        return self.files[self.shard_of[name]].read_into(name, offset, out)

    def window(self, name: str, offset: int, count: int) -> AbstractContextManager[torch.Tensor]:
        """:meth:`MappedFile.window` of the shard holding tensor ``name``."""
        return self.files[self.shard_of[name]].window(name, offset, count)

    def close(self) -> None:
        """Close every shard."""
        for f in self.files.values():
            f.close()


def plan_linear(files: Sequence[Mapped], on_missing: str) -> list[TensorSpec]:
    """The output tensors: names shared by every file (``intersection``) or all of them
    (``error`` refuses any name missing from a file), with matching dtype and shape."""
    if on_missing not in ON_MISSING:
        raise UsageError(f"--on-missing must be one of {', '.join(ON_MISSING)}")
    names = set(files[0].tensors)
    for f in files[1:]:
        if on_missing == "error" and set(f.tensors) != names:
            diff = sorted(set(f.tensors) ^ names)
            where = f.path if diff[0] not in f.tensors else files[0].path
            raise InputError(
                f"tensor {diff[0]} is missing from {where}",
                hint="merge only files with the same tensors, or pass --on-missing intersection",
            )
        names &= set(f.tensors)
    if not names:
        raise InputError("the files have no tensor name in common")
    specs = []
    for name in sorted(names):
        ref = files[0].tensors[name]
        for f in files[1:]:
            t = f.tensors[name]
            if t.dtype != ref.dtype or t.shape != ref.shape:
                raise InputError(
                    f"tensor {name}: {files[0].path} has {ref.dtype} {list(ref.shape)}, "
                    f"{f.path} has {t.dtype} {list(t.shape)}",
                    hint="only tensors of the same dtype and shape can be merged",
                )
        if not ref.dtype.is_floating_point:
            raise InputError(f"tensor {name} has dtype {ref.dtype}; only floating tensors merge")
        specs.append(TensorSpec(name, ref.dtype, ref.shape))
    return specs


@dataclass
class _Buffers:
    """One worker's chunk buffers: what it reads into, accumulates in, and returns."""

    read: torch.Tensor  # (step,) input dtype
    acc: torch.Tensor  # (step,) float32 (float64 for float64 tensors)
    out: torch.Tensor  # (step,) output dtype (unused when it equals the accumulator's)


def _merge_chunk(
    files: Sequence[Mapped], weights: list[float], spec: TensorSpec, lo: int, n: int, b: _Buffers
) -> torch.Tensor:
    """Σ w_f · file_f over elements [lo, lo + n) of tensor ``spec``, in ``b``'s buffers."""
    acc, buf = b.acc[:n], b.read[:n]
    with files[0].window(spec.name, lo, n) as part:
        if spec.dtype == acc.dtype:
            torch.mul(part, weights[0], out=acc)
        else:  # widen first, so the first term is rounded only once, at the end
            acc.copy_(part)
            acc.mul_(weights[0])
    for f, w in zip(files[1:], weights[1:], strict=True):
        with f.window(spec.name, lo, n) as part:
            acc.add_(part, alpha=w)
    out = acc if spec.dtype == acc.dtype else b.out[:n].copy_(acc)
    # one cheap reduction (NaN and Inf propagate through a sum); the culprit is searched for only
    # when it is not finite
    if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        for f in files:
            if not bool(torch.isfinite(f.read_into(spec.name, lo, buf)).all()):
                raise InputError(
                    f"{f.path}: tensor {spec.name} contains NaN or Inf",
                    hint="leave this file out of the merge",
                )
        raise InputError(
            f"tensor {spec.name}: the weighted sum overflows {spec.dtype}",
            hint="check the --weights",
        )
    return out


def _chunks(
    pool: ThreadPoolExecutor,
    sets: list[_Buffers],
    files: Sequence[Mapped],
    weights: list[float],
    spec: TensorSpec,
) -> Iterator[memoryview]:
    """The output chunks of one tensor, in order, computed ahead by the pool's workers."""
    step = sets[0].read.numel()
    total = spec.nbytes // torch.empty((), dtype=spec.dtype).element_size()
    starts = iter(range(0, total, step))
    free = list(sets)
    pending: deque[tuple[Future[torch.Tensor], _Buffers]] = deque()

    def submit() -> None:
        while free and (lo := next(starts, None)) is not None:
            b = free.pop()
            n = min(step, total - lo)
            pending.append((pool.submit(_merge_chunk, files, weights, spec, lo, n, b), b))

    submit()
    while pending:
        future, b = pending.popleft()
        yield raw_bytes(future.result())  # written by the caller before the next request
        free.append(b)
        submit()


def write_linear(
    handle: BinaryIO,
    files: Sequence[Mapped],
    weights: list[float],
    specs: list[TensorSpec],
    metadata: dict[str, str],
    chunk_bytes: int = CHUNK_BYTES,
    workers: int | None = None,
) -> None:
    """Stream Σ w_f · file_f for every spec into ``handle`` as one safetensors file.

    Chunks are computed by ``workers`` threads (default: torch's thread count), each single-threaded
    inside torch (torch's own thread count is set to 1 for the duration and restored), so the cores
    are used once each, never oversubscribed; chunks are written in order as they complete.
    """
    workers = workers or max(1, torch.get_num_threads())
    writer = StreamWriter(handle, specs, metadata)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            sets_by_dtype: dict[torch.dtype, list[_Buffers]] = {}
            for spec in writer.order:
                if spec.dtype not in sets_by_dtype:
                    size = torch.empty((), dtype=spec.dtype).element_size()
                    step = max(1, chunk_bytes // size)
                    acc_dtype = torch.float64 if spec.dtype == torch.float64 else torch.float32
                    sets_by_dtype[spec.dtype] = [
                        _Buffers(
                            torch.empty(step, dtype=spec.dtype),
                            torch.empty(step, dtype=acc_dtype),
                            torch.empty(step if acc_dtype != spec.dtype else 0, dtype=spec.dtype),
                        )
                        for _ in range(workers + 1)
                    ]
                sets = sets_by_dtype[spec.dtype]
                writer.write_raw(spec.name, _chunks(pool, sets, files, weights, spec))
    finally:
        torch.set_num_threads(previous)
    writer.close()


def merged_metadata(
    files: Sequence[Mapped], weights: list[float], method: str, digests: list[str]
) -> dict[str, str]:
    """Provenance of a linear merge: keys equal in every input are kept as they are; every input's
    full metadata, path, sha256 and weight go into ``fedmoe_merge`` (JSON), so nothing is dropped."""
    import json

    from fedmoe import __version__

    common = dict(files[0].metadata)
    for f in files[1:]:
        common = {k: v for k, v in common.items() if f.metadata.get(k) == v}
    sources: list[dict[str, Any]] = [
        {"path": f.path.name, "sha256": d, "weight": w, "metadata": f.metadata}
        for f, w, d in zip(files, weights, digests, strict=True)
    ]
    return {
        **common,
        "fedmoe_version": __version__,
        "fedmoe_merge": json.dumps({"method": method, "sources": sources}, separators=(",", ":")),
    }


def write_linear_folder(
    outputs: Any,
    out: Path,
    folders: list[MappedFolder],
    weights: list[float],
    specs: list[TensorSpec],
    metadata: dict[str, str],
) -> int:
    """Stage Σ w_f · folder_f as a model folder at ``out`` in the first folder's sharding (its
    index rewritten when tensors were left out), with its other files (config, tokenizer,
    generation config) copied; the folder holds nothing else afterwards. Returns the shards
    written."""
    import json

    from fedmoe.io.hf_folder import INDEX

    like = folders[0]
    outputs.own_folder(out)
    by_shard: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        by_shard.setdefault(like.shard_of[spec.name], []).append(spec)
    for shard in like.shards:
        if shard in by_shard:
            with outputs.open(out / shard) as handle:
                write_linear(handle, list(folders), weights, by_shard[shard], metadata)
    if (like.path / INDEX).is_file():
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {
                s.name: like.shard_of[s.name] for s in sorted(specs, key=lambda s: s.name)
            },
        }
        outputs.write_bytes(out / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    for item in sorted(like.path.iterdir()):
        if (
            item.is_file()
            and item.suffix != ".safetensors"
            and item.name != INDEX
            and not item.name.startswith(".")
        ):
            outputs.write_bytes(out / item.name, item.read_bytes())
    return len(by_shard)
