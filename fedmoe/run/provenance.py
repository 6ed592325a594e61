"""Where a run and its report were made: the command line, the software versions, the platform and
the time.

``fedmoe run`` records its own command line and environment in the run folder's ``run.json`` when it
starts (and appends one entry per ``--resume``), because a later ``fedmoe report`` of the folder
cannot know them; the report copies ``run.json`` and adds the environment it was made in.

``run.json`` (kind ``run-info``)::

    schema_version, kind, fedmoe_version
    command:     {argv, line, cwd}   the command that started the run (``line``: shell-quoted argv)
    started_utc: ISO 8601 time, seconds, ending in Z
    environment: {python, implementation, fedmoe, numpy, torch, platform, machine}
    resumed:     [{command, utc, environment}]   one per --resume, oldest first

Package versions come from the installed distributions' metadata, so torch is never imported
here (``fedmoe report`` does not import it).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from fedmoe import __version__
from fedmoe.io.atomic import write_atomic
from fedmoe.io.manifest import dumps, header
from fedmoe.io.run_folder import RunFolder, read_text

KIND = "run-info"
MAX_RUN_INFO_BYTES = 1 << 20  # a page of provenance: larger is a damaged or foreign file
MAX_DEPTH = 8  # run.json nests five levels of containers; deeper is damaged or foreign
PACKAGES = ("numpy", "torch")  # versions recorded besides Python's and fedmoe's


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second, e.g. ``2026-12-01T18:33:55Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions of Python, fedmoe, numpy and torch, and the platform, of this process."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "fedmoe": __version__,
        **{name: package_version(name) for name in PACKAGES},
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def command_line(argv: Sequence[str]) -> dict[str, Any]:
    """A command line as recorded: its arguments (the program by its file name only), the same
    shell-quoted on one line, and the working folder its relative paths are relative to."""
    args = [Path(argv[0]).name, *argv[1:]] if argv else []
    return {"argv": args, "line": shlex.join(args), "cwd": os.getcwd()}


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``run.json``, or None when it is absent, too large or not a JSON object (a run
    made before fedmoe recorded it, or a damaged file)."""
    path = RunFolder(run_dir).run_info
    if not path.is_file() or path.stat().st_size > MAX_RUN_INFO_BYTES:
        return None
    try:
        loaded = json.loads(read_text(path) or "")
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    ok = (
        isinstance(loaded, dict) and loaded.get("kind") == KIND and not _too_deep(loaded, MAX_DEPTH)
    )
    return loaded if ok else None


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` levels deep (no recursion,
    so a hostile file cannot exhaust the stack)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        if children and depth >= limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def record_run(run_dir: Path, argv: Sequence[str], resumed: bool = False) -> dict[str, Any]:
    """Write ``run_dir/run.json`` atomically: at a run's start the command and environment; at a
    ``--resume`` the same file with one more ``resumed`` entry (an absent or damaged file is
    started afresh, its command unknown). Returns what was written."""
    now, env, cmd = utc_now(), environment(), command_line(argv)
    old = read_run_info(run_dir) if resumed else None
    if resumed and old is not None:
        earlier: list[Any] = old["resumed"] if isinstance(old.get("resumed"), list) else []
        info = {**old, "resumed": [*earlier, {"command": cmd, "utc": now, "environment": env}]}
    elif resumed:
        info = {**header(KIND), "command": None, "started_utc": None, "environment": None,
                "resumed": [{"command": cmd, "utc": now, "environment": env}]}  # fmt: skip
    else:
        info = {**header(KIND), "command": cmd, "started_utc": now, "environment": env,
                "resumed": []}  # fmt: skip
    write_atomic(RunFolder(run_dir).run_info, dumps(info).encode(), force=True)
    return info
