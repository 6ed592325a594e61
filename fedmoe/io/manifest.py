"""JSON manifests: every artefact that is not a tensor file.

Each manifest carries ``schema_version``, ``kind`` and ``fedmoe_version``; paths inside it are
relative to the manifest's own folder (or to the working folder when it travels through a pipe), so
a run folder can be moved between machines. :func:`dumps` keeps lists of numbers on one line so that
a partition of a million samples stays a readable file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmoe import __version__
from fedmoe.errors import InputError
from fedmoe.io.atomic import write_atomic
from fedmoe.io.digest import sha256_bytes as sha256_bytes  # re-exported
from fedmoe.io.digest import sha256_file as sha256_file  # re-exported

SCHEMA_VERSION = 1
STDIO = "-"
_string = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str
SHORT = 16  # flat lists up to this long are joined here; longer ones go to json's C encoder
_SCALARS = frozenset({int, float, str, bool, type(None)})


def _scalar(value: Any) -> str:
    """What ``json.dumps`` writes for one int, float, str, bool or None (non-finite refused)."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite number {value} into a manifest")
        return float.__repr__(value)
    if kind is str:
        return _string(value)
    return "null" if value is None else ("true" if value else "false")


def header(kind: str, version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The fields every manifest starts with (``version``: the kind's schema version)."""
    return {"schema_version": version, "kind": kind, "fedmoe_version": __version__}


def dumps(obj: Any, indent: int = 1) -> str:
    """Serialise ``obj`` as JSON: nested objects indented, flat lists of scalars on one line.

    NaN and infinities are refused (they are not JSON). Output is a pure function of ``obj``, so the
    same manifest always gives the same bytes.
    """

    def enc(value: Any, level: int) -> str:
        kind = type(value)
        if kind is str:  # the common leaves first, without json.dumps's per-call set-up
            return _string(value)
        if kind is int or kind is float:
            return _scalar(value)
        if isinstance(value, dict):
            if not value:
                return "{}"
            pad = " " * (indent * (level + 1))
            items = [f"{pad}{_string(str(k))}: {enc(v, level + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + " " * (indent * level) + "}"
        if isinstance(value, (list, tuple)):
            if not value:
                return "[]"
            if len(value) <= SHORT and all(type(v) in _SCALARS for v in value):
                return "[" + ",".join(map(_scalar, value)) + "]"  # a pair, say: no dumps set-up
            if all(not isinstance(v, (dict, list, tuple)) for v in value):
                try:  # one call for the whole line (what joining each scalar's json.dumps gives)
                    return json.dumps(value, separators=(",", ":"), allow_nan=False)
                except ValueError:
                    bad = next(v for v in value if isinstance(v, float) and not math.isfinite(v))
                    raise ValueError(
                        f"cannot write non-finite number {bad} into a manifest"
                    ) from None
            pad = " " * (indent * (level + 1))
            items = [pad + enc(v, level + 1) for v in value]
            return "[\n" + ",\n".join(items) + "\n" + " " * (indent * level) + "]"
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot write non-finite number {value} into a manifest")
        return json.dumps(value)

    return enc(obj, 0) + "\n"


def relative(path: Path, base: Path) -> str:
    """``path`` relative to folder ``base``, with forward slashes (both with symlinks resolved; a
    folder's resolution is cached, since a manifest may list thousands of files of one folder)."""
    text = os.fspath(path)  # string operations: a manifest may name 8,192 files
    name = os.path.basename(text)
    if name in ("", ".", "..") or os.path.islink(text):
        full = os.path.realpath(text)
    else:
        full = os.path.join(_real_dir(os.path.dirname(os.path.abspath(text))), name)
    root = _real_dir(os.path.abspath(os.fspath(base)))
    if full.startswith(root) and full[len(root) : len(root) + 1] == os.sep and root != os.sep:
        rel = full[len(root) + 1 :]  # inside the base folder: the common case, no relpath needed
    else:
        rel = os.path.relpath(full, root)
    return rel if os.sep == "/" else rel.replace(os.sep, "/")


@functools.lru_cache(maxsize=1024)
def _real_dir(folder: str) -> str:
    return os.path.realpath(folder)


def resolve(rel: str, base: Path) -> Path:
    """The file a manifest's relative path ``rel`` names, seen from folder ``base``."""
    return (Path(base) / rel) if not Path(rel).is_absolute() else Path(rel)


def base_dir(target: str | Path) -> Path:
    """The folder that relative paths in the manifest at ``target`` are relative to."""
    return Path.cwd() if str(target) == STDIO else Path(target).resolve().parent


def read_manifest(
    source: str | Path, kind: str | tuple[str, ...], versions: tuple[int, ...] = (SCHEMA_VERSION,)
) -> tuple[dict[str, Any], Path, str]:
    """Read a manifest from a file or ``-`` (stdin) and check its ``kind`` and schema.

    Returns
    -------
    manifest, base, sha256
        The parsed object, the folder its relative paths are relative to, and the sha256 of the
        bytes read (so a manifest that came through a pipe can still be recorded as an input).
    """
    kinds = (kind,) if isinstance(kind, str) else kind
    name = "<stdin>" if str(source) == STDIO else str(source)
    try:
        text = sys.stdin.read() if str(source) == STDIO else Path(source).read_text("utf-8")
    except FileNotFoundError:
        raise InputError(f"{name}: no such file", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name}: cannot read it as a text manifest ({exc})") from None
    if not text.strip():
        raise InputError(f"{name}: empty input; expected a {kinds[0]} manifest")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise InputError(f"{name}: JSON nested too deeply to be a fedmoe manifest") from None
    if not isinstance(obj, dict) or "kind" not in obj or "schema_version" not in obj:
        raise InputError(f"{name}: not a fedmoe manifest (no 'kind' / 'schema_version')")
    if obj["kind"] not in kinds:
        raise InputError(
            f"{name}: is a '{obj['kind']}' manifest, expected {' or '.join(repr(k) for k in kinds)}"
        )
    if obj["schema_version"] not in versions:
        raise InputError(
            f"{name}: schema_version {obj['schema_version']} is not supported "
            f"(this fedmoe reads {', '.join(map(str, versions))})",
            hint="re-create it with this fedmoe version",
        )
    return obj, base_dir(source), sha256_bytes(text.encode("utf-8"))


def _no_constant(token: str) -> Any:
    raise json.JSONDecodeError(f"{token} is not a JSON number", token, 0)


# what reading a field of the wrong type, shape or size raises in Python
STRUCTURE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError)


@contextmanager
def malformed(where: str, what: str, hint: str) -> Iterator[None]:
    """Parse the fields of manifest ``where``: a field of the wrong type, shape or size (the
    structural errors Python raises while reading it) becomes one :class:`InputError` naming the
    file; the specific checks inside raise their own InputErrors, which pass through."""
    try:
        yield
    except InputError:
        raise
    except RecursionError:
        raise InputError(f"{where}: {what} nested too deeply") from None
    except STRUCTURE_ERRORS as exc:
        if isinstance(exc, KeyError):
            detail = f"missing key {exc.args[0]!r}" if exc.args else "a missing key"
        else:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{where}: malformed {what} ({detail})", hint=hint) from None


def write_manifest(obj: dict[str, Any], target: str | Path, force: bool = False) -> str:
    """Write a manifest atomically to ``target`` or to stdout for ``-``; returns the text."""
    text = dumps(obj)
    if str(target) == STDIO:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(Path(target), text.encode("utf-8"), force=force)
    return text


def require(obj: dict[str, Any], key: str, where: str) -> Any:
    """``obj[key]``, or an :class:`InputError` naming the missing key and the file."""
    if key not in obj:
        raise InputError(f"{where}: missing key '{key}'", hint="re-create the file with fedmoe")
    return obj[key]
