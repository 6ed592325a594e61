"""``fedmoe init``: a model config → an initial checkpoint, seeded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from fedmoe.errors import InputError, UsageError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import CheckpointMeta, save_checkpoint
from fedmoe.io.manifest import sha256_file
from fedmoe.io.partition_file import load_partition
from fedmoe.model import MoEConfig, init_model, state_of
from fedmoe.run.recipe import yaml_problem

from .common import Force, Json, Quiet, Seed, emit, handle_errors, stderr_console

HELP = """Create the initial MoE checkpoint every client starts from.

The input shape and class count come from --partition (or --input-shape/--num-classes); the
architecture from options or the `model:` section of a recipe (--config). Same seed, same bytes.

Examples:

  fedmoe init --partition parts/p.json --experts 8 --top-k 2 --out runs/init.safetensors

  fedmoe init --config recipes/quickstart.yaml --partition parts/p.json --out init.safetensors
"""


def _recipe_model(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: not a readable YAML recipe ({yaml_problem(exc)})") from None
    model = data.get("model", {}) if isinstance(data, dict) else {}
    if not isinstance(model, dict):
        raise UsageError(f"{path}: 'model' must be a mapping")
    return model


def init(
    partition: Annotated[
        str | None, typer.Option(help="Partition manifest: gives input shape and class count.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Recipe YAML whose `model:` is used.")] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="Sample shape, e.g. 1,8,8 (without --partition).")
    ] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes (without --partition).")] = None,
    embed: Annotated[str | None, typer.Option(help="Embedding network: mlp or cnn.")] = None,
    embed_hidden: Annotated[int | None, typer.Option(help="Embedding hidden width.")] = None,
    embed_dim: Annotated[int | None, typer.Option(help="Embedding width H.")] = None,
    experts: Annotated[int | None, typer.Option(help="Number of experts E.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Experts per sample k.")] = None,
    expert_hidden: Annotated[int | None, typer.Option(help="Expert hidden width F.")] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint path.")] = Path(
        "init.safetensors"
    ),
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    console = stderr_console(quiet)
    fields: dict[str, Any] = _recipe_model(config) if config is not None else {}
    given = {
        "embed": embed,
        "embed_hidden": embed_hidden,
        "embed_dim": embed_dim,
        "num_experts": experts,
        "top_k": top_k,
        "expert_hidden": expert_hidden,
    }
    fields.update({k: v for k, v in given.items() if v is not None})
    parent = ""
    if partition is not None:
        loaded = load_partition(partition)
        fields["input_shape"] = list(loaded.dataset.input_shape)
        fields["num_classes"] = loaded.dataset.num_classes
        parent = loaded.sha256
    if input_shape is not None:
        try:
            fields["input_shape"] = [int(s) for s in input_shape.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape {input_shape!r}: expected e.g. 1,8,8") from None
    if num_classes is not None:
        fields["num_classes"] = num_classes
    if "input_shape" not in fields or "num_classes" not in fields:
        raise UsageError(
            "the model needs an input shape and a class count",
            hint="pass --partition MANIFEST, or --input-shape and --num-classes",
        )
    cfg = MoEConfig.from_dict(fields)
    with OutputSet(force) as outputs:
        outputs.reserve(out)
        state = state_of(init_model(cfg, seed))
        meta = CheckpointMeta(cfg, None, 0, 0, seed, "init", parent_sha256=parent)
        save_checkpoint(outputs, out, state, meta)
    params = sum(t.numel() for t in state.values())
    experts_params = sum(t.numel() for k, t in state.items() if k.startswith("experts."))
    console.print(
        f"initial model: {params:,} parameters ({experts_params:,} in {cfg.num_experts} experts), "
        f"top-{cfg.top_k}, embed {cfg.embed} → {cfg.embed_dim}"
    )
    emit(
        out,
        {
            "ok": True,
            "path": str(out),
            "sha256": sha256_file(out),
            "parameters": params,
            "model_config": cfg.to_json(),
        },
        json_,
    )


command = handle_errors(init)
