"""Atomic file output: a temp file in the destination folder, fsync, rename.

An interrupted command leaves the old output or none, never a torn file. :class:`OutputSet` stages
several files and renames them only when every one of them was written, so a command that fails
halfway leaves no partial output at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from fedmoe.errors import OutputError
from fedmoe.io.digest import sha256_file


def check_writable(path: Path, force: bool) -> None:
    """Refuse ``path`` when it exists and ``force`` is off, or when it is a folder.

    Nothing is created here, so a command that fails later leaves no empty folder behind.
    """
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file path for the output")
    if path.exists() and not force:
        raise OutputError(
            f"{path} exists; pass --force to replace it or choose another --out",
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {parent}", hint="choose another --out")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputSet:
    """Stage several output files and publish them together.

    Each :meth:`open` returns a binary handle on a temp file beside the destination. :meth:`commit`
    fsyncs and renames every staged file; :meth:`abort` (also run when the ``with`` block raises)
    removes them. Destinations are checked up front, so an existing output without ``force`` is
    refused before anything is written.
    """

    def __init__(self, force: bool = False) -> None:
        self.force = force
        self._staged: list[tuple[Path, Path]] = []
        self._made: list[Path] = []  # folders this set created, removed again on abort
        self._digests: dict[Path, str] = {}  # sha256 of staged files, noted while writing
        self._owned: list[Path] = []  # folders whose other files go at a forced commit

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def reserve(self, path: Path) -> None:
        """Check that ``path`` may be written (before any expensive work)."""
        check_writable(path, self.force)

    @contextmanager
    def open(self, path: Path) -> Iterator[BinaryIO]:
        """Open a staged temp file for ``path``; it becomes ``path`` at :meth:`commit`."""
        check_writable(path, self.force)
        try:
            missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.extend(reversed(missing))
            _remove_orphans(path)
            import tempfile  # 9 ms at start-up (random, shutil): only when something is written

            fd, tmp = tempfile.mkstemp(
                prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent
            )
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
        except OSError as exc:
            raise OutputError(f"cannot write in {path.parent}: {exc.strerror}") from exc
        tmp_path = Path(tmp)
        self._staged.append((tmp_path, path))
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def write_bytes(self, path: Path, data: bytes) -> None:
        """Stage ``data`` as the future content of ``path``."""
        with self.open(path) as handle:
            handle.write(data)

    def own_folder(self, folder: Path) -> None:
        """Declare ``folder`` to be wholly this set's output (a model folder): at a forced commit,
        its files that this set did not write are removed, so a replaced folder holds no stale
        shard of the model it replaces."""
        self._owned.append(folder)

    def record_sha256(self, path: Path, digest: str) -> None:
        """Note the sha256 of the file staged for ``path``, taken while it was written."""
        self._digests[path] = digest

    def staged_sha256(self, path: Path) -> str:
        """sha256 of the file staged for ``path`` (before it is published)."""
        if path in self._digests:
            return self._digests[path]
        for tmp, dest in self._staged:
            if dest == path:
                return sha256_file(tmp)
        raise KeyError(f"{path} is not staged")

    def commit(self) -> None:
        """Publish every staged file onto its destination.

        With ``force`` a destination is replaced (``os.replace``). Without it, each file is
        published by a hard link that fails if the destination exists, so refusing an existing
        output and publishing the new one are one atomic step: of two writers, one wins and the
        other gets an :class:`OutputError` (and its files already published are taken back).
        """
        published: list[Path] = []
        written = {dest for _, dest in self._staged}
        try:
            for tmp, dest in self._staged:
                if self.force:
                    os.replace(tmp, dest)
                    continue
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    raise OutputError(
                        f"{dest} exists; pass --force to replace it or choose another --out",
                    ) from None
                except OSError:  # no hard links on this filesystem: check, then rename
                    if dest.exists():
                        raise OutputError(
                            f"{dest} exists; pass --force to replace it or choose another --out"
                        ) from None
                    os.replace(tmp, dest)
                    published.append(dest)
                    continue
                published.append(dest)
                tmp.unlink(missing_ok=True)
        except OutputError:
            for dest in published:
                dest.unlink(missing_ok=True)
            self.abort()
            raise
        if self.force:
            for folder in self._owned:
                for old in folder.iterdir() if folder.is_dir() else ():
                    if old.is_file() and old not in written and not old.name.startswith("."):
                        old.unlink(missing_ok=True)
        if self._staged:
            _fsync_dir(self._staged[-1][1].parent)
        self._staged.clear()

    def abort(self) -> None:
        """Remove every staged temp file; destinations are left as they were."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged.clear()
        for folder in reversed(self._made):  # deepest first; only if still empty
            with suppress(OSError):
                folder.rmdir()
        self._made.clear()


def write_atomic(path: Path, data: bytes, force: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (refused if it exists and ``force`` is off)."""
    with OutputSet(force) as out:
        out.write_bytes(path, data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_orphans(path: Path) -> None:
    """Remove temp files that a killed writer of ``path`` left beside it (``SIGKILL`` leaves no
    chance to clean up): their names carry the writer's pid, and a pid no longer running cannot
    still be writing."""
    prefix = f".{path.name}."
    try:
        names = [e.name for e in os.scandir(path.parent)]  # string tests: no glob pattern to
    except OSError:  # compile for every file written
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp") and "-" in name[len(prefix) :]):
            continue
        tmp = path.parent / name
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:  # the writer is gone
            with suppress(OSError):
                tmp.unlink()
        except OSError:  # alive (another user's process): leave it
            continue
