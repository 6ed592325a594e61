"""Assertions shared by the CLI test modules."""

from __future__ import annotations

from typing import Any


def error_lines(err: str) -> list[str]:
    """The ``Error:`` lines of a command's stderr."""
    return [line for line in err.splitlines() if line.startswith("Error:")]


def clean_failure(r: Any, code: int) -> str:
    """Exit ``code``, nothing on stdout, one ``Error:`` line (an optional ``Hint:`` and nothing
    else on stderr), no traceback; returns the error line."""
    assert r.code == code, r.err
    assert r.out == ""
    lines = error_lines(r.err)
    assert len(lines) == 1, r.err
    assert all(line.startswith(("Error:", "Hint:")) for line in r.err.splitlines()), r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    return lines[0]
