"""The ``fedmoe`` Typer app: wiring only. Each command lives in its own module, imported only when
that command runs or shows its own help (as the ``hf`` CLI does), so ``fedmoe --help`` and
``fedmoe --version`` never import torch or the library; and a command's ``--help`` binds
stand-ins for numpy and torch, which its module imports at its top but whose help never uses."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from fedmoe import __version__

from .common import EXIT_CODES_HELP, print_error

# name → (module in this package, one-line help for `fedmoe --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("run", "Run a whole federation from a YAML recipe; all methods side by side."),
    "partition": ("partition", "Split a dataset into clients with domain and label skew."),
    "init": ("init", "Create the initial MoE checkpoint from a config."),
    "train-round": ("train_round", "Train one local round for one client, some or all clients."),
    "affinity": ("affinity", "Expert-expert similarity of gate rows and expert-domain affinity."),
    "plan-sync": ("plan_sync", "Sparse aggregation matrices and the peer-to-peer sync plan."),
    "aggregate": ("aggregate", "Merge experts by a sync plan or a baseline; or merge any files."),
    "evaluate": ("evaluate", "Personalised and global accuracy of client checkpoints."),
    "report": ("report", "Comparison table and plots of a run folder."),
    "flower": ("flower", "Run a recipe on Flower (simulation or local deployment), p2p experts."),
}
SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": "rich",
}


def load_command(name: str) -> Any:
    """The real command ``name``: its module imported and wired into a one-command Typer app."""
    module_name, short = COMMANDS[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    single = typer.Typer(**SETTINGS)
    single.command(name, help=module.HELP, short_help=short)(module.command)
    return typer.main.get_command(single)


HEAVY = ("numpy", "torch")  # modules a command's help never needs


class _Deferred(types.ModuleType):
    """Stands in for a heavy module while a command's help is built: ``import numpy`` at the top
    of a module binds this stand-in, and the first attribute anything reads imports the real
    module and is answered from it (``importlib.util.LazyLoader`` cannot do this on Python 3.11,
    whose import statement itself reads ``__spec__`` and so loads the module)."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attr)


def _bind_stand_ins(names: tuple[str, ...], kind: type[types.ModuleType]) -> None:
    """Put a ``kind`` stand-in in ``sys.modules`` for each installed module of ``names`` not yet
    imported."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        stand_in = kind(name)
        stand_in.__spec__ = spec  # a finished import to the import system: it is not re-entered
        sys.modules[name] = stand_in


def defer_heavy_imports() -> None:
    """Put a :class:`_Deferred` stand-in in ``sys.modules`` for each :data:`HEAVY` module not yet
    imported. Used only to show a command's ``--help``, which imports the command's module for
    its options and exits before any of them runs."""
    _bind_stand_ins(HEAVY, _Deferred)


# modules that typer's help renderer imports at its top but never uses for fedmoe's help: the
# Markdown renderer (markup mode "markdown"; fedmoe uses "rich") and rich's traceback (pretty
# exceptions, which fedmoe turns off); together about 110 ms of a help screen's start-up
HELP_UNUSED = ("rich.markdown", "rich.traceback")


class _LaterName(type):
    """A name imported from a :class:`_DeferredNames` module: calling it, or reading any of its
    attributes, imports the real module and forwards to the real object."""

    _module: str
    _attr: str

    def _real(cls) -> Any:
        stand_in = sys.modules.get(cls._module)
        if isinstance(stand_in, _DeferredNames):
            del sys.modules[cls._module]
        return getattr(importlib.import_module(cls._module), cls._attr)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(cls._real(), attr)


class _DeferredNames(types.ModuleType):
    """Stands in for a module whose names are imported (``from rich.markdown import Markdown``)
    but not used while a help screen is built: each name is a :class:`_LaterName`, so the import
    statement succeeds without running the module, and any real use loads it."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _LaterName(attr, (), {"_module": self.__name__, "_attr": attr})


def defer_help_unused() -> None:
    """Bind :class:`_DeferredNames` stand-ins for :data:`HELP_UNUSED` (for a help screen only)."""
    _bind_stand_ins(HELP_UNUSED, _DeferredNames)


def wants_help(args: list[str]) -> bool:
    """Whether the command line asks for help (before a ``--`` that ends the options)."""
    options = args[: args.index("--")] if "--" in args else args
    return "--help" in options


class LazyGroup(TyperGroup):
    """Lists the commands from :data:`COMMANDS` without importing them; a command's module is
    imported when it is resolved to run (or to show its own ``--help``)."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name in COMMANDS:  # a stand-in with the one-line help, for the command list
            return TyperCommand(cmd_name, short_help=COMMANDS[cmd_name][1], help="")
        return None

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] in COMMANDS and args[0] not in self.commands:
            if wants_help(args[1:]):
                defer_heavy_imports()
            self.commands[args[0]] = load_command(args[0])
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="fedmoe",
    cls=LazyGroup,
    help="Federated Mixture-of-Experts with domain-aware, fine-grained expert aggregation "
    f"(FedMoE-DA, arXiv 2411.02115). {EXIT_CODES_HELP}",
    no_args_is_help=True,
    **SETTINGS,
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, print parser errors as one ``Error:`` line."""
    args = sys.argv[1:] if argv is None else argv
    if not args or wants_help(args):
        defer_help_unused()
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
