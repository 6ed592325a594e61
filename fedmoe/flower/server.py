"""The server side of fedmoe on Flower: a ``ServerApp`` that runs a recipe's methods round by round
through fedmoe's round core, talking to the clients only through Flower messages.

Per method and round, exactly as ``fedmoe run`` (:mod:`fedmoe.run.orchestrator`), with the same
participants, plans and metrics:

1. ``train`` to the round's participants (with the server results each is still to receive). They
   reply with their small parts (shared and gate tensors), routing statistics, sample count and,
   for FedMoE-DA, the references (location, byte range, sha256) of the experts they published to
   the exchange. A server-mediated baseline (FedAvg, naive-moe, the oracle) receives whole models,
   as it does by definition.
2. FedMoE-DA: the affinity over the proxies the server holds (when due) and the sync plan, written
   to the run folder as ``affinity.json`` and ``plan.json``, through the same functions as the
   ``affinity`` and ``plan-sync`` commands.
3. The method's merge spec (:func:`fedmoe.round.plan_round`). The server computes the group
   results (:class:`fedmoe.round.deliver.Outbox`) and sends each participant a ``train.merge``
   with its results and, for FedMoE-DA, its rows of A and its sources' expert references; the
   client fetches those experts from the peers and merges them itself.
4. On evaluation rounds, ``evaluate`` to every client (with its pending results); the server
   combines their counts into the metrics line.

The server never receives, sends, reads or writes an expert tensor under FedMoE-DA: it knows
experts only by their references. The run folder gets ``recipe.yaml``, ``partition.json``,
``metrics.jsonl`` and ``rounds/<method>/round-XXX/{affinity,plan}.json``, so ``fedmoe report`` works
on it; the models live with the clients. Each metrics line also records the bytes that actually
moved: ``moved_server_bytes`` (tensors in Flower messages, both ways) and ``moved_p2p_bytes``
(expert bytes the clients fetched from the exchange).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedmoe.affinity import Upload
from fedmoe.aggregate import Aggregator, StaleProxies
from fedmoe.aggregate.base import CrossExpert, RoundInputs
from fedmoe.aggregate.fedmoe_da import FedMoEDA
from fedmoe.errors import FedMoeError, InputError, OutputError, UsageError
from fedmoe.flower.wire import body_bytes, error_body, nbytes, pack, unpack, unpack_error
from fedmoe.io.atomic import write_atomic
from fedmoe.io.checkpoint import all_finite
from fedmoe.io.exchange import refs_from_json, refs_to_json
from fedmoe.io.partition_file import LoadedPartition, load_partition
from fedmoe.io.plan_file import LoadedPlan
from fedmoe.io.run_folder import RunFolder, append_line, remove_round
from fedmoe.model import MoEConfig, schema_for
from fedmoe.model.schema import ModelSchema
from fedmoe.pipeline.affinity import affinity_of_uploads
from fedmoe.round import plan_round
from fedmoe.round.deliver import Outbox, row_sources, target_rows, uploaded_names
from fedmoe.run.orchestrator import (
    EVAL_KEYS,
    participants,
    round_row,
    true_groups,
    write_round_plan,
    write_setup,
)
from fedmoe.run.recipe import Recipe, load_recipe
from fedmoe.train import ClientEval, summarise


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What the server runs (the run config's keys ``recipe``, ``out``, ``overrides``,
    ``force``)."""

    recipe: str = ""  # the recipe YAML
    out: str = ""  # the run folder
    overrides: tuple[str, ...] = ()  # recipe overrides ``section.key=value``
    force: bool = False  # replace a run already in ``out``
    wait_s: float = 300.0  # how long to wait for every client's node to connect
    outcome: str = ""  # a file the ServerApp writes how the run ended to (for a launcher)


def settings_of(context: Context, defaults: ServerSettings) -> ServerSettings:
    """The run config's settings over ``defaults``; ``overrides`` is one text, ``;``-separated."""
    cfg = context.run_config
    recipe = cfg.get("recipe")
    out = cfg.get("out")
    overrides = cfg.get("overrides")
    force = cfg.get("force")
    outcome = cfg.get("outcome")
    return ServerSettings(
        recipe if isinstance(recipe, str) and recipe else defaults.recipe,
        out if isinstance(out, str) and out else defaults.out,
        tuple(o.strip() for o in overrides.split(";") if o.strip())
        if isinstance(overrides, str)
        else defaults.overrides,
        force if isinstance(force, bool) else defaults.force,
        defaults.wait_s,
        outcome if isinstance(outcome, str) and outcome else defaults.outcome,
    )


@dataclasses.dataclass
class Outcome:
    """What a server run ended with (for a caller in the same process, e.g. ``fedmoe flower``)."""

    error: BaseException | None = None
    folder: Path | None = None


class _Link:
    """Messages to clients by client id, with the bytes of tensors moved both ways."""

    def __init__(self, grid: Grid, nodes: dict[int, int]) -> None:
        self.grid = grid
        self.nodes = nodes
        self.sent = 0
        self.received = 0

    def ask(
        self,
        kind: str,
        round_: int,
        bodies: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]],
    ) -> dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """Send each client its (body, tensors); their replies by client id. The bytes moved
        count the tensors and the JSON bodies both ways, less the bookkeeping that is no part
        of the method (data assignment, settings, evaluation: see :func:`body_bytes`)."""
        if not bodies:
            return {}
        by_node = {self.nodes[c]: c for c in bodies}
        messages = []
        for c, (body, tensors) in bodies.items():
            content = pack(body, tensors)
            self.sent += nbytes(tensors) + body_bytes(body)
            messages.append(Message(content, self.nodes[c], kind, group_id=str(round_)))
        replies: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
        for reply in exchange(self.grid, messages):
            sender = by_node.get(reply.metadata.src_node_id)
            if sender is None:
                continue
            if reply.has_error():
                lines = [x for x in str(reply.error.reason).splitlines() if x.strip()]
                last = lines[-1].strip(" '>") if lines else "no reason given"
                raise RuntimeError(f"client {sender} failed on '{kind}': {last}")
            body, tensors = unpack(reply.content, f"reply of client {sender} to '{kind}'")
            self.received += nbytes(tensors) + body_bytes(body)
            replies[sender] = (body, tensors)
        missing = sorted(set(bodies) - set(replies))
        if missing:
            raise InputError(
                f"client {missing[0]} did not answer '{kind}' in round {round_}",
                hint="check that its supernode is running and can reach the superlink",
            )
        return replies


def exchange(grid: Grid, messages: list[Message], timeout: float | None = None) -> list[Message]:
    """Push ``messages`` and pull a reply from each destination node, polling often (Flower's own
    ``send_and_receive`` sleeps 3 s between pulls, which adds up over a round's three
    exchanges). Stops at ``timeout`` seconds when given."""
    ids = set(grid.push_messages(messages))
    waiting = {m.metadata.dst_node_id for m in messages}
    deadline = None if timeout is None else time.monotonic() + timeout
    out: list[Message] = []
    delay = 0.02
    while waiting and (deadline is None or time.monotonic() < deadline):
        for reply in grid.pull_messages(sorted(ids)):
            ids.discard(reply.metadata.reply_to_message_id)
            if reply.metadata.src_node_id in waiting:
                waiting.discard(reply.metadata.src_node_id)
                out.append(reply)
        if waiting:
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
    return out


def _connect(grid: Grid, num_clients: int, wait_s: float) -> dict[int, int]:
    """Client id → node id, from each node's ``partition-id``; waits for every client's node."""
    deadline = time.monotonic() + wait_s
    nodes: list[int] = []
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= num_clients or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    messages = [Message(pack({}), n, "query", group_id="hello") for n in nodes]
    found: dict[int, int] = {}
    for reply in exchange(grid, messages, timeout=wait_s):
        if reply.has_error():
            continue
        body, _ = unpack(reply.content, f"node {reply.metadata.src_node_id}")
        c = body["client"]
        if c in found:
            raise UsageError(
                f"two nodes say they are client {c} (partition-id {c})",
                hint="give each supernode its own partition-id",
            )
        found[int(c)] = reply.metadata.src_node_id
    missing = [c for c in range(num_clients) if c not in found]
    if missing:
        raise UsageError(
            f"the recipe has {num_clients} clients but no node is client {missing[0]} "
            f"({len(found)} of {num_clients} connected within {wait_s:.0f} s)",
            hint=f"start one supernode per client, with partition-id 0..{num_clients - 1}",
        )
    extra = sorted(c for c in found if c >= num_clients)
    if extra:
        raise UsageError(
            f"a node says it is client {extra[0]}, but the recipe has {num_clients} clients",
            hint=f"give the supernodes partition-id 0..{num_clients - 1}",
        )
    return found


def check_recipe(recipe: Recipe) -> None:
    """Refuse what a Flower run cannot do (before any process starts)."""
    if recipe.language_model is not None:
        raise UsageError(
            "recipe: model.family makes the clients language models; the Flower app trains the "
            "classifier only",
            hint="run language-model recipes with fedmoe run",
        )
    if recipe.seeds:
        raise UsageError(
            "recipe: seeds runs several federations; a Flower run is one",
            hint="run one Flower run per seed (overrides seed=S)",
        )
    if recipe.attack.kinds:
        raise UsageError(
            "recipe: attack simulates malicious clients inside fedmoe run only",
            hint="run attack recipes with fedmoe run",
        )
    for arm in recipe.arms:
        method = recipe.method(arm)
        if method.uses_clusters:
            raise UsageError(
                f"recipe: method {arm} keeps k cluster models that every participant evaluates; "
                "the Flower app does not send them yet",
                hint=f"run {arm} with fedmoe run, or leave it out of the Flower recipe",
            )
        wire = getattr(method, "wire", None)
        if wire is not None and wire.itemsize is not None:
            raise UsageError(
                f"recipe: method {arm} sends experts as {wire.value}; the Flower app's exchange "
                "sends them as stored",
                hint=f"run {arm} with fedmoe run, or leave wire at native on Flower",
            )
        reducer = getattr(method, "reducer", None)
        if reducer is not None and reducer().needs_start:
            raise UsageError(
                f"recipe: method {arm} reduces with {reducer().kind.value}, which needs every "
                "client's start model on the server",
                hint="use mean, median, trimmed-mean, clipped-mean or multi-krum on Flower",
            )


@dataclasses.dataclass
class _Round:
    """What one round's training sent the server."""

    uploads: dict[int, Upload]
    states: dict[int, dict[str, torch.Tensor]]
    refs: dict[int, str]  # client → its expert references (JSON), FedMoE-DA
    digests: dict[int, str]  # client → sha256 of its trained model


class FlowerRun:
    """One Flower run of a recipe: every arm of it, in order."""

    def __init__(self, grid: Grid, settings: ServerSettings) -> None:
        if not settings.recipe or not settings.out:
            raise UsageError(
                "the Flower run has no recipe or run folder",
                hint="set the run config's recipe and out (flwr run --run-config "
                "\"recipe='R.yaml' out='runs/x'\")",
            )
        overrides = {}
        for o in settings.overrides:
            key, sep, value = o.partition("=")
            if not sep:
                raise UsageError(f"override {o!r} is not section.key=value")
            overrides[key.strip()] = value.strip()
        self.recipe, _ = load_recipe(Path(settings.recipe), overrides)
        check_recipe(self.recipe)
        self.grid = grid
        self.settings = settings
        self.folder = RunFolder(Path(settings.out))
        self.run = uuid.uuid4().hex[:16]  # names this run's model folders on the clients
        self.committed = 0  # the last round of the current arm that every participant merged

    def setup(self) -> None:
        """The run folder's recipe and partition (the initial model is built by each client)."""
        folder = self.folder
        if folder.started() and not self.settings.force:
            raise OutputError(
                f"{folder.root} already holds a run",
                hint="pass force (fedmoe flower --force) or choose another run folder",
            )

        def clear() -> None:
            if folder.started():
                remove_round(folder.root / "rounds")
                for name in ("metrics.jsonl", "report.json", "init.safetensors"):
                    (folder.root / name).unlink(missing_ok=True)

        write_setup(self.recipe, folder, self.recipe.to_dict(), clear, with_init=False)
        self.partition: LoadedPartition = load_partition(folder.partition)
        part = self.partition
        self.config: MoEConfig = self.recipe.model_config(part.input_shape, part.num_classes)
        self.schema: ModelSchema = schema_for(self.config)
        self.groups = true_groups(part)

    def __call__(self) -> Path:
        self.setup()
        n = self.partition.num_clients
        self.link = _Link(self.grid, _connect(self.grid, n, self.settings.wait_s))
        for arm in self.recipe.arms:
            self.run_arm(arm)
        return self.folder.root

    def _base(self, arm: str, rnd: int, c: int) -> dict[str, Any]:
        part = self.partition
        spec = part.dataset_spec
        split = part.clients[c]
        return {
            "run": self.run,
            "arm": arm,
            "round": rnd,
            "client": c,
            "seed": self.recipe.seed,
            "model": self.config.to_dict(),
            "data": {
                "source": spec.source,
                "label_column": spec.label_column,
                "domain_column": spec.domain_column,
                "options": dict(spec.options),
                "fingerprint": part.fingerprint,
            },
            "split": {"train": split.train.tolist(), "test": split.test.tolist()},
            "committed": self.committed,
        }

    def _train(
        self, arm: str, method: Aggregator, rnd: int, active: list[int], outbox: Outbox
    ) -> _Round:
        p2p = isinstance(method, FedMoEDA)
        names = uploaded_names(method.moves, self.schema)
        bodies = {}
        for c in active:
            body = self._base(arm, rnd, c)
            train = method.local_training(self.recipe.train)
            body.update(train=train.to_dict(), publish=p2p, upload=names)
            bodies[c] = (body, outbox.take(c))
        replies = self.link.ask("train", rnd, bodies)
        out = _Round({}, {}, {}, {})
        for c, (body, tensors) in sorted(replies.items()):
            if sorted(tensors) != names:
                raise InputError(f"client {c} sent other tensors than its small parts")
            for name, t in tensors.items():
                entry = self.schema.entry(name)
                if tuple(t.shape) != entry.shape or not t.is_floating_point():
                    raise InputError(
                        f"client {c} sent tensor {name} of shape {tuple(t.shape)} ({t.dtype}); "
                        f"the model's is {entry.shape}",
                        hint="every client of a federation must share one architecture",
                    )
                if not all_finite(t):
                    raise InputError(f"client {c} sent tensor {name} with NaN or Inf values")
            routing = body.get("routing")
            if routing is not None and not isinstance(routing, dict):
                raise InputError(f"client {c} sent routing statistics that are not an object")
            proxies: tuple[torch.Tensor, ...] = ()
            if p2p:
                proxies = tuple(
                    tensors[self.schema.proxy(k)] for k in range(self.schema.num_layers)
                )
            n = body.get("num_samples")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InputError(f"client {c} sent a sample count that is not a count: {n!r}")
            out.uploads[c] = Upload(c, n, rnd, proxies, routing)
            out.states[c] = tensors
            out.digests[c] = str(body.get("sha256", ""))
            if p2p:
                out.refs[c] = str(body.get("experts", "{}"))
        return out

    def _sync(
        self,
        method: FedMoEDA,
        arm: str,
        rnd: int,
        active: list[int],
        fresh: _Round,
        held: dict[int, tuple[Upload, str, str]],
        previous: LoadedPlan | None,
    ) -> LoadedPlan:
        """FedMoE-DA's affinity (when due) and sync plan, written as the commands write them."""
        rdir = self.folder.round(arm, rnd)
        prev_path = self.folder.round(arm, rnd - 1) / "plan.json"
        affinity = None
        if method.refresh_due(rnd, previous.plan.matrix_round if previous else None):
            now: dict[int, tuple[Upload, str, str]] = {}
            if method.stale is StaleProxies.KEEP:
                now = {c: h for c, h in held.items() if c not in fresh.uploads}
            for c, up in fresh.uploads.items():
                now[c] = (up, f"flower:{arm}/round-{rnd:03d}/client-{c:03d}", fresh.digests[c])
            now = dict(sorted(now.items()))
            part = self.partition
            _, affinity = affinity_of_uploads(
                {c: h[0] for c, h in now.items()},
                {c: (h[1], h[2]) for c, h in now.items()},
                self.config,
                self.schema.sizes(),
                method.candidates,
                list(part.domain_names),
                list(part.class_names),
                method.pool_layers,
                centred=method.centred,
            )
        return write_round_plan(method, rnd, active, affinity, rdir, previous, prev_path)

    def run_arm(self, arm: str) -> None:
        """Every round of one arm, a metrics line after each."""
        recipe = self.recipe
        method = recipe.method(arm)
        n = self.partition.num_clients
        outbox = Outbox()
        self.committed = 0  # the last round of this arm that every participant merged
        held: dict[int, tuple[Upload, str, str]] = {}  # FedMoE-DA: each client's latest upload
        previous: LoadedPlan | None = None
        for rnd in range(1, recipe.rounds + 1):
            start = time.perf_counter()
            sent0, received0 = self.link.sent, self.link.received
            remove_round(self.folder.round(arm, rnd))
            active = participants(recipe, rnd, n)
            fresh = self._train(arm, method, rnd, active, outbox)
            train_s = time.perf_counter() - start
            merge_method: Aggregator = method
            plan = None
            if isinstance(method, FedMoEDA):
                plan = self._sync(method, arm, rnd, active, fresh, held, previous)
                previous = plan
                merge_method = plan.plan.method
            inputs = RoundInputs(
                rnd,
                self.schema,
                tuple(range(n)),
                {c: dataclasses.replace(up, proxies=()) for c, up in fresh.uploads.items()},
                self.groups,
            )
            rplan = plan_round(inputs, merge_method, plan.plan if plan else None)
            outbox.post(rplan.spec, self.schema, fresh.states)
            due = rnd % recipe.eval_every == 0 or rnd == recipe.rounds
            fetched, evals = self._merge(arm, rnd, active, rplan.spec, fresh, outbox, due)
            self.committed = rnd  # every participant merged: the round is applied
            if isinstance(method, FedMoEDA) and method.stale is StaleProxies.KEEP:
                for c, up in fresh.uploads.items():
                    label = f"flower:{arm}/round-{rnd:03d}/client-{c:03d}"
                    held[c] = (up, label, fresh.digests[c])
            row = round_row(arm, rnd, len(active), rplan, self.groups)
            if due:
                row.update(self._evaluate(arm, rnd, outbox, evals))
            row["moved_server_bytes"] = self.link.sent - sent0 + self.link.received - received0
            row["moved_p2p_bytes"] = fetched
            # what the server holds for this arm at the round's peak: the results not yet
            # delivered, the proxies kept of every client, this round's small parts
            row["server_state_bytes"] = (
                outbox.held_bytes
                + sum(int(p.nbytes) for h in held.values() for p in h[0].proxies)
                + sum(nbytes(t) for t in fresh.states.values())
            )
            row["seconds"] = round(time.perf_counter() - start, 4)
            row["train_seconds"] = round(train_s, 4)
            append_line(self.folder.metrics, json.dumps(row, separators=(",", ":")))

    def _merge(
        self,
        arm: str,
        rnd: int,
        active: list[int],
        spec: Any,
        fresh: _Round,
        outbox: Outbox,
        evaluate: bool,
    ) -> tuple[int, list[ClientEval]]:
        """Each participant's ``train.merge`` (with its evaluation on evaluation rounds, saving
        a message); returns the expert bytes fetched peer to peer and the evaluations."""
        cross = {layer: m for layer, m in enumerate(spec.experts) if isinstance(m, CrossExpert)}
        bodies = {}
        for c in active:
            body = self._base(arm, rnd, c)
            body["method"] = spec.method
            if cross:
                layers = {str(layer): target_rows(m.matrix, c) for layer, m in cross.items()}
                wanted: dict[int, set[tuple[int, int]]] = {}
                for layer, m in cross.items():
                    for src, j in row_sources(m.matrix, c):
                        wanted.setdefault(src, set()).add((layer, j))
                sources = {}
                for src, keys in sorted(wanted.items()):
                    refs = refs_from_json(fresh.refs[src], f"expert references of client {src}")
                    missing = sorted(keys - set(refs))
                    if missing:
                        raise InputError(
                            f"client {src} published no reference for its expert "
                            f"{missing[0][1]} of MoE layer {missing[0][0]}"
                        )
                    sources[str(src)] = refs_to_json({k: refs[k] for k in sorted(keys)})
                body.update(
                    layers=layers,
                    sources=sources,
                    defence=next(iter(cross.values())).defence.to_dict(),
                )
            if evaluate:
                body["global_test"] = self.partition.global_test.tolist()
            bodies[c] = (body, outbox.take(c))
        replies = self.link.ask("train.merge", rnd, bodies)
        evals = [ClientEval.from_dict(b["eval"]) for b, _ in replies.values() if evaluate]
        return sum(int(b.get("fetched_bytes", 0)) for b, _ in replies.values()), evals

    def _evaluate(
        self, arm: str, rnd: int, outbox: Outbox, done: list[ClientEval]
    ) -> dict[str, Any]:
        """Every client's evaluation (``done``: the participants', made with their merge),
        combined as ``fedmoe run`` combines them."""
        part = self.partition
        glob = part.global_test.tolist()
        have = {e.client for e in done}
        bodies = {}
        for c in range(part.num_clients):
            if c in have:
                continue
            body = self._base(arm, rnd, c)
            body["global_test"] = glob
            bodies[c] = (body, outbox.take(c))
        replies = self.link.ask("evaluate", rnd, bodies)
        evals = done + [ClientEval.from_dict(b["eval"]) for b, _ in replies.values()]
        ev = summarise(evals, part.num_domains)
        return {key: ev[key] for key in EVAL_KEYS}


def _report(settings: ServerSettings, data: dict[str, Any]) -> None:
    """How the run ended, for a launcher in another process (the Deployment Engine's ServerApp
    runs in a process of the SuperLink's)."""
    if settings.outcome:
        write_atomic(Path(settings.outcome), json.dumps(data).encode(), force=True)


def read_outcome(path: Path) -> Path:
    """The run folder a ServerApp reported in ``path``; its error raised again (same class, same
    exit code) when it failed."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise RuntimeError("the Flower run ended without the ServerApp reporting how") from None
    if "folder" in data:
        return Path(data["folder"])
    if "crash" in data:
        raise RuntimeError(f"the ServerApp failed: {data['crash']}")
    unpack_error(data)
    raise RuntimeError("the ServerApp reported an unreadable outcome")


def make_server_app(
    defaults: ServerSettings | None = None, outcome: Outcome | None = None
) -> ServerApp:
    """The ServerApp; ``defaults`` stand in for run config keys that are not set, and
    ``outcome`` (when given) receives the run's folder or error instead of it being raised."""
    base = defaults or ServerSettings()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = settings_of(context, base)
        try:
            folder = FlowerRun(grid, settings)()
            if outcome is not None:
                outcome.folder = folder
            _report(settings, {"folder": str(folder)})
        except BaseException as exc:
            if isinstance(exc, FedMoeError):
                _report(settings, error_body(exc))
            else:
                _report(settings, {"crash": f"{type(exc).__name__}: {exc}"})
            if outcome is None:
                raise
            outcome.error = exc

    return app


app = make_server_app()  # what ``flwr run`` loads (pyproject: [tool.flwr.app.components])

__all__ = [
    "FlowerRun",
    "Outcome",
    "ServerSettings",
    "app",
    "check_recipe",
    "make_server_app",
    "settings_of",
]
