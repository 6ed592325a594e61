"""Recipes: a whole federation in one YAML file, validated into frozen objects.

Unknown keys are errors that name the key and the nearest valid one; ``-c section.key=value``
overrides any key (the value is read as YAML, so ``-c rounds=5`` is an integer).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedmoe.aggregate import AGGREGATORS, Aggregator, FedMoEDA, make_method
from fedmoe.attack import AttackConfig, AttackKind
from fedmoe.data import BUILTIN, DataSpec
from fedmoe.data.spec import option_problem
from fedmoe.errors import InputError, ParamError, UsageError
from fedmoe.model.config import MoEConfig
from fedmoe.model.hf import TinyLM
from fedmoe.params import params_dict
from fedmoe.partition import PARTITIONERS, get_partitioner
from fedmoe.partition.pipeline import GLOBAL_TEST, LOCAL_TEST, NUM_CLIENTS
from fedmoe.run.recipe_yaml import load_yaml as load_yaml  # re-exported (the orchestrator)
from fedmoe.train import TrainConfig

METHODS = tuple(AGGREGATORS)


@dataclass(frozen=True)
class DataSection:
    """Where the data comes from."""

    dataset: str = "digits-rot"  # built-in name, or a file or folder (relative to the recipe)
    label_column: str = "label"  # tables (CSV, Parquet, Arrow): label column
    domain_column: str | None = None  # tables: domain column
    standardize: bool = False  # tables and .npz: z-score each feature over all samples
    image_size: int | None = None  # image folders: side in pixels (None: the default, 32)
    grayscale: bool = False  # image folders: one grey channel instead of RGB

    def spec(self) -> DataSpec:
        """The :class:`DataSpec` this section names (options only where given)."""
        options: dict[str, Any] = {}
        if self.standardize is not False:
            options["standardize"] = self.standardize
        if self.image_size is not None:
            options["image_size"] = self.image_size
        if self.grayscale is not False:
            options["grayscale"] = self.grayscale
        return DataSpec(self.dataset, self.label_column, self.domain_column, options)

    def to_dict(self) -> dict[str, Any]:
        """Plain data; the reading options only where given (so recipes written before they
        existed read back the same)."""
        keys = ("dataset", "label_column", "domain_column", *self.spec().options)
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class PartitionSection:
    """How the data is split into clients (``fedmoe partition`` options)."""

    scheme: str = "domain"  # a partition scheme name
    clients: int = NUM_CLIENTS  # N
    global_test: float = GLOBAL_TEST  # share held out as the global test set
    local_test: float = LOCAL_TEST  # share of each client kept as its local test split
    options: dict[str, Any] = field(default_factory=dict)  # scheme options (alpha, min_size, ...)


MODEL_KEYS = tuple(
    f.name for f in dataclasses.fields(MoEConfig) if f.name not in ("input_shape", "num_classes")
)
LM_KEYS = tuple(f.name for f in dataclasses.fields(TinyLM))  # model: with family: a language model


@dataclass(frozen=True)
class Recipe:
    """A whole federation: data, split, model, training, the methods compared and their
    parameters."""

    seed: int = 0  # the one seed of the run
    seeds: tuple[int, ...] = ()  # several seeds: the whole run once per seed (seed-S/ subfolders)
    rounds: int = 15  # federated rounds
    participation: float = 1.0  # share of clients sampled each round
    methods: tuple[str, ...] = METHODS  # methods run on the same split and initial model
    eval_every: int = 1  # evaluate every k rounds (and always after the last)
    data: DataSection = DataSection()
    partition: PartitionSection = PartitionSection()
    model: dict[str, Any] = field(default_factory=dict)  # partial MoEConfig, or TinyLM (family:)
    train: TrainConfig = TrainConfig()  # noqa: RUF009  (frozen, so sharing the default is safe)
    fedmoe: FedMoEDA = FedMoEDA()  # noqa: RUF009  FedMoE-DA's parameters
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # other methods'
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → {method, params}
    attack: AttackConfig = AttackConfig()  # noqa: RUF009  simulated malicious clients

    @property
    def language_model(self) -> TinyLM | None:
        """The Hugging Face MoE language model the clients train when ``model:`` names a
        ``family`` (None: the built-in classifier)."""
        return TinyLM(**self.model) if "family" in self.model else None

    def model_config(self, input_shape: tuple[int, ...], num_classes: int) -> MoEConfig:
        """The model of this recipe for data of ``input_shape`` and ``num_classes``."""
        try:
            return MoEConfig.from_dict(
                {**self.model, "input_shape": list(input_shape), "num_classes": num_classes}
            )
        except ParamError as exc:
            raise UsageError(f"recipe: model.{exc.worded(exc.key)}") from None

    @property
    def unused_variants(self) -> tuple[str, ...]:
        """Variants the recipe defines but does not list in ``methods``: they do not run."""
        return tuple(v for v in self.variants if v not in self.methods)

    def method(self, name: str) -> Aggregator:
        """The configured method of run arm ``name`` (a method, a variant, either with
        ``@attack``)."""
        base = name.split("@", 1)[0]
        if base in self.variants:
            spec = dict(self.variants[base])
            kind = str(spec.pop("method"))
            if kind == FedMoEDA.name:
                merged = {**params_dict(self.fedmoe), **spec}
                return make_method(kind, merged)
            return make_method(kind, {**self.method_params.get(kind, {}), **spec})
        if base == FedMoEDA.name:
            return self.fedmoe
        return make_method(base, self.method_params.get(base, {}))

    @property
    def arms(self) -> tuple[str, ...]:
        """What the run runs: every method (and variant), clean and under each attack kind
        (``name@kind``)."""
        out: list[str] = []
        for m in self.methods:
            if not self.attack.kinds or self.attack.clean:
                out.append(m)
            out.extend(f"{m}@{k.value}" for k in self.attack.kinds)
        return tuple(out)

    def attack_of(self, arm: str) -> AttackKind | None:
        """The attack run arm ``arm`` is under (None: clean)."""
        return AttackKind(arm.split("@", 1)[1]) if "@" in arm else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written to the run folder's ``recipe.yaml``."""
        return {
            "seed": self.seed,
            "rounds": self.rounds,
            "participation": self.participation,
            "methods": list(self.methods),
            "eval_every": self.eval_every,
            "data": self.data.to_dict(),
            "partition": dataclasses.asdict(self.partition),
            "model": dict(self.model),
            "train": self.train.to_dict(),
            "fedmoe": params_dict(self.fedmoe),
            "method_params": {k: dict(v) for k, v in self.method_params.items()},
            **({"seeds": list(self.seeds)} if self.seeds else {}),
            **(
                {"variants": {k: dict(v) for k, v in self.variants.items()}}
                if self.variants
                else {}
            ),
            **({"attack": self.attack.to_dict()} if self.attack.kinds else {}),
        }


SECTIONS: dict[str, type] = {
    "data": DataSection,
    "partition": PartitionSection,
    "train": TrainConfig,
    "fedmoe": FedMoEDA,
    "attack": AttackConfig,
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
    except ParamError as exc:
        raise UsageError(f"recipe: {where}.{exc.worded(exc.key)}", hint=exc.hint) from None
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
    kwargs["model"] = _model_section(data.get("model"))
    kwargs["method_params"] = _method_params(data.get("method_params"))
    kwargs["variants"] = _variants(data.get("variants"), kwargs["fedmoe"], kwargs["method_params"])
    for key in ("seed", "rounds", "participation", "eval_every"):
        if key in data:
            kwargs[key] = data[key]
    if data.get("seeds") is not None:
        kwargs["seeds"] = _seeds(data["seeds"])
    methods = data.get("methods", list(METHODS))
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise UsageError(f"recipe: methods must be a list of method names, got {methods!r}")
    known = [*METHODS, *kwargs["variants"]]
    for m in methods:
        if m not in known:
            raise UsageError(f"recipe: unknown method '{m}'{_nearest(str(m), known)}")
    kwargs["methods"] = tuple(dict.fromkeys(methods))
    recipe = Recipe(**kwargs)
    _check_types(recipe)
    _check(recipe)
    _check_partition(recipe.partition)
    return recipe


def _model_section(data: Any) -> dict[str, Any]:
    """The recipe's ``model:``: a partial MoEConfig; keys and values are checked here (against a
    placeholder input), the shape-specific checks when the data is known."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError("recipe: 'model' must be a mapping")
    language = "family" in data
    keys = LM_KEYS if language else MODEL_KEYS
    for key in data:
        if key not in keys:
            near = _nearest(str(key), list(keys))
            kind = "a language model's" if language else "the classifier's"
            raise UsageError(
                f"recipe: unknown key 'model.{key}'{near}",
                hint=f"{kind} keys are {', '.join(keys)}",
            )
    try:
        if language:
            TinyLM(**data)
        else:
            MoEConfig.from_dict({**data, "input_shape": [1, 8, 8], "num_classes": 2})
    except ParamError as exc:
        raise UsageError(f"recipe: model.{exc.worded(exc.key)}", hint=exc.hint) from None
    return dict(data)


def _method_params(data: Any) -> dict[str, dict[str, Any]]:
    """``method_params: {method: {parameter: value}}`` for the methods other than fedmoe-da
    (whose parameters live in ``fedmoe:``)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError("recipe: 'method_params' must be a mapping of method → parameters")
    out: dict[str, dict[str, Any]] = {}
    for name, params in data.items():
        valid = [m for m in METHODS if m != FedMoEDA.name]
        if name not in valid:
            raise UsageError(
                f"recipe: unknown method 'method_params.{name}'{_nearest(str(name), valid)}",
                hint="fedmoe-da's parameters go in the 'fedmoe:' section",
            )
        if not isinstance(params, dict):
            raise UsageError(f"recipe: 'method_params.{name}' must be a mapping")
        try:
            make_method(str(name), params)
        except ParamError as exc:
            raise UsageError(f"recipe: method_params.{name}.{exc.worded(exc.key)}") from None
        out[str(name)] = dict(params)
    return out


MAX_SEEDS = 100


def _seeds(value: Any) -> tuple[int, ...]:
    """``seeds: [0, 1, 2]``: distinct integers >= 0 (at most MAX_SEEDS)."""
    ok = (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_SEEDS
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        and len(set(value)) == len(value)
    )
    if not ok:
        raise UsageError(
            f"recipe: seeds must be a list of 1 to {MAX_SEEDS} distinct integers >= 0, "
            f"got {value!r}"
        )
    return tuple(value)


VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")


def _variants(
    data: Any, fedmoe: FedMoEDA, method_params: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``variants: {name: {method: m, parameter: value, ...}}``: a method run again under another
    name with other parameters (over the ``fedmoe:`` section or ``method_params``)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError("recipe: 'variants' must be a mapping of name → {method, parameters}")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in data.items():
        where = f"variants.{name}"
        if not isinstance(name, str) or not VARIANT_NAME.match(name) or name in METHODS:
            raise UsageError(
                f"recipe: variant name {name!r} must be lower-case letters, digits, '.', '_' or "
                "'-', and not a method's name"
            )
        if not isinstance(spec, dict):
            raise UsageError(f"recipe: '{where}' must be a mapping with a 'method' key")
        base = spec.get("method")
        if base not in METHODS:
            raise UsageError(
                f"recipe: '{where}.method' must be one of {', '.join(METHODS)}, got {base!r}"
            )
        params = {k: v for k, v in spec.items() if k != "method"}
        merged = (
            {**params_dict(fedmoe), **params}
            if base == FedMoEDA.name
            else {**method_params.get(str(base), {}), **params}
        )
        try:
            make_method(str(base), merged)
        except ParamError as exc:
            raise UsageError(f"recipe: {where}.{exc.worded(exc.key)}") from None
        except UsageError as exc:
            raise UsageError(f"recipe: {where}: {exc.message}") from None
        out[name] = dict(spec)
    return out


def _check_partition(p: PartitionSection) -> None:
    """The split's options, checked now (not when the data is loaded), worded as recipe keys."""
    try:
        if isinstance(p.clients, bool) or not isinstance(p.clients, int) or p.clients < 1:
            raise ParamError("clients", p.clients, "must be an integer >= 1")
        for key in ("global_test", "local_test"):
            value = getattr(p, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParamError(key, value, "must be a number in [0, 1)")
            if not 0.0 <= value < 1.0:
                raise ParamError(key, value, "must be in [0, 1)")
        if p.scheme in PARTITIONERS:
            get_partitioner(p.scheme, dict(p.options))
    except ParamError as exc:
        raise UsageError(f"recipe: partition.{exc.worded(exc.key)}", hint=exc.hint) from None


def _check_types(r: Recipe) -> None:
    """The top-level scalars and the data section, by type (before any comparison)."""

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = [
        (integer(r.seed), f"seed must be an integer >= 0, got {r.seed!r}"),
        (integer(r.rounds), f"rounds must be an integer >= 1, got {r.rounds!r}"),
        (
            number(r.participation),
            f"participation must be a number in (0, 1], got {r.participation!r}",
        ),
        (integer(r.eval_every), f"eval_every must be an integer >= 1, got {r.eval_every!r}"),
        (
            isinstance(r.data.dataset, str),
            f"data.dataset must be a name or a path, got {r.data.dataset!r}",
        ),
        (
            isinstance(r.data.label_column, str),
            f"data.label_column must be a column name, got {r.data.label_column!r}",
        ),
        (
            r.data.domain_column is None or isinstance(r.data.domain_column, str),
            f"data.domain_column must be a column name or null, got {r.data.domain_column!r}",
        ),
        (
            isinstance(r.partition.scheme, str),
            f"partition.scheme must be a scheme name, got {r.partition.scheme!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"recipe: {message}")
    problem = option_problem(r.data.spec().options)
    if problem is not None:
        raise UsageError(f"recipe: {problem}")


def _check(r: Recipe) -> None:
    checks = [
        (isinstance(r.seed, int) and r.seed >= 0, "seed must be an integer >= 0"),
        (isinstance(r.rounds, int) and r.rounds >= 1, "rounds must be an integer >= 1"),
        (0 < r.participation <= 1, "participation must be in (0, 1]"),
        (isinstance(r.eval_every, int) and r.eval_every >= 1, "eval_every must be >= 1"),
        (
            r.partition.scheme in PARTITIONERS,
            f"partition.scheme must be one of {list(PARTITIONERS)}",
        ),
        (len(r.methods) >= 1, "methods must name at least one method"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(f"recipe: {message}")
    if r.language_model is not None:
        _check_language(r)


def _check_language(r: Recipe) -> None:
    """What a language-model recipe cannot run: clustered methods (IFCA: clients pick a cluster
    model by the classifier's loss) and simulated attacks (run on the classifier)."""
    for name in r.methods:
        if r.method(name).uses_clusters:
            raise UsageError(
                f"recipe: method '{name}' keeps cluster models chosen by the classifier's loss; "
                "it is not available for language models",
                hint="drop it from methods, or drop model.family to run the classifier",
            )
    if r.attack.kinds:
        raise UsageError(
            "recipe: attack is not available for language models",
            hint="drop the attack section, or drop model.family to run the classifier",
        )


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
            value = load_yaml(raw)
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
        data = load_yaml(Path(path).read_text("utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: no such recipe file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: not a readable YAML recipe ({yaml_problem(exc)})") from None
    data = apply_overrides(data, overrides or {})
    recipe = recipe_from_dict(data)
    ds = recipe.data.dataset
    if ds and ds not in BUILTIN and not Path(ds).is_absolute():  # a file or folder: beside it
        resolved = (Path(path).parent / ds).resolve()
        recipe = dataclasses.replace(
            recipe, data=dataclasses.replace(recipe.data, dataset=str(resolved))
        )
    return recipe, data
