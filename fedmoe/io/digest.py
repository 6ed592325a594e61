"""sha256 digests of files and bytes: how manifests, checkpoints and staged outputs are named."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    """Hex sha256 of a file, or of a folder: over the sorted ``relative/path sha256`` lines of
    every file below it (hidden files and folders, a leading ``.``, left out)."""
    if not path.is_dir():
        return sha256_file(path)
    lines = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            lines.append(f"{rel.as_posix()} {sha256_file(f)}\n")
    return sha256_bytes("".join(lines).encode())
