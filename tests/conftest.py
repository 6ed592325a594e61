"""Shared fixtures: run the real ``fedmoe`` CLI in-process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner, Result


@dataclass(frozen=True)
class CliResult:
    """What one ``fedmoe`` invocation left behind."""

    code: int  # exit status
    out: str  # everything written to stdout
    err: str  # everything written to stderr


@pytest.fixture
def run_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., CliResult]:
    """Call ``fedmoe_cli.app.main(argv)`` (the console-script entry point) and capture its result.

    ``FEDMOE_DEBUG`` is unset, so errors look exactly as a user sees them.
    """
    from fedmoe_cli.app import main

    monkeypatch.delenv("FEDMOE_DEBUG", raising=False)

    def run(*argv: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before this call
        code: int
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """Invoke ``fedmoe_cli.app.app`` with Typer's ``CliRunner`` (Typer's own error rendering)."""
    from fedmoe_cli.app import app

    monkeypatch.delenv("FEDMOE_DEBUG", raising=False)

    def run(*argv: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(app, list(argv), env=env, catch_exceptions=False)

    return run


@pytest.fixture(autouse=True)
def _train_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients train in the test process unless a test asks for workers (spawning costs ~2 s)."""
    monkeypatch.setenv("FEDMOE_WORKERS", "1")


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """Commands may set torch's thread count for the process; give it back after each test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _keep_sigint() -> Iterator[None]:
    """Ctrl-C is the test process's own: a test (or a library it drives) that changes the SIGINT
    handler, or sets it to ignored, which the subprocesses a later test starts would inherit, gets
    it given back."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)
