"""Start-up: ``fedmoe --help`` and ``--version`` import neither torch nor any command module; a
command's module is imported only when that command runs or shows its help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from fedmoe_cli.app import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
mods = [m for m in ("torch", "numpy", "fedmoe_cli.run", "fedmoe_cli.partition",
                    "fedmoe_cli.aggregate", "rich.markdown", "rich.traceback", "markdown_it")
        if m in sys.modules
        and type(sys.modules[m]).__name__ not in ("_Deferred", "_DeferredNames")]  # really loaded
sys.stderr.write("\\n" + json.dumps(mods) + "\\n")
"""


def loaded(*argv: str) -> tuple[str, list[str]]:
    """Run the CLI in a fresh interpreter; its stdout and which heavy modules it imported."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True
    )
    return done.stdout, json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [("--version",), ("--help",)])
def test_help_and_version_import_no_command_and_no_torch(argv: tuple[str, ...]) -> None:
    out, mods = loaded(*argv)
    assert mods == []
    if argv == ("--help",):  # every command is listed, with its one-line help
        for name in ("run", "partition", "train-round", "plan-sync", "aggregate", "report"):
            assert name in out
    else:
        assert out.startswith("fedmoe ")


def test_a_command_imports_only_its_own_module() -> None:
    out, mods = loaded("partition", "--help")
    assert "Split a dataset into federated clients" in out
    assert "fedmoe_cli.partition" in mods
    assert "torch" not in mods and "fedmoe_cli.run" not in mods


def test_report_needs_no_torch() -> None:
    out, mods = loaded("report", "--help")
    assert "Rebuild report.json" in out
    assert "torch" not in mods


COMMANDS = ("partition", "init", "train-round", "affinity", "plan-sync", "aggregate", "evaluate",
            "run", "report")  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_help_imports_no_torch(command: str) -> None:
    """A command's ``--help`` reads its options' defaults and help text from the declarations
    (FedMoEDA, TrainConfig, MoEConfig, the method registry), which import no torch; the work
    itself imports what it needs when it runs."""
    out, mods = loaded(command, "--help")
    assert "Usage" in out and "--help" in out
    assert "torch" not in mods and "numpy" not in mods
    # typer's Markdown renderer and rich's tracebacks are left unloaded for a help screen
    assert not {"rich.markdown", "rich.traceback", "markdown_it"} & set(mods)


DEFERRED_USE = """
import sys
from fedmoe_cli.app import defer_heavy_imports
defer_heavy_imports()
assert type(sys.modules["numpy"]).__name__ == "_Deferred"
import numpy as np
from numpy.typing import NDArray
import torch
from torch import nn
assert int(np.arange(4).sum()) == 6 and float(torch.ones(3).sum()) == 3.0
assert isinstance(nn.Linear(2, 2), torch.nn.Module) and NDArray is not None
assert np.float32 is sys.modules["numpy"].float32 and sys.modules["numpy"].__name__ == "numpy"
print("ok")
"""


def test_deferred_heavy_modules_still_work_when_used() -> None:
    """A help path binds stand-ins for numpy and torch; anything that does use them gets the
    real modules (attribute reads, submodules, ``from`` imports), and ``sys.modules`` then holds
    the real ones."""
    done = subprocess.run(
        [sys.executable, "-c", DEFERRED_USE], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


DEFERRED_NAMES = """
import sys
from fedmoe_cli.app import defer_help_unused
defer_help_unused()
from rich.markdown import Markdown
from rich.traceback import Traceback
assert type(sys.modules["rich.markdown"]).__name__ == "_DeferredNames"
md = Markdown("# title")  # a real use loads the real module
assert type(md).__module__ == "rich.markdown" and type(md).__name__ == "Markdown"
assert type(sys.modules["rich.markdown"]).__name__ == "module"
try:
    raise ValueError("x")
except ValueError as exc:
    tb = Traceback.from_exception(type(exc), exc, exc.__traceback__)  # a class attribute too
assert type(tb).__name__ == "Traceback"
print("ok")
"""


def test_names_deferred_for_help_still_work_when_used() -> None:
    """A help screen binds stand-ins for the modules typer imports but fedmoe's help never uses;
    a name imported from one still works when called, and loads the real module."""
    done = subprocess.run(
        [sys.executable, "-c", DEFERRED_NAMES], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
