"""The ``fedmoe`` Typer app: wiring only. Each command lives in its own module."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fedmoe import __version__

from . import affinity as affinity_cmd
from . import aggregate as aggregate_cmd
from . import evaluate as evaluate_cmd
from . import init as init_cmd
from . import partition as partition_cmd
from . import plan_sync as plan_sync_cmd
from . import report as report_cmd
from . import run as run_cmd
from . import train_round as train_round_cmd
from .common import EXIT_CODES_HELP, print_error

app = typer.Typer(
    name="fedmoe",
    help="Federated Mixture-of-Experts with domain-aware, fine-grained expert aggregation "
    f"(FedMoE-DA, arXiv 2411.02115). {EXIT_CODES_HELP}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedmoe {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """fedmoe: federated MoE training with domain-aware expert aggregation."""


COMMANDS = [
    ("run", run_cmd, "Run a whole federation from a YAML recipe; all methods side by side."),
    ("partition", partition_cmd, "Split a dataset into clients with domain and label skew."),
    ("init", init_cmd, "Create the initial MoE checkpoint from a config."),
    ("train-round", train_round_cmd, "Train one local round for one client or all clients."),
    ("affinity", affinity_cmd, "Expert-expert similarity of gate rows and expert-domain affinity."),
    ("plan-sync", plan_sync_cmd, "Sparse aggregation matrix and the peer-to-peer sync plan."),
    ("aggregate", aggregate_cmd, "Merge experts by a sync plan or a baseline; or merge any files."),
    ("evaluate", evaluate_cmd, "Personalised and global accuracy of client checkpoints."),
    ("report", report_cmd, "Comparison table and plots of a run folder."),
]
for _name, _module, _short in COMMANDS:
    app.command(_name, help=_module.HELP, short_help=_short)(_module.command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, print parser errors as one ``Error:`` line."""
    try:
        code = app(args=argv, prog_name="fedmoe", standalone_mode=False)
    except Exception as exc:
        # Parser errors (bad option, missing argument) carry exit_code and format_message; Typer
        # raises them from its bundled Click, which we do not import.
        fmt = getattr(exc, "format_message", None)
        if fmt is None or not hasattr(exc, "exit_code"):
            raise
        ctx = getattr(exc, "ctx", None)
        cmd = ctx.command_path if ctx is not None else "fedmoe"
        message = fmt()
        if message:  # an empty message: the parser already printed the help (no arguments)
            print_error(message, hint=f"run '{cmd} --help' for the options")
        sys.exit(int(exc.exit_code))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
