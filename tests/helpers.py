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


def run_in(folder: Any, *commands: tuple[str, ...]) -> None:
    """Run CLI commands in ``folder`` (for module fixtures), each of which must exit 0; torch's
    thread count is given back afterwards."""
    import pytest
    import torch
    from fedmoe_cli.app import main

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("FEDMOE_DEBUG", raising=False)
        for argv in commands:
            with pytest.raises(SystemExit) as info:
                main(list(argv))
            assert info.value.code == 0, argv
    torch.set_num_threads(threads)


# one round of a 3-client federation with a tiny model: partition → init → train-round into r1/
TINY_ROUND: list[tuple[str, ...]] = [
    ("partition", "--clients", "3", "--scheme", "iid", "--out", "p.json", "-q"),
    ("init", "--partition", "p.json", "--embed-hidden", "8", "--embed-dim", "4",
     "--experts", "2", "--expert-hidden", "8", "--out", "i.safetensors", "-q"),
    ("train-round", "--partition", "p.json", "--model", "i.safetensors", "--epochs", "1",
     "--out", "r1", "-q"),
]  # fmt: skip


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux: reads /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
