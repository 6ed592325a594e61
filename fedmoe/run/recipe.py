"""Recipes: a whole federation in one YAML file, validated into frozen objects.

Unknown keys are errors that name the key and the nearest valid one; ``-c section.key=value``
overrides any key (the value is read as YAML, so ``-c rounds=5`` is an integer).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedmoe.aggregate import AGGREGATORS
from fedmoe.errors import InputError, UsageError
from fedmoe.partition import PARTITIONERS
from fedmoe.train import TrainConfig

METHODS = tuple(AGGREGATORS)


@dataclass(frozen=True)
class DataSection:
    """Where the data comes from."""

    dataset: str = "digits-rot"  # built-in name, or a .npz/.csv path (relative to the recipe)
    label_column: str = "label"  # CSV: label column
    domain_column: str | None = None  # CSV: domain column


@dataclass(frozen=True)
class PartitionSection:
    """How the data is split into clients (``fedmoe partition`` options)."""

    scheme: str = "domain"  # a partition scheme name
    clients: int = 20  # N
    global_test: float = 0.2  # share held out as the global test set
    local_test: float = 0.2  # share of each client kept as its local test split
    options: dict[str, Any] = field(default_factory=dict)  # scheme options (alpha, min_size, ...)


@dataclass(frozen=True)
class ModelSection:
    """The MoE architecture (input shape and classes come from the data)."""

    embed: str = "mlp"
    embed_hidden: int = 64
    embed_dim: int = 32
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 64
    gate_bias: bool = False


@dataclass(frozen=True)
class FedMoESection:
    """FedMoE-DA parameters (arXiv 2411.02115, Eq. 9–10 and Sec. III)."""

    top_p: int = 4  # P: similar client-experts kept besides itself
    tau: float = 0.1  # softmax temperature over the kept set
    refresh_interval: int = 1  # I: recompute A every I rounds
    gate: str = "per-client"  # "per-client" (measured better) or "shared"
    candidates: int = 16  # neighbours kept by the affinity pass (≥ P + 1)


@dataclass(frozen=True)
class Recipe:
    """A whole federation: data, split, model, training, FedMoE-DA, and the methods compared."""

    seed: int = 0  # the one seed of the run
    rounds: int = 15  # federated rounds
    participation: float = 1.0  # share of clients sampled each round
    methods: tuple[str, ...] = METHODS  # methods run on the same split and initial model
    eval_every: int = 1  # evaluate every k rounds (and always after the last)
    data: DataSection = DataSection()
    partition: PartitionSection = PartitionSection()
    model: ModelSection = ModelSection()
    train: TrainConfig = TrainConfig()  # noqa: RUF009  (frozen, so sharing the default is safe)
    fedmoe: FedMoESection = FedMoESection()

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written to the run folder's ``recipe.yaml``."""
        out = dataclasses.asdict(self)
        out["methods"] = list(self.methods)
        return out


SECTIONS: dict[str, type] = {
    "data": DataSection,
    "partition": PartitionSection,
    "model": ModelSection,
    "train": TrainConfig,
    "fedmoe": FedMoESection,
}


def _nearest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(valid)})"


def _section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise UsageError(f"recipe: '{where}' must be a mapping")
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = value
        elif cls is PartitionSection:
            extra[key] = value  # scheme options, checked against the scheme below
        else:
            raise UsageError(f"recipe: unknown key '{where}.{key}'{_nearest(key, names)}")
    if cls is PartitionSection:
        opts = dict(kwargs.pop("options", {}) or {})
        opts.update(extra)
        kwargs["options"] = opts
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"recipe: bad value in '{where}' ({exc})") from None


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a parsed recipe."""
    if not isinstance(data, dict):
        raise UsageError("recipe: the top level must be a mapping")
    top = [f.name for f in dataclasses.fields(Recipe)]
    for key in data:
        if key not in top:
            raise UsageError(f"recipe: unknown key '{key}'{_nearest(key, top)}")
    kwargs: dict[str, Any] = {
        name: _section(cls, data.get(name), name) for name, cls in SECTIONS.items()
    }
    for key in ("seed", "rounds", "participation", "eval_every"):
        if key in data:
            kwargs[key] = data[key]
    methods = data.get("methods", list(METHODS))
    if isinstance(methods, str):
        methods = [methods]
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"recipe: unknown method '{m}'{_nearest(str(m), list(METHODS))}")
    kwargs["methods"] = tuple(dict.fromkeys(methods))
    recipe = Recipe(**kwargs)
    _check(recipe)
    return recipe


def _check(r: Recipe) -> None:
    checks = [
        (isinstance(r.seed, int) and r.seed >= 0, "seed must be an integer >= 0"),
        (isinstance(r.rounds, int) and r.rounds >= 1, "rounds must be an integer >= 1"),
        (0 < r.participation <= 1, "participation must be in (0, 1]"),
        (isinstance(r.eval_every, int) and r.eval_every >= 1, "eval_every must be >= 1"),
        (r.fedmoe.gate in ("per-client", "shared"), "fedmoe.gate must be per-client or shared"),
        (r.fedmoe.top_p >= 0, "fedmoe.top_p must be >= 0"),
        (r.fedmoe.tau > 0, "fedmoe.tau must be > 0"),
        (r.fedmoe.refresh_interval >= 1, "fedmoe.refresh_interval must be >= 1"),
        (r.fedmoe.candidates >= r.fedmoe.top_p + 1, "fedmoe.candidates must be >= top_p + 1"),
        (
            r.partition.scheme in PARTITIONERS,
            f"partition.scheme must be one of {list(PARTITIONERS)}",
        ),
        (len(r.methods) >= 1, "methods must name at least one method"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"recipe: {message}")


def yaml_problem(exc: BaseException) -> str:
    """A YAML or OS error in one line: what is wrong and where (PyYAML's messages span lines)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "strerror", None)
    mark = getattr(exc, "problem_mark", None)
    text = str(problem or exc).splitlines()[0] if str(problem or exc) else type(exc).__name__
    if mark is not None:
        text += f" at line {mark.line + 1}, column {mark.column + 1}"
    return text


def apply_overrides(data: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied (values read as YAML)."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for dotted, raw in overrides.items():
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise UsageError(f"-c {dotted}: '{part}' is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_recipe(
    path: Path, overrides: dict[str, str] | None = None
) -> tuple[Recipe, dict[str, Any]]:
    """Read, override and validate a recipe; returns it and the effective plain data."""
    try:
        data = yaml.safe_load(Path(path).read_text("utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: no such recipe file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: not a readable YAML recipe ({yaml_problem(exc)})") from None
    data = apply_overrides(data, overrides or {})
    recipe = recipe_from_dict(data)
    ds = recipe.data.dataset
    if Path(ds).suffix in (".npz", ".csv") and not Path(ds).is_absolute():
        resolved = (Path(path).parent / ds).resolve()
        recipe = dataclasses.replace(
            recipe, data=dataclasses.replace(recipe.data, dataset=str(resolved))
        )
    return recipe, data
