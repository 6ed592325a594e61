"""``fedmoe run``: a whole federation from a recipe, every method on the same split and the same
initial model, through exactly the steps the commands run (:mod:`fedmoe.pipeline`).

The clients' model is the built-in classifier, or a Hugging Face MoE language model when the
recipe's ``model:`` names a ``family`` (trained on byte windows of a text dataset and scored by
per-byte perplexity instead of accuracy: :mod:`fedmoe.run.quality`).

Per method and round: the round's participants train (``train-round``); FedMoE-DA recomputes its
affinity every I rounds over every client whose proxies the server holds (``affinity``) and plans
the round (``plan-sync``); the method's merge gives every client its next model (``aggregate``);
the models are evaluated and a line appended to ``metrics.jsonl``. Each round's folder holds what
the CLI writes for that round, byte for byte, so a round run by hand and inside ``fedmoe run``
give the same files, and ``--resume`` continues from the last complete round with the same
result as an uninterrupted run (every random draw derives from (seed, round, client)).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.aggregate import Aggregator, StaleProxies
from fedmoe.aggregate.fedmoe_da import FedMoEDA
from fedmoe.aggregate.ifca import IFCA
from fedmoe.attack import AttackContext, AttackKind, malicious_clients, poison_upload
from fedmoe.data import Dataset
from fedmoe.errors import InputError
from fedmoe.io.affinity_file import load_affinity
from fedmoe.io.atomic import OutputSet, write_atomic
from fedmoe.io.checkpoint import Checkpoint, CheckpointMeta, open_checkpoint, save_checkpoint
from fedmoe.io.checkpoint_set import client_checkpoints, load_candidates, open_model
from fedmoe.io.datasets import load_dataset
from fedmoe.io.manifest import dumps, header
from fedmoe.io.partition_file import LoadedPartition, load_partition, partition_to_manifest
from fedmoe.io.plan_file import LoadedPlan, load_plan
from fedmoe.io.run_folder import (
    RunFolder,
    append_line,
    prune_checkpoints,
    publish_upload,
    read_text,
    remove_round,
)
from fedmoe.model import MoEConfig, init_model, state_of
from fedmoe.model.hf import HFConfig, ModelConfig, TinyLM
from fedmoe.partition import get_partitioner, make_partition
from fedmoe.pipeline.affinity import affinity_artefact
from fedmoe.pipeline.merge import merge_round
from fedmoe.pipeline.pool import TrainPool
from fedmoe.pipeline.sync import sync_artefact
from fedmoe.pipeline.train import train_clients
from fedmoe.plan import AggregationMatrix
from fedmoe.round import RoundPlan
from fedmoe.run.quality import ACCURACY, PERPLEXITY, Quality
from fedmoe.run.recipe import Recipe
from fedmoe.train import evaluate_models

Progress = Callable[[str, int, int, dict[str, Any]], None]


@dataclass(frozen=True)
class RunContext:
    """Everything shared by the methods of one run."""

    recipe: Recipe
    folder: RunFolder
    partition: LoadedPartition  # the run folder's partition.json (its data loaded lazily)
    config: ModelConfig  # the classifier's, or the language model's config.json

    @property
    def num_clients(self) -> int:
        """N."""
        return self.partition.num_clients

    @property
    def language(self) -> TinyLM | None:
        """The recipe's language model (None: the classifier)."""
        return self.recipe.language_model

    @property
    def quality(self) -> Quality:
        """How the run's models are scored."""
        return ACCURACY if self.language is None else PERPLEXITY

    def open_init(self) -> Checkpoint:
        """The initial model, opened."""
        return open_model(self.folder.init_model(self.language is not None))


def participants(recipe: Recipe, round_: int, num_clients: int) -> list[int]:
    """Clients sampled in ``round_`` (all when participation is 1), from (seed, round) only."""
    if recipe.participation >= 1.0:
        return list(range(num_clients))
    k = max(1, round(recipe.participation * num_clients))
    rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, round_, 7]))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def write_setup(
    recipe: Recipe,
    folder: RunFolder,
    resolved: dict[str, Any],
    before_publish: Callable[[], None] | None = None,
    with_init: bool = True,
) -> None:
    """The run folder's recipe, partition manifest and initial checkpoint (as ``fedmoe
    partition`` and ``fedmoe init --partition`` write them; ``with_init=False`` leaves the
    initial model out, for a server that never holds experts: each client builds it from the
    recipe's model and seed).

    Everything is computed and staged first; ``before_publish`` (e.g. clearing a previous run
    for ``--force``) runs only once that has succeeded, so a run that cannot start (a missing
    dataset, a bad split) leaves the previous run as it was."""
    import yaml

    spec = recipe.data.spec()
    dataset = load_dataset(spec)
    language = recipe.language_model
    if language is not None:
        _check_text(dataset.x, spec.source)
    p = recipe.partition
    partition = make_partition(
        dataset.y,
        dataset.domain,
        p.clients,
        get_partitioner(p.scheme, dict(p.options)),
        recipe.seed,
        p.global_test,
        p.local_test,
        has_domains=dataset.has_domains,
    )
    manifest = dumps(partition_to_manifest(partition, dataset, spec, folder.root)).encode()
    with OutputSet(force=True) as outputs:
        outputs.write_bytes(folder.recipe, yaml.safe_dump(resolved, sort_keys=False).encode())
        outputs.write_bytes(folder.partition, manifest)
        from fedmoe.io.digest import sha256_bytes

        if with_init and language is not None:
            from fedmoe.io.hf_folder import stage_new_lm

            stage_new_lm(outputs, folder.init_folder, language, recipe.seed, sha256_bytes(manifest))
        elif with_init:
            config = recipe.model_config(dataset.input_shape, dataset.num_classes)
            meta = CheckpointMeta(
                config, None, 0, 0, recipe.seed, "init", parent_sha256=sha256_bytes(manifest)
            )
            state = state_of(init_model(config, recipe.seed))
            save_checkpoint(outputs, folder.init, state, meta)
        if before_publish is not None:
            before_publish()


def _check_text(x: np.ndarray, dataset: str) -> None:
    """A language model's dataset must be text (byte windows)."""
    from fedmoe.data.text import tokens_of

    try:
        tokens_of(x)
    except InputError:
        raise InputError(
            f"{dataset}: the recipe's model is a language model (model.family) but this dataset "
            "is not text",
            hint="use a text dataset (text-mix, a .jsonl file, a folder of text files) or drop "
            "model.family",
        ) from None


def prepare(recipe: Recipe, out: Path, dataset: Dataset | None = None) -> RunContext:
    """The context of a run whose folder holds its setup (see :func:`write_setup`); ``dataset``:
    the partition's data when the caller has it loaded already."""
    folder = RunFolder(out)
    part = load_partition(folder.partition)
    if dataset is not None:
        part.adopt(dataset)
    language = recipe.language_model
    init_path = folder.init_model(language is not None)
    init = open_model(init_path)
    if language is None:
        config: ModelConfig = recipe.model_config(part.input_shape, part.num_classes)
        same = init.config == config
    else:  # transformers completes config.json with its defaults: compare the architecture
        config = init.config
        schema = init.schema
        same = (
            isinstance(config, HFConfig)
            and config.model_type == language.family
            and schema.num_layers == language.moe_layers
            and set(schema.num_experts) == {language.num_experts}
        )
    if not same:
        raise InputError(
            f"{init_path}: its model config differs from the recipe's",
            hint="start the run again with --force",
        )
    return RunContext(recipe, folder, part, config)


def true_groups(part: LoadedPartition) -> dict[int, int]:
    """Each client's dominant true domain (the oracle's groups, and a diagnostic)."""
    return {c: part.dominant_domain(c) for c in range(part.num_clients)}


def _models(ctx: RunContext, method: str, round_: int) -> dict[int, Checkpoint]:
    """Every client's model after ``round_`` (the initial model before round 1)."""
    if round_ == 0:
        init = ctx.open_init()
        return {c: init for c in range(ctx.num_clients)}
    return client_checkpoints(
        [str(ctx.folder.round(method, round_) / "models" / "aggregate.json")], "run"
    )


def _sync(
    ctx: RunContext,
    method: FedMoEDA,
    name: str,
    rnd: int,
    active: list[int],
    fresh: dict[int, Checkpoint],
) -> LoadedPlan:
    """FedMoE-DA's affinity (when due) and sync plan of round ``rnd``, written as the commands
    write them."""
    rdir = ctx.folder.round(name, rnd)
    prev_path = ctx.folder.round(name, rnd - 1) / "plan.json"
    previous = load_plan(prev_path) if rnd > 1 else None
    affinity = None
    if method.refresh_due(rnd, previous.plan.matrix_round if previous else None):
        stale: dict[int, Checkpoint] = {}
        uploads = ctx.folder.uploads(name)
        if method.stale is StaleProxies.KEEP and uploads.is_dir():
            stale = client_checkpoints([str(uploads)], "affinity")
        part = ctx.partition
        _, affinity = affinity_artefact(
            fresh,
            stale,
            method.candidates,
            rdir,
            list(part.domain_names),
            list(part.class_names),
            method.pool_layers,
            centred=method.centred,
        )
    return write_round_plan(method, rnd, active, affinity, rdir, previous, prev_path)


def write_round_plan(
    method: FedMoEDA,
    rnd: int,
    active: list[int],
    affinity: dict[str, Any] | None,
    rdir: Path,
    previous: LoadedPlan | None,
    prev_path: Path,
) -> LoadedPlan:
    """Write a round's affinity artefact (when the matrices are recomputed: ``affinity`` is its
    manifest) and sync plan into ``rdir``, as the commands write them, and read the plan back."""
    aff_path = rdir / "affinity.json"
    loaded = None
    if affinity is not None:
        write_atomic(aff_path, dumps(affinity).encode(), force=True)
        loaded = load_affinity(aff_path)
    _, manifest = sync_artefact(
        method, rnd, active, loaded, str(aff_path), previous, str(prev_path), rdir
    )
    plan_path = rdir / "plan.json"
    write_atomic(plan_path, dumps(manifest).encode(), force=True)
    return load_plan(plan_path)


def run_method(
    ctx: RunContext,
    name: str,
    resume_from: int,
    pool: TrainPool | None,
    progress: Progress | None = None,
    shared_log: bool = False,
    last: int | None = None,
) -> None:
    """The rounds of one method after ``resume_from`` (up to ``last``, else all), appending to
    ``metrics.jsonl`` after each (``shared_log``: other processes append to it at the same
    time, see :func:`fedmoe.run.arms.run_arms`)."""
    recipe = ctx.recipe
    method: Aggregator = recipe.method(name)
    attack = recipe.attack_of(name)
    # with an attack in the recipe, every arm (the clean ones too) is evaluated on the same benign
    # clients, so that an arm's drop against its clean arm compares the same population
    bad = (
        malicious_clients(recipe.seed, ctx.num_clients, recipe.attack.fraction)
        if recipe.attack.kinds
        else ()
    )
    groups = true_groups(ctx.partition)
    n = ctx.num_clients
    models = _models(ctx, name, resume_from)  # every client's current model, opened once a round
    clusters = _clusters(ctx, name, method, resume_from) if isinstance(method, IFCA) else None
    for rnd in range(resume_from + 1, (recipe.rounds if last is None else last) + 1):
        start = time.perf_counter()
        rdir = ctx.folder.round(name, rnd)
        remove_round(rdir)  # what an interrupted attempt at this round left
        active = participants(recipe, rnd, n)
        train_dir = rdir / "train"
        _train(ctx, method, rnd, {c: models[c] for c in active}, train_dir, pool, clusters)
        train_s = time.perf_counter() - start
        fresh = client_checkpoints([str(train_dir / "train-round.json")], "run")
        if attack is not None and rnd >= recipe.attack.start_round:
            fresh = _attack(ctx, attack, bad, rnd, models, fresh, rdir / "attack")
        plan = None
        if isinstance(method, FedMoEDA):
            plan = _sync(ctx, method, name, rnd, active, fresh)
        carried = dict(models)  # the non-participants' models, and the participants' starts
        rplan, _ = merge_round(
            fresh,
            carried,
            plan.plan.method if plan else method,  # as `aggregate --plan`: the plan's parameters
            plan,
            str(rdir / "plan.json") if plan else None,
            groups,
            rdir / "models",
            force=True,
        )
        models = _models(ctx, name, rnd)
        if clusters is not None:
            clusters = _next_clusters(ctx, rnd, clusters, fresh, models, rdir / "clusters")
        if isinstance(method, FedMoEDA) and method.stale is StaleProxies.KEEP:
            for k in fresh.values():
                publish_upload(k.path, ctx.folder.uploads(name))
        row = round_row(name, rnd, len(active), rplan, groups, attack, bad)
        if rnd % recipe.eval_every == 0 or rnd == recipe.rounds:
            # the malicious clients' own accuracy is not counted
            ev = _evaluate(ctx, {c: k for c, k in models.items() if c not in bad})
            row.update({key: ev[key] for key in ctx.quality.eval_keys})
        row["seconds"] = round(time.perf_counter() - start, 4)
        row["train_seconds"] = round(train_s, 4)
        append_line(ctx.folder.metrics, json.dumps(row, separators=(",", ":")), not shared_log)
        prune_checkpoints(ctx.folder.round(name, rnd - 1))
        if progress is not None:
            progress(name, rnd, recipe.rounds, row)


def _train(
    ctx: RunContext,
    method: Aggregator,
    rnd: int,
    starts: dict[int, Checkpoint],
    train_dir: Path,
    pool: TrainPool | None,
    clusters: list[Checkpoint] | None,
) -> None:
    """The round's participants train from ``starts``, written into ``train_dir`` as
    ``train-round`` writes them: the classifier's clients in the pool, a language model's in this
    process."""
    recipe = ctx.recipe
    cfg = method.local_training(recipe.train)
    part, ref, manifest = ctx.partition, str(ctx.folder.partition), train_dir / "train-round.json"
    if ctx.language is not None:
        from fedmoe.pipeline.train_lm import train_lm_clients

        paths = {c: train_dir / f"client-{c:03d}" for c in starts}
        train_lm_clients(part, ref, starts, cfg, recipe.seed, rnd, paths, manifest,
                         ctx.language.trains, force=True)  # fmt: skip
        return
    assert pool is not None  # the classifier's clients train in the pool
    paths = {c: train_dir / f"client-{c:03d}.safetensors" for c in starts}
    train_clients(part, ref, starts, cfg, recipe.seed, rnd, paths, manifest, pool, force=True,
                  candidates=clusters)  # fmt: skip


def _evaluate(ctx: RunContext, models: dict[int, Checkpoint]) -> dict[str, Any]:
    """The clients' models scored on their local test splits and the global test set (accuracy,
    or a language model's per-byte perplexity)."""
    part = ctx.partition
    if ctx.language is None:
        states = {c: k.state() for c, k in models.items()}
        assert isinstance(ctx.config, MoEConfig)
        return evaluate_models(ctx.config, states, part.dataset, part.clients, part.global_test)
    from fedmoe.pipeline.train_lm import evaluate_lm_clients

    return evaluate_lm_clients(models, part)


def _clusters(ctx: RunContext, name: str, method: IFCA, done: int) -> list[Checkpoint]:
    """IFCA's k cluster models after round ``done``: read back from that round's ``clusters/``, or
    before round 1 made and written to ``round-000/clusters/``: cluster 0 is the run's initial
    model, cluster c > 0 is initialised from a seed derived from (seed, c) (the paper's random
    initialisation; all clusters equal would make every client choose cluster 0)."""
    folder = ctx.folder.round(name, done) / "clusters"
    if done > 0:
        found = load_candidates([str(folder / "clusters.json")], minimum=1)
        if len(found) != method.clusters:
            raise InputError(
                f"{folder}: holds {len(found)} cluster models, the recipe's ifca {method.clusters}",
                hint="start the run again with --force",
            )
        return found
    init = open_checkpoint(ctx.folder.init)
    seed = ctx.recipe.seed
    assert isinstance(ctx.config, MoEConfig)  # IFCA runs the classifier only (the recipe's check)
    states = [init.state()] + [
        state_of(
            init_model(
                ctx.config, int(np.random.SeedSequence([seed, k, 0x1FCA]).generate_state(1)[0])
            )
        )
        for k in range(1, method.clusters)
    ]
    return _write_clusters(ctx, 0, states, [init.sha256] * len(states), [0] * len(states), folder)


def _next_clusters(
    ctx: RunContext,
    rnd: int,
    clusters: list[Checkpoint],
    fresh: dict[int, Checkpoint],
    models: dict[int, Checkpoint],
    folder: Path,
) -> list[Checkpoint]:
    """IFCA's cluster models after round ``rnd``: a cluster some participant chose is the merged
    model of its members; a cluster nobody chose keeps its model."""
    states, parents, counts = [], [], []
    for k, old in enumerate(clusters):
        chose = [c for c in sorted(fresh) if fresh[c].meta.cluster == k]
        src = models[chose[0]] if chose else old
        states.append(src.state())
        parents.append(src.sha256)
        counts.append(sum(fresh[c].meta.num_samples for c in chose))
    return _write_clusters(ctx, rnd, states, parents, counts, folder)


def _write_clusters(
    ctx: RunContext,
    rnd: int,
    states: list[dict[str, Any]],
    parents: list[str],
    counts: list[int],
    folder: Path,
) -> list[Checkpoint]:
    """Write the cluster models as global checkpoints ``cluster-K.safetensors`` with a
    ``clusters.json`` manifest, and open them."""
    paths = [folder / f"cluster-{k}.safetensors" for k in range(len(states))]
    rows = []
    with OutputSet(force=True) as outputs:
        for k, (state, path) in enumerate(zip(states, paths, strict=True)):
            meta = CheckpointMeta(
                ctx.config, None, rnd, counts[k], ctx.recipe.seed, "ifca",
                parent_sha256=parents[k], cluster=k,
            )  # fmt: skip
            save_checkpoint(outputs, path, state, meta)
            rows.append({"cluster": k, "path": path.name, "sha256": outputs.staged_sha256(path),
                         "num_samples": counts[k]})  # fmt: skip
        manifest = {**header("clusters"), "round": rnd, "checkpoints": rows}
        outputs.write_bytes(folder / "clusters.json", dumps(manifest).encode())
    return [open_checkpoint(p) for p in paths]


def _attack(
    ctx: RunContext,
    kind: AttackKind,
    bad: tuple[int, ...],
    rnd: int,
    starts: dict[int, Checkpoint],
    fresh: dict[int, Checkpoint],
    out: Path,
) -> dict[int, Checkpoint]:
    """Replace the malicious participants' trained checkpoints by what they send instead
    (written to ``out/client-XXX.safetensors`` with ``attack.json``; the honest training output
    is kept beside). Returns the round's checkpoints as the server and the peers see them."""
    present = [c for c in sorted(fresh) if c in bad]
    if not present:
        return fresh
    # the colluders' view of the benign models: only the attacks that use it read them
    colluding = kind in (AttackKind.ALIE, AttackKind.MIMICRY)
    benign = tuple(fresh[c].state() for c in sorted(fresh) if c not in bad) if colluding else ()
    first = fresh[present[0]]
    schema = first.schema
    paths = {c: out / f"client-{c:03d}.safetensors" for c in present}
    rows = []
    cfg = ctx.recipe.attack
    with OutputSet(force=True) as outputs:
        for rank, c in enumerate(present):
            trained = fresh[c]
            context = AttackContext(
                schema,
                starts[c].state(),
                trained.state(),
                benign,
                cfg.scale,
                rank,
                len(present),
                len(fresh),
                int(
                    np.random.SeedSequence([ctx.recipe.seed, rnd, c, 0xA77AC]).generate_state(1)[0]
                ),
            )
            state = poison_upload(kind, context, cfg.poison, cfg.parts)
            meta = CheckpointMeta(
                trained.config,
                c,
                rnd,
                trained.meta.num_samples,
                trained.meta.seed,
                f"attack:{kind.value}",
                parent_sha256=starts[c].sha256,  # it claims an update from its start model
                routing=trained.meta.routing,
            )
            save_checkpoint(outputs, paths[c], state, meta)
            rows.append(
                {
                    "client": c,
                    "path": paths[c].name,
                    "sha256": outputs.staged_sha256(paths[c]),
                    "honest_sha256": trained.sha256,
                }
            )
        manifest = {**header("attack"), "round": rnd, "attack": cfg.to_dict(), "kind": kind.value,
                    "checkpoints": rows}  # fmt: skip
        outputs.write_bytes(out / "attack.json", dumps(manifest).encode())
    return {c: open_checkpoint(paths[c]) if c in paths else k for c, k in fresh.items()}


EVAL_KEYS = ACCURACY.eval_keys  # what an evaluation of the classifier adds to a metrics line


def round_row(
    name: str,
    rnd: int,
    num_active: int,
    rplan: RoundPlan,
    groups: dict[int, int],
    attack: AttackKind | None = None,
    bad: tuple[int, ...] = (),
) -> dict[str, Any]:
    """A round's metrics line before evaluation: participants, traffic and, for FedMoE-DA, how
    the applied rows draw on other clients (shared by every engine that runs rounds)."""
    ledger = rplan.ledger
    row: dict[str, Any] = {
        "method": name,
        "round": rnd,
        "participants": num_active,
        "server_bytes": ledger.server_total,
        "p2p_bytes": ledger.p2p,
        "fedavg_bytes": ledger.fedavg_equivalent,
    }
    if rplan.sync is not None:
        applied = rplan.sync.applied() if rplan.sync.merges_experts else ()
        row["matrix_round"] = rplan.sync.matrix_round
        row["sources_other_client"] = _remote_share(applied)
        row["remote_same_domain"] = _same_domain_share(applied, groups)
        if attack is not None:
            row["sources_malicious"] = _malicious_share(applied, set(bad))
    if attack is not None:
        row["attack"] = attack.value
    if bad:
        row["malicious"] = list(bad)  # left out of the accuracies (attacked or not)
    return row


def _malicious_share(applied: tuple[AggregationMatrix, ...], bad: set[int]) -> float | None:
    """Weight share of the benign targets' remote entries in the applied matrices whose source
    client is malicious (the damage an attack on the expert selection does; the malicious
    targets' own rows, which draw on each other, are left out)."""
    num = den = 0.0
    for m in applied:
        e = m.index.num_experts
        clients = np.asarray(m.index.clients)
        tgt, src = clients[m.targets // e], clients[m.sources // e]
        remote = (tgt != src) & ~np.isin(tgt, list(bad))
        w = m.weights[remote]
        num += float((w * np.isin(src[remote], list(bad))).sum())
        den += float(w.sum())
    return round(num / den, 6) if den > 0 else None


def _remote_share(applied: tuple[AggregationMatrix, ...]) -> float | None:
    """Share of the applied matrices' entries whose source is another client."""
    flags = [
        (m.targets // m.index.num_experts) != (m.sources // m.index.num_experts) for m in applied
    ]
    if not flags or not sum(f.size for f in flags):
        return 0.0 if not applied else None
    remote = np.concatenate(flags)
    return round(float(remote.mean()), 6)


def _same_domain_share(
    applied: tuple[AggregationMatrix, ...], groups: dict[int, int]
) -> float | None:
    """Weight share of remote sources whose client has the target client's dominant true domain
    (a diagnostic of domain awareness; the method itself never sees domains)."""
    num = den = 0.0
    for m in applied:
        e = m.index.num_experts
        clients = np.asarray(m.index.clients)
        tgt = clients[m.targets // e]
        src = clients[m.sources // e]
        remote = tgt != src
        same = np.array(
            [
                groups[int(a)] == groups[int(b)]
                for a, b in zip(tgt[remote], src[remote], strict=True)
            ],
            dtype=bool,
        )
        w = m.weights[remote]
        num += float((w * same).sum())
        den += float(w.sum())
    return round(num / den, 6) if den > 0 else None


def check_resume(out: Path, recipe_data: dict[str, Any]) -> None:
    """Refuse to resume a run folder made from a different recipe."""
    import yaml

    from fedmoe.run.recipe import load_yaml

    text = read_text(RunFolder(out).recipe)
    if text is None:
        raise InputError(f"{out}: no recipe.yaml; nothing to resume", hint="run without --resume")
    try:
        stored = load_yaml(text)
    except yaml.YAMLError:
        raise InputError(
            f"{RunFolder(out).recipe}: damaged; cannot tell which recipe this run was made from",
            hint="start the run again with --force",
        ) from None
    if stored != recipe_data:
        raise InputError(
            f"{out}: was started from a different recipe; resuming would mix two runs",
            hint="resume with the same recipe and -c overrides, or use a new --out",
        )
