"""The run folder of ``fedmoe run``: where each artefact of a run lives, and the few writes that
are not a manifest or a checkpoint (the metrics log, upload links, pruning old rounds).

Layout::

    recipe.yaml  partition.json  init.safetensors (init/: a language model's folder)  run.json
    metrics.jsonl  metrics.csv  report.json  *.png
    rounds/<method>/round-XXX/train/        train-round output (client-XXX.safetensors or
                                            client-XXX/ model folders, manifest)
    rounds/<method>/round-XXX/affinity.json FedMoE-DA, rounds where the matrices are recomputed
    rounds/<method>/round-XXX/plan.json     FedMoE-DA's sync plan
    rounds/<method>/round-XXX/models/       aggregate output: every client's next model
    rounds/<method>/uploads/                FedMoE-DA: each client's latest upload (stale proxies)

Every round folder is what the CLI writes when the round is run by hand with the same paths; the
checkpoints of rounds before the latest are pruned, their JSON artefacts kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedmoe.errors import OutputError

RUN_FILES = (
    "run.json",
    "metrics.jsonl",
    "metrics.csv",
    "report.json",
    "recipe.yaml",
    "partition.json",
    "init.safetensors",
    "accuracy.png",
    "perplexity.png",
    "traffic.png",
    "affinity.png",
    "sync_graph.png",
)
RUN_DIRS = ("rounds", "init")


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder."""

    root: Path

    @property
    def metrics(self) -> Path:
        """The metrics log, one JSON line per method and round."""
        return self.root / "metrics.jsonl"

    @property
    def metrics_csv(self) -> Path:
        """The metrics log as a flat table (written by the report)."""
        return self.root / "metrics.csv"

    @property
    def run_info(self) -> Path:
        """The command line and environment that made the run (``run.json``)."""
        return self.root / "run.json"

    @property
    def partition(self) -> Path:
        """The partition manifest."""
        return self.root / "partition.json"

    @property
    def init(self) -> Path:
        """The initial model."""
        return self.root / "init.safetensors"

    @property
    def init_folder(self) -> Path:
        """The initial model of a language-model run (a Hugging Face model folder)."""
        return self.root / "init"

    def init_model(self, language: bool) -> Path:
        """The initial model: the checkpoint, or a language model's folder."""
        return self.init_folder if language else self.init

    @property
    def recipe(self) -> Path:
        """The resolved recipe."""
        return self.root / "recipe.yaml"

    def method(self, method: str) -> Path:
        """One method's folder."""
        return self.root / "rounds" / method

    def round(self, method: str, round_: int) -> Path:
        """One round's folder."""
        return self.method(method) / f"round-{round_:03d}"

    def uploads(self, method: str) -> Path:
        """Each client's latest upload (FedMoE-DA's stale proxies)."""
        return self.method(method) / "uploads"

    def started(self) -> bool:
        """True when the folder already holds (part of) a run."""
        return self.root.is_dir() and any((self.root / f).exists() for f in (*RUN_FILES, *RUN_DIRS))

    @property
    def staging(self) -> Path:
        """Where ``--force`` builds a new run beside an old one: a hidden sibling (same depth, so
        the relative paths its manifests hold stay true once it is moved in)."""
        return self.root.parent / f".{self.root.name}.fedmoe-new"

    def clear(self) -> None:
        """Remove a previous run's files (``--force``); other files are left alone."""
        for name in RUN_DIRS:
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in RUN_FILES:
            (self.root / name).unlink(missing_ok=True)


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold the run folder ``folder`` for one ``fedmoe run`` at a time (an advisory lock on a file
    beside it, released however the process ends): a second run into the same folder is refused
    instead of mixing two runs' files."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no advisory lock; runs are not guarded there
        yield
        return

    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.fedmoe-lock"
    handle = open(path, "a+b")  # noqa: SIM115  held for the whole run
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(
                f"{folder} is in use by another fedmoe run",
                hint="wait for it to finish, or choose another --out",
            ) from None
        yield
    finally:
        handle.close()


def publish_run(stage: Path, out: Path) -> None:
    """Replace the run in ``out`` by the complete run in ``stage`` (``--force``): the old run's
    entries are moved aside, the new ones moved in (renames on one file system), then the old ones
    removed. Files of ``out`` that are not part of a run are left alone."""
    aside = out / f".fedmoe-old-{os.getpid()}"
    aside.mkdir(parents=True, exist_ok=True)
    for name in (*RUN_FILES, *RUN_DIRS):
        if (out / name).exists():
            os.replace(out / name, aside / name)
    for name in (*RUN_FILES, *RUN_DIRS):
        if (stage / name).exists():
            os.replace(stage / name, out / name)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


def append_line(path: Path, line: str, repair: bool = True) -> None:
    """Append one line in one write; a fragment left by an interrupted write is cut off first
    (``repair=False`` when other processes append to the same file at the same time: the file's
    owner repairs it once with :func:`repair_lines` before they start)."""
    if repair:
        repair_lines(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_lines(path: Path) -> None:
    """Cut off a line fragment that an interrupted write left at the end of ``path``."""
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)


def _refuse(token: str) -> object:
    raise ValueError(f"{token} is not a JSON number")


def read_lines(path: Path) -> list[dict[str, object]]:
    """The JSON objects of a JSON-lines file (lines torn by an interruption are skipped)."""
    rows: list[dict[str, object]] = []
    if not path.is_file():
        return rows
    for line in path.read_text("utf-8", errors="replace").splitlines():  # bad bytes: line skipped
        try:
            row = json.loads(line, parse_constant=_refuse)
        except (json.JSONDecodeError, RecursionError, ValueError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def completed_rounds(path: Path) -> dict[str, int]:
    """Method → last round recorded in the metrics log."""
    done: dict[str, int] = {}
    for row in read_lines(path):
        try:
            method, rnd = str(row["method"]), int(str(row["round"]))
        except (KeyError, ValueError):
            continue
        done[method] = max(done.get(method, 0), rnd)
    return done


def publish_upload(source: Path, folder: Path) -> None:
    """Make ``folder/<name>`` the same file as ``source`` (a hard link, else a copy), replacing an
    older upload of the same client; a model folder is linked file by file."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    tmp = folder / f".{source.name}.tmp"
    if source.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, copy_function=_link_or_copy)
        old = folder / f".{source.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    tmp.unlink(missing_ok=True)
    _link_or_copy(source, tmp)
    os.replace(tmp, target)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link, else a copy (another file system)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def prune_checkpoints(round_dir: Path) -> None:
    """Remove a finished round's checkpoint folders (its JSON artefacts stay)."""
    for name in ("train", "attack", "models", "clusters"):
        shutil.rmtree(round_dir / name, ignore_errors=True)


def remove_round(round_dir: Path) -> None:
    """Remove a round folder left by an interrupted round, before it is redone."""
    if round_dir.exists():
        try:
            shutil.rmtree(round_dir)
        except OSError as exc:
            raise OutputError(f"cannot remove {round_dir}: {exc.strerror}") from None


def read_text(path: Path) -> str | None:
    """A small text file's content, or None when it is absent."""
    return path.read_text("utf-8") if path.is_file() else None
