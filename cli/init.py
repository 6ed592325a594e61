"""``fedmoe init``: a model config → an initial checkpoint, seeded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedmoe.errors import UsageError
from fedmoe.io.manifest import sha256_file

if TYPE_CHECKING:
    pass

from .common import Force, Json, Quiet, Seed, emit, handle_errors, stderr_console

HELP = """Create the initial MoE checkpoint every client starts from.

The input shape and class count come from --partition (or --input-shape/--num-classes); the
architecture from options or the `model:` section of a recipe (--config). Same seed, same bytes.

Examples:

  fedmoe init --partition parts/p.json --experts 8 --top-k 2 --out runs/init.safetensors

  fedmoe init --config recipes/quickstart.yaml --partition parts/p.json --out init.safetensors
"""


def _recipe_model(path: Path) -> dict[str, Any]:
    """The recipe's ``model:`` section, validated by the recipe loader that ``fedmoe run`` uses
    (so ``init --config R`` and ``run R`` build the same model)."""
    from fedmoe.run.recipe import load_recipe

    recipe, _ = load_recipe(path)
    return dict(recipe.model)


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
    moe_layers: Annotated[int | None, typer.Option(help="MoE layers L (default 1).")] = None,
    hf: Annotated[
        str | None,
        typer.Option(
            help="A Hugging Face byte-level MoE language model of this family (mixtral, "
            "qwen2_moe, qwen3_moe, olmoe) instead of the classifier (or a recipe whose model: "
            "has family:); --out is a folder. Sizes: --embed-dim (width, default 64), "
            "--expert-hidden (128), --experts (4), --top-k (2), --moe-layers (2)."
        ),
    ] = None,
    seed: Seed = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint path.")] = Path(
        "init.safetensors"
    ),
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    from fedmoe.io.atomic import OutputSet
    from fedmoe.io.checkpoint import CheckpointMeta, save_checkpoint
    from fedmoe.io.partition_file import load_partition
    from fedmoe.model import MoEConfig, init_model, schema_for, state_of
    from fedmoe.model.hf import TinyLM
    from fedmoe.params import from_mapping

    console = stderr_console(quiet)
    fields: dict[str, Any] = _recipe_model(config) if config is not None else {}
    if hf is not None or "family" in fields:
        if embed is not None or embed_hidden is not None:
            raise UsageError(
                "--embed and --embed-hidden describe the classifier's embedding network",
                hint="a language model's sizes are --embed-dim, --expert-hidden, --experts, "
                "--top-k and --moe-layers",
            )
        sizes = {"embed_dim": embed_dim, "expert_hidden": expert_hidden, "num_experts": experts,
                 "top_k": top_k, "moe_layers": moe_layers}  # fmt: skip
        lm = {**fields, **({"family": hf} if hf else {})}
        lm.update({k: v for k, v in sizes.items() if v is not None})
        _init_language(from_mapping(TinyLM, lm, "model"), partition, seed, out, force, json_,
                       console)  # fmt: skip
        return
    given = {
        "embed": embed,
        "embed_hidden": embed_hidden,
        "embed_dim": embed_dim,
        "num_experts": experts,
        "top_k": top_k,
        "expert_hidden": expert_hidden,
        "moe_layers": moe_layers,
    }
    fields.update({k: v for k, v in given.items() if v is not None})
    parent = ""
    if partition is not None:
        loaded = load_partition(partition)
        fields["input_shape"] = list(loaded.input_shape)  # from the manifest: no data is read
        fields["num_classes"] = loaded.num_classes
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
    schema = schema_for(cfg)
    params = sum(e.numel for e in schema.entries)
    experts_params = sum(e.numel for e in schema.experts())
    console.print(
        f"initial model: {params:,} parameters ({experts_params:,} in {cfg.num_experts} experts "
        f"× {cfg.moe_layers} MoE layer{'s' if cfg.moe_layers > 1 else ''}), top-{cfg.top_k}, "
        f"embed {cfg.embed} → {cfg.embed_dim}"
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


def _init_language(
    spec: Any, partition: str | None, seed: int, out: Path, force: bool, json_: bool, console: Any
) -> None:
    """A randomly initialised byte-level MoE language model folder (the global start model)."""
    from fedmoe.io.atomic import OutputSet
    from fedmoe.io.hf_folder import CONFIG, HFModel, stage_new_lm
    from fedmoe.io.partition_file import load_partition

    if out.suffix == ".safetensors":
        raise UsageError(f"--out {out}: a Hugging Face model is a folder", hint="e.g. --out init/")
    parent = load_partition(partition).sha256 if partition is not None else ""
    with OutputSet(force) as outputs:
        outputs.reserve(out / CONFIG)
        stage_new_lm(outputs, out, spec, seed, parent)
    model = HFModel(out)
    params = sum(e.numel for e in model.schema.entries)
    in_experts = sum(e.numel for e in model.schema.experts())
    console.print(
        f"initial {spec.family} model: {params:,} parameters ({in_experts:,} in "
        f"{model.schema.num_experts[0]} experts × {model.schema.num_layers} MoE layers)"
    )
    emit(out, {"ok": True, "path": str(out), "sha256": model.sha256, "parameters": params}, json_)


command = handle_errors(init)
