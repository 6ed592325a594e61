"""The client side of fedmoe on Flower: a ``ClientApp`` that trains with fedmoe's local training,
publishes its experts to the exchange, merges the experts its plan rows name from the peers, and
evaluates its own model.

A client keeps its model on its own disk, in its client folder, one file per run, method and
client (``<client-dir>/<run>/<method>/client-CCC.safetensors``, the model it starts its next round
from; ``….trained.safetensors``, this round's training output until the merge; and
``….merged.safetensors``, the merge's output until the server commits the round, which every
message says). Nothing of it lives in the Flower context, so a SuperNode that restarts between
rounds picks up where it was, and a round refused by any client (a tampered expert) is applied by
none.

Messages (the server's side is :mod:`fedmoe.flower.server`):

- ``query``: which client id (``partition-id`` of the node config) this node is.
- ``train``: apply the pending server results, train one round, publish the experts (FedMoE-DA),
  and send the small parts (or the whole model, for server-mediated baselines), the routing
  statistics, the sample count and the experts' references.
- ``train.merge``: apply this round's server results and merge the rows of A with the fetched
  peer experts (Eq. 11); the bytes fetched are reported.
- ``evaluate``: apply the pending server results and evaluate the model on the local test split
  and the global test set.

The exchange location and the client folder come from the node config (``exchange``,
``client-dir``), else from the run config, else from the settings the app was made with.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe.aggregate.base import CrossExpert, MergeSpec
from fedmoe.aggregate.defence import ExpertDefence
from fedmoe.aggregate.engine import MemorySource, Merger
from fedmoe.aggregate.reduce import Reduce, ReduceKind
from fedmoe.data import Dataset, DataSpec
from fedmoe.errors import FedMoeError, InputError, UsageError
from fedmoe.flower.wire import error_body, nbytes, pack, unpack
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import CheckpointMeta, open_checkpoint, save_checkpoint
from fedmoe.io.datasets import load_dataset
from fedmoe.io.exchange import (
    ExpertFetcher,
    ExpertRef,
    exchange_key,
    publish_experts,
    refs_from_json,
    refs_to_json,
)
from fedmoe.model import MoEConfig, init_model, schema_for, state_of
from fedmoe.model.schema import ModelSchema
from fedmoe.params import from_mapping
from fedmoe.partition import ClientSplit
from fedmoe.round.deliver import matrix_from_rows
from fedmoe.train import TrainConfig, evaluate_client, train_client


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """Where a client keeps its models and finds the exchange (the node config's keys)."""

    exchange: str = ""  # the exchange location (a folder or an fsspec URL)
    client_dir: str = ""  # this client's folder for its models


def settings_of(context: Context, defaults: ClientSettings) -> ClientSettings:
    """The node config's settings, else the run config's, else ``defaults``."""

    def pick(key: str, default: str) -> str:
        for source in (context.node_config, context.run_config):
            value = source.get(key)
            if isinstance(value, str) and value:
                return value
        return default

    return ClientSettings(
        pick("exchange", defaults.exchange), pick("client-dir", defaults.client_dir)
    )


_DATA: dict[tuple[str, str, str | None, str], Dataset] = {}  # loaded by this process, kept


def _dataset(body: Mapping[str, Any]) -> Dataset:
    data = body["data"]
    options = dict(data.get("options") or {})  # how the data is read (DataSpec.options)
    spec = DataSpec(
        str(data["source"]), str(data["label_column"]), data.get("domain_column"), options
    )
    key = (spec.source, spec.label_column, spec.domain_column, json.dumps(options, sort_keys=True))
    if key not in _DATA:
        _DATA.clear()  # one dataset at a time
        _DATA[key] = load_dataset(spec)
    dataset = _DATA[key]
    if dataset.fingerprint() != data["fingerprint"]:
        raise InputError(
            f"dataset {spec.source} on this node differs from the server's partition "
            "(fingerprint mismatch)",
            hint="give every node the same data files as the server's partition",
        )
    return dataset


class _Client:
    """One message's view of one client's models on disk."""

    def __init__(self, settings: ClientSettings, body: Mapping[str, Any]) -> None:
        if not settings.client_dir:
            raise UsageError(
                "this node has no client folder",
                hint="give the node config client-dir=FOLDER (or the run config's client-dir)",
            )
        self.settings = settings
        self.id = int(body["client"])
        self.arm = str(body["arm"])
        self.round = int(body["round"])
        self.seed = int(body["seed"])
        self.config = MoEConfig.from_dict(dict(body["model"]))
        self.schema: ModelSchema = schema_for(self.config)
        folder = Path(settings.client_dir) / str(body["run"]) / self.arm
        self.current = folder / f"client-{self.id:03d}.safetensors"
        self.trained = folder / f"client-{self.id:03d}.trained.safetensors"
        self.staged = folder / f"client-{self.id:03d}.merged.safetensors"
        self._settle(int(body.get("committed", 0)))

    def _settle(self, committed: int) -> None:
        """Make a merged model current once the server says its round is committed (every
        participant merged); drop one whose round was not (a refused round is not applied)."""
        if not self.staged.is_file():
            return
        if open_checkpoint(self.staged).meta.round <= committed:
            self.staged.replace(self.current)
        else:
            self.staged.unlink()

    def load(self, path: Path | None = None) -> dict[str, torch.Tensor]:
        """The model at ``path`` (default: the current one; the initial model before any)."""
        path = path or self.current
        if path.is_file():
            return open_checkpoint(path).state()
        if path == self.trained:
            raise InputError(
                f"client {self.id} has no trained model of round {self.round} to merge",
                hint="run the round's training first",
            )
        return state_of(init_model(self.config, self.seed))

    def current_model(self, pending: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The client's model with the server's pending results applied; they are saved, so they
        are the client's own from now on."""
        state = self.load()
        if pending:
            self.apply(state, pending)
            self.save(self.current, state)
        return state

    def apply(self, state: dict[str, torch.Tensor], pending: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the parts the server sent (its group results) in ``state``."""
        for name, t in pending.items():
            own = state.get(name)
            if own is None or own.shape != t.shape or own.dtype != t.dtype:
                raise InputError(
                    f"the server sent client {self.id} tensor {name} that its model does not "
                    "have in that shape and dtype",
                    hint="every client of a federation must share one architecture",
                )
            state[name] = t

    def save(self, path: Path, state: Mapping[str, torch.Tensor], **meta: Any) -> str:
        """Write ``state`` at ``path``; returns its sha256."""
        m = CheckpointMeta(
            self.config,
            self.id,
            self.round,
            int(meta.get("num_samples", 0)),
            self.seed,
            str(meta.get("method", "flower")),
            routing=meta.get("routing"),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with OutputSet(force=True) as outputs:
            save_checkpoint(outputs, path, state, m)
            digest = outputs.staged_sha256(path)
        return digest


def _split(body: Mapping[str, Any]) -> ClientSplit:
    split = body["split"]
    return ClientSplit(
        np.asarray(split["train"], dtype=np.int64), np.asarray(split["test"], dtype=np.int64)
    )


def _train(settings: ClientSettings, body: dict[str, Any], pending: dict[str, torch.Tensor]) -> Any:
    client = _Client(settings, body)
    state = client.current_model(pending)
    dataset = _dataset(body)
    cfg = from_mapping(TrainConfig, dict(body["train"]))
    update = train_client(
        client.config, state, dataset, _split(body), cfg, client.seed, client.round, client.id
    )
    trained = update.result.state
    digest = client.save(
        client.trained, trained, num_samples=update.num_samples, routing=update.routing,
        method="train",
    )  # fmt: skip
    out: dict[str, Any] = {
        "client": client.id,
        "num_samples": update.num_samples,
        "routing": update.routing,
        "sha256": digest,
    }
    if body.get("publish"):
        if not settings.exchange:
            raise UsageError(
                "this node has no exchange location to publish its experts to",
                hint="give the node config exchange=URL (or the run config's exchange)",
            )
        key = exchange_key(client.arm, client.round, client.id)
        refs = publish_experts(settings.exchange, key, client.schema, trained, client.id)
        out["experts"] = refs_to_json(refs)
    names = [str(n) for n in body.get("upload", [])]
    return out, {n: trained[n] for n in names}


class _PeerSource:
    """The tensors a target's merge reads: its own trained model from memory, the peers'
    experts from the exchange (checked against the digests its rows carry)."""

    def __init__(
        self,
        own: int,
        state: Mapping[str, torch.Tensor],
        schema: ModelSchema,
        fetcher: ExpertFetcher | None,
        refs: Mapping[tuple[int, int, int], ExpertRef],
    ) -> None:
        self.own, self.state, self.schema = own, state, schema
        self.fetcher, self.refs = fetcher, refs

    def _peer(self, client: int, layer: int, expert: int) -> dict[str, torch.Tensor]:
        ref = self.refs.get((client, layer, expert))
        if ref is None or self.fetcher is None:
            raise InputError(
                f"the plan names client {client}'s expert {expert} of MoE layer {layer} as a "
                "source but gives no reference to fetch it"
            )
        return self.fetcher.expert(client, layer, expert, ref)

    def tensor(self, client: int, name: str) -> torch.Tensor:
        if client == self.own:
            return self.state[name]
        entry = self.schema.entry(name)
        assert entry.layer is not None and entry.expert is not None
        return self._peer(client, entry.layer, entry.expert)[name]

    def experts(self, client: int, name: str, indices: list[int]) -> torch.Tensor:
        entry = self.schema.entry(name)
        axis = entry.expert_axis or 0
        if client == self.own:
            return self.state[name].index_select(axis, torch.tensor(indices))
        assert entry.layer is not None
        return torch.stack([self._peer(client, entry.layer, j)[name] for j in indices], dim=axis)


def _defence(data: Mapping[str, Any]) -> ExpertDefence:
    r = data["reduce"]
    return ExpertDefence(
        Reduce(
            ReduceKind(r["kind"]), float(r["trim"]), float(r["clip"]), float(r.get("krum_ratio", 0))
        ),
        float(data["bound"]),
        float(data["outlier"]),
        bool(data["trust"]),
    )


def _merge(settings: ClientSettings, body: dict[str, Any], pending: dict[str, torch.Tensor]) -> Any:
    client = _Client(settings, body)
    start = client.load()  # the model this round's training started from
    trained = client.load(client.trained)
    layers = body.get("layers") or {}
    merged = dict(trained)
    fetcher = None
    if layers:
        refs: dict[tuple[int, int, int], ExpertRef] = {}
        for c, text in dict(body.get("sources") or {}).items():
            for (layer, j), ref in refs_from_json(str(text), f"plan of client {client.id}").items():
                refs[(int(c), layer, j)] = ref
        if refs and not settings.exchange:
            raise UsageError(
                "this node has no exchange location to fetch its peers' experts from",
                hint="give the node config exchange=URL (or the run config's exchange)",
            )
        dtypes = {k: v.dtype for k, v in trained.items()}
        fetcher = ExpertFetcher(settings.exchange, client.schema, dtypes) if refs else None
        source = _PeerSource(client.id, trained, client.schema, fetcher, refs)
        experts: list[Any] = [None] * client.schema.num_layers
        for key, rows in layers.items():
            layer = int(key)
            matrix = matrix_from_rows(rows, f"plan of client {client.id}, MoE layer {layer}")
            defence = _defence(body["defence"])
            if defence.reduce.needs_start:
                raise UsageError(
                    f"expert_reduce {defence.reduce.kind.value} needs every source's start "
                    "model, which peers do not publish",
                    hint="use mean, median, trimmed-mean, clipped-mean or multi-krum on Flower",
                )
            experts[layer] = CrossExpert(matrix, defence)
        spec = MergeSpec("fedmoe-da", (client.id,), (), (), tuple(experts))
        merger = Merger(spec, client.schema, source, dtypes, MemorySource({client.id: start}))
        for layer in range(client.schema.num_layers):
            if experts[layer] is None:
                continue
            for entry in client.schema.experts(layer):
                merged[entry.name] = merger.tensor(client.id, entry.name)
    client.apply(merged, pending)
    # staged: it becomes the client's model when the server commits the round (see _settle)
    client.save(client.staged, merged, method=str(body.get("method", "flower")))
    client.trained.unlink(missing_ok=True)
    out: dict[str, Any] = {
        "client": client.id,
        "fetched_bytes": fetcher.bytes_moved if fetcher else 0,
    }
    if "global_test" in body:  # an evaluation round: the merged model is the one evaluated
        glob = np.asarray(body["global_test"], dtype=np.int64)
        ev = evaluate_client(client.config, merged, _dataset(body), client.id, _split(body), glob)
        out["eval"] = ev.to_dict()
    return out, {}


def _evaluate(
    settings: ClientSettings, body: dict[str, Any], pending: dict[str, torch.Tensor]
) -> Any:
    client = _Client(settings, body)
    state = client.current_model(pending)
    dataset = _dataset(body)
    glob = np.asarray(body["global_test"], dtype=np.int64)
    ev = evaluate_client(client.config, state, dataset, client.id, _split(body), glob)
    return {"client": client.id, "eval": ev.to_dict()}, {}


Handler = Callable[[ClientSettings, dict[str, Any], dict[str, torch.Tensor]], Any]


def _reply(handler: Handler, msg: Message, context: Context, defaults: ClientSettings) -> Message:
    """Run ``handler`` on ``msg``; an error that is the user's to fix goes back to the server."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as fedmoe run's workers: one thread per client, the same bits
    try:
        body, pending = unpack(msg.content, "message from the server")
        settings = settings_of(context, defaults)
        out, tensors = handler(settings, body, pending)
        out["received_bytes"] = nbytes(pending)
        return Message(pack(out, tensors), reply_to=msg)
    except FedMoeError as exc:
        return Message(pack(error_body(exc)), reply_to=msg)
    finally:
        torch.set_num_threads(previous)


def _hello(msg: Message, context: Context) -> Message:
    pid = context.node_config.get("partition-id")
    body: dict[str, Any] = {"client": int(pid) if isinstance(pid, int) else None}
    if body["client"] is None:
        body = error_body(
            UsageError(
                "a node without partition-id in its node config",
                hint='start each supernode with --node-config "partition-id=I"',
            )
        )
    return Message(pack(body), reply_to=msg)


def make_client_app(defaults: ClientSettings | None = None) -> ClientApp:
    """The ClientApp; ``defaults`` stand in for node and run config keys that are not set."""
    base = defaults or ClientSettings()
    app = ClientApp()

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        return _hello(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _reply(_train, msg, context, base)

    @app.train("merge")
    def merge(msg: Message, context: Context) -> Message:
        return _reply(_merge, msg, context, base)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _reply(_evaluate, msg, context, base)

    return app


app = make_client_app()  # what ``flwr run`` loads (pyproject: [tool.flwr.app.components])
