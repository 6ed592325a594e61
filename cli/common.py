"""The command-line contract, built once: stdout is data, stderr is for people, errors are one line
with a documented exit code, tracebacks only with ``FEDMOE_DEBUG=1``.

Exit codes: 0 success · 1 internal error (a bug) · 2 usage error · 3 invalid input data ·
4 output refused.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from fedmoe.errors import FedMoeError, ParamError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERNAL = 1
EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 2 usage error, 3 invalid input data, 4 output refused, 1 internal error."
)

# Options whose name means the same thing in every command.
Seed = Annotated[
    int, typer.Option("--seed", min=0, help="Seed of every random draw; same seed, same bytes.")
]
Force = Annotated[bool, typer.Option("--force", help="Replace outputs that already exist.")]
Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of the output path.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No tables or progress on stderr.")]
RecipeFile = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
Overrides = Annotated[
    list[str] | None, typer.Option("--config", "-c", help="Override: section.key=value.")
]
ArraysFile = Annotated[
    Path | None,
    typer.Option(
        "--arrays",
        help="Write the large arrays to this binary file (safetensors) that the JSON names by "
        "sha256: for large federations, where they keep the JSON small and reading fast.",
    ),
]
INLINE_HINT_ROWS = 16384  # client-experts (all layers) beyond which a hint suggests --arrays
LayoutFile = Annotated[
    Path | None,
    typer.Option(
        "--layout",
        help="Hugging Face model folders: a YAML/JSON file declaring the architecture's tensors "
        "(built in: mixtral, qwen2_moe, qwen3_moe, olmoe).",
    ),
]
NumSamples = Annotated[
    list[str] | None,
    typer.Option(
        "--num-samples",
        help="Hugging Face model folders without fedmoe metadata: CLIENT=N sample counts, or *=N "
        "for every client. Repeatable.",
    ),
]


def stage_companion(
    console: Console,
    outputs: Any,
    arrays: Path | None,
    manifest: dict[str, Any],
    build: Callable[[], dict[str, Any]],
    base: Path,
    layer_sizes: list[int],
) -> None:
    """With ``--arrays``, stage the companion (``build()``) in ``outputs`` and name it in
    ``manifest`` (its path relative to ``base``); without, a hint on stderr when the inline JSON
    is large (``layer_sizes``: client-experts per layer)."""
    if arrays is not None:
        from fedmoe.io.arrays_file import stage_arrays

        manifest["arrays"] = stage_arrays(outputs, arrays, build(), base)
    elif sum(layer_sizes) > INLINE_HINT_ROWS:
        console.print(
            f"note: {layer_sizes[0]:,} client-experts per layer: --arrays FILE keeps the "
            f"{manifest['kind']} JSON small and fast to read"
        )


def precision_note(cfg: Any, console: Console) -> None:
    """A note on stderr when ``precision: bf16`` is asked for on a CPU without bfloat16 units."""
    from fedmoe.train.config import Precision

    if cfg.precision is Precision.BF16:
        from fedmoe.train.local import bf16_native

        if not bf16_native():
            console.print(
                "note: this CPU has no bfloat16 matrix units (AVX512-BF16 or AMX): precision "
                "bf16 trains slower than fp32 here",
                style="yellow",
                markup=False,
                soft_wrap=True,
            )


def folder_options(layout: Path | None, num_samples: list[str] | None) -> Any:
    """How to read Hugging Face model folders (:class:`fedmoe.io.hf_folder.FolderOptions`)."""
    from fedmoe.io.hf_options import FolderOptions, load_layout, parse_num_samples

    per, default = parse_num_samples(num_samples or [])
    return FolderOptions(load_layout(layout) if layout else None, per, default)


def stderr_console(quiet: bool = False) -> Console:
    """The people-facing console: stderr, silent with ``--quiet``; honours ``NO_COLOR``."""
    return Console(stderr=True, quiet=quiet, highlight=False, soft_wrap=False)


def debug() -> bool:
    """True when ``FEDMOE_DEBUG=1`` asks for tracebacks."""
    return os.environ.get("FEDMOE_DEBUG", "") not in ("", "0")


def print_error(message: str, hint: str | None = None) -> None:
    """One ``Error:`` line and an optional ``Hint:`` line on stderr."""
    sys.stderr.write(f"Error: {message}\n")
    if hint:
        sys.stderr.write(f"Hint: {hint}\n")
    sys.stderr.flush()


def handle_errors(fn: F) -> F:
    """Turn a :class:`FedMoeError` into its exit code and one line; anything else into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedMoeError as exc:
            if debug():
                traceback.print_exc()
            # a core parameter error names its key; here the user spoke in options
            message = exc.as_option() if isinstance(exc, ParamError) else exc.message
            print_error(message, exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            print_error("interrupted; outputs were left as they were")
            raise typer.Exit(130) from None  # (fedmoe run says what it kept: Interrupted)
        except BrokenPipeError:
            raise typer.Exit(EXIT_INTERNAL) from None
        except Exception as exc:  # a bug: say so, keep the traceback behind FEDMOE_DEBUG
            if debug():
                traceback.print_exc()
            print_error(
                f"internal error: {type(exc).__name__}: {exc}",
                hint="this is a bug in fedmoe; re-run with FEDMOE_DEBUG=1 and report the traceback",
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def emit(path: Path | str | None, payload: dict[str, Any], as_json: bool) -> None:
    """Write the command's data on stdout: the output path, or ``payload`` as one JSON object."""
    if as_json:
        sys.stdout.write(json.dumps(payload, separators=(",", ":")) + "\n")
    elif path is not None and str(path) != "-":
        sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


def pct(v: float | None) -> str:
    """A share as a percentage with one decimal, or '-'."""
    return "-" if v is None else f"{100 * v:.1f}"


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``key=value`` strings (from ``-c``) into a dict; a missing ``=`` is a usage error."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"-c {item!r}: expected key=value", hint="for example -c rounds=5")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def parse_params(items: list[str] | None) -> dict[str, object]:
    """``key=value`` method parameters (from ``--param``), values read as YAML scalars."""
    import yaml

    out: dict[str, object] = {}
    pairs: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(
                f"--param {item!r}: expected key=value", hint="for example --param reduce=median"
            )
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    for key, raw in pairs.items():
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out
