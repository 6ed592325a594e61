"""fedmoe on Flower: the expert exchange, the server's outbox, and whole runs — in process (a grid
that calls the ClientApp directly), on the Simulation Engine (Ray) and on a local Deployment
Engine (a real SuperLink and SuperNodes) — against ``fedmoe run`` on the same recipe."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import json
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from helpers import clean_failure, run_in

from fedmoe.errors import InputError, UsageError
from fedmoe.flower.client import ClientSettings, make_client_app
from fedmoe.flower.server import FlowerRun, ServerSettings
from fedmoe.flower.wire import pack, unpack
from fedmoe.io.exchange import (
    ExpertFetcher,
    ExpertRef,
    exchange_key,
    publish_experts,
    refs_from_json,
    refs_to_json,
)
from fedmoe.model import MoEConfig, init_model, schema_for, state_of
from fedmoe.model.schema import Role

RECIPE = """
seed: 3
rounds: 2
participation: 0.5
methods: [fedmoe-da, fedavg, oracle-domain]
data:
  dataset: digits-rot
partition:
  scheme: domain
  clients: 6
  domains_per_client: 1
  global_test: 0.2
  local_test: 0.2
model:
  embed: mlp
  embed_hidden: 16
  embed_dim: 8
  num_experts: 4
  top_k: 2
  expert_hidden: 16
train:
  epochs: 1
  batch_size: 16
fedmoe:
  top_p: 2
  candidates: 4
"""
TIMING = {"seconds", "train_seconds"}


def small_model() -> tuple[MoEConfig, dict[str, torch.Tensor]]:
    cfg = MoEConfig.from_dict(
        {"input_shape": [64], "num_classes": 10, "embed_dim": 8, "num_experts": 4,
         "expert_hidden": 6, "embed_hidden": 12}
    )  # fmt: skip
    return cfg, state_of(init_model(cfg, 1))


def recipe_model() -> MoEConfig:
    """The model of RECIPE on the digits."""
    return MoEConfig.from_dict(
        {"input_shape": [64], "num_classes": 10, "embed": "mlp", "embed_hidden": 16,
         "embed_dim": 8, "num_experts": 4, "top_k": 2, "expert_hidden": 16}
    )  # fmt: skip


# ---------------------------------------------------------------------------- the exchange


def test_published_experts_come_back_bit_for_bit_by_byte_range(tmp_path: Path) -> None:
    cfg, state = small_model()
    schema = schema_for(cfg)
    key = exchange_key("fedmoe-da", 1, 2)
    refs = publish_experts(str(tmp_path), key, schema, state, 2)
    assert sorted(refs) == [(0, j) for j in range(4)]
    data = (tmp_path / key).read_bytes()
    fetcher = ExpertFetcher(str(tmp_path), schema, {k: v.dtype for k, v in state.items()})
    for (layer, j), ref in refs.items():
        got = fetcher.expert(2, layer, j, ref)
        for entry in schema.experts(layer):
            assert entry.stacked  # the built-in model stacks its experts
            assert torch.equal(got[entry.name], state[entry.name][j])
        # each expert is one contiguous range, and the ranges tile the data without overlap
        assert ref.end - ref.start == schema.sizes().expert[layer]
    spans = sorted((r.start, r.end) for r in refs.values())
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] == len(data)
    assert fetcher.bytes_moved == sum(r.end - r.start for r in refs.values())
    # the references survive their JSON form
    assert refs_from_json(refs_to_json(refs), "test") == refs


def test_a_byte_changed_after_publishing_is_refused_naming_client_layer_and_expert(
    tmp_path: Path,
) -> None:
    cfg, state = small_model()
    schema = schema_for(cfg)
    key = exchange_key("fedmoe-da", 1, 5)
    refs = publish_experts(str(tmp_path), key, schema, state, 5)
    path = tmp_path / key
    raw = bytearray(path.read_bytes())
    raw[refs[(0, 2)].start + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    fetcher = ExpertFetcher(str(tmp_path), schema, {k: v.dtype for k, v in state.items()})
    assert fetcher.expert(5, 0, 1, refs[(0, 1)])  # the other experts are intact
    with pytest.raises(InputError, match=r"client 5's expert 2 of MoE layer 0.*sha256"):
        fetcher.expert(5, 0, 2, refs[(0, 2)])


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers ``Range: bytes=a-b`` (as object stores and web servers
    do), recording the bytes it sent."""

    sent: ClassVar[list[int]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self) -> Any:
        header = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not header or not path.is_file():
            if self.command == "GET" and path.is_file():
                self.sent.append(path.stat().st_size)  # a whole file
            return super().send_head()
        lo, _, hi = header.removeprefix("bytes=").partition("-")
        data = path.read_bytes()
        start, end = int(lo), min(int(hi) + 1 if hi else len(data), len(data))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self.sent.append(end - start)
        return io.BytesIO(data[start:end])


def test_experts_are_fetched_by_byte_range_from_an_http_server(tmp_path: Path) -> None:
    cfg, state = small_model()
    schema = schema_for(cfg)
    key = exchange_key("fedmoe-da", 3, 1)
    refs = publish_experts(str(tmp_path), key, schema, state, 1)
    handler = functools.partial(RangeHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        fetcher = ExpertFetcher(url, schema, {k: v.dtype for k, v in state.items()})
        got = fetcher.expert(1, 0, 3, refs[(0, 3)])
        for entry in schema.experts(0):
            assert torch.equal(got[entry.name], state[entry.name][3])
        expert_bytes = refs[(0, 3)].end - refs[(0, 3)].start
        assert fetcher.bytes_moved == expert_bytes
        assert RangeHandler.sent == [expert_bytes]  # one range, not the file
        assert expert_bytes < (tmp_path / key).stat().st_size / 3
        raw = bytearray((tmp_path / key).read_bytes())
        raw[refs[(0, 0)].start] ^= 0xFF
        (tmp_path / key).write_bytes(bytes(raw))
        with pytest.raises(InputError, match="client 1's expert 0 of MoE layer 0"):
            ExpertFetcher(url, schema, {k: v.dtype for k, v in state.items()}).expert(
                1, 0, 0, refs[(0, 0)]
            )
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "key",
    ["../round-001/client-000.safetensors", "/etc/passwd", "a/round-1/client-000.safetensors",
     "a/b/../round-001/client-000.safetensors"],
)  # fmt: skip
def test_a_reference_that_leaves_the_exchange_is_refused(key: str) -> None:
    with pytest.raises(InputError, match="not \\[key, start, end, sha256\\]"):
        ExpertRef.from_list([key, 0, 8, "0" * 64], "plan")


# ---------------------------------------------------------------------------- an in-process grid


class LocalGrid(Grid):
    """A Grid that hands each message to a ClientApp in this process (one Context per node),
    recording the tensor names that cross it both ways."""

    def __init__(self, app: Any, num_nodes: int, tamper: Any = None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # what a SuperLink's ServerApp process knows of itself (messages are stamped with it)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.app = app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.tensor_names: set[str] = set()
        self.tamper = tamper
        self.outbox: dict[str, Message] = {}  # pushed messages' replies, by message id
        self.done: set[str] = set()

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[Any]:
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            key = str(len(self.outbox) + len(self.done))
            self.outbox[key] = self.send_and_receive([msg])[0]
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for key in message_ids:
            if key in self.outbox:
                out.append(self.outbox.pop(key))
                self.done.add(key)
        return out

    def _names(self, msg: Message) -> None:
        for record in msg.content.array_records.values():
            self.tensor_names.update(record.keys())

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self._names(msg)
            ctx = self.contexts[msg.metadata.dst_node_id]
            reply = self.app(msg, ctx)
            self._names(reply)
            if self.tamper is not None:
                self.tamper(msg)
            replies.append(reply)
        return replies


def fresh_settings(tmp_path: Path, recipe: Path, **kw: Any) -> ServerSettings:
    return ServerSettings(str(recipe), str(tmp_path / "run"), tuple(kw.get("overrides", ())), True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe run by ``fedmoe run``."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "recipe.yaml").write_text(RECIPE)
    run_in(folder, ("run", "recipe.yaml", "--out", "run", "--threads", "1", "-q"))
    return folder


def metrics(run: Path) -> list[dict[str, Any]]:
    """The metrics lines by method, then round (``fedmoe run`` appends its arms' lines in the
    order the arms finish them when they run side by side)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: (str(r.get("method")), int(r.get("round", 0))))


def same_metrics(a: Path, b: Path) -> list[dict[str, Any]]:
    """The metrics lines of two runs, equal except for timings; returns ``b``'s."""
    left, right = metrics(a), metrics(b)
    assert len(left) == len(right) > 0
    for x, y in zip(left, right, strict=True):
        assert {k: v for k, v in x.items() if k not in TIMING} == {
            k: y[k] for k in x if k not in TIMING
        }
        assert set(y) - set(x) == {"moved_server_bytes", "moved_p2p_bytes", "server_state_bytes"}
    return right


def test_in_process_flower_run_equals_fedmoe_run_and_moves_no_expert_through_the_server(
    reference: Path, tmp_path: Path
) -> None:
    client = make_client_app(ClientSettings(str(tmp_path / "exchange"), str(tmp_path / "clients")))
    grid = LocalGrid(client, 6)
    settings = fresh_settings(tmp_path, reference / "recipe.yaml")
    folder = FlowerRun(grid, settings)()
    rows = same_metrics(reference / "run", folder)
    da = [r for r in rows if r["method"] == "fedmoe-da"]
    assert all(r["moved_p2p_bytes"] == r["p2p_bytes"] for r in da)  # the ledger's p2p is real
    assert any(r["p2p_bytes"] > 0 for r in da)
    # the plan files are the commands' (same matrices as fedmoe run's)
    for rnd in (1, 2):
        ref_plan = json.loads(
            (reference / "run/rounds/fedmoe-da" / f"round-{rnd:03d}/plan.json").read_text()
        )
        plan = json.loads((folder / "rounds/fedmoe-da" / f"round-{rnd:03d}/plan.json").read_text())
        assert plan["transfers"] == ref_plan["transfers"]
    assert not list(folder.rglob("*.safetensors"))  # the server wrote no model


def test_in_process_baselines_and_defended_variants_equal_fedmoe_run(tmp_path: Path) -> None:
    """naive-moe, local, a robust FedAvg (the server's median) and FedMoE-DA whose targets
    defend their rows (each client's median over its sources, with its own start model)."""
    text = RECIPE.replace(
        "[fedmoe-da, fedavg, oracle-domain]", "[naive-moe, local, fedavg-median, da-median]"
    ) + (
        "variants:\n"
        "  fedavg-median: {method: fedavg, reduce: median}\n"
        "  da-median: {method: fedmoe-da, expert_reduce: median, expert_trust: true}\n"
    )
    (tmp_path / "recipe.yaml").write_text(text)
    run_in(tmp_path, ("run", "recipe.yaml", "--out", "reference", "--threads", "1", "-q"))
    client = make_client_app(ClientSettings(str(tmp_path / "exchange"), str(tmp_path / "clients")))
    settings = ServerSettings(str(tmp_path / "recipe.yaml"), str(tmp_path / "flower"))
    rows = same_metrics(tmp_path / "reference", FlowerRun(LocalGrid(client, 6), settings)())
    assert {r["method"] for r in rows} == {"naive-moe", "local", "fedavg-median", "da-median"}
    # local training moves no tensor: its messages are the orchestration's few hundred bytes
    small_parts = schema_for(recipe_model()).sizes().server_part
    assert all(0 < r["moved_server_bytes"] < small_parts for r in rows if r["method"] == "local")


def test_under_fedmoe_da_no_expert_tensor_crosses_the_server(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("[fedmoe-da, fedavg, oracle-domain]", "[fedmoe-da]"))
    client = make_client_app(ClientSettings(str(tmp_path / "exchange"), str(tmp_path / "clients")))
    grid = LocalGrid(client, 6)
    FlowerRun(grid, fresh_settings(tmp_path, recipe))()
    schema = schema_for(recipe_model())
    assert grid.tensor_names  # the small parts did cross
    assert all(schema.role(n) is not Role.EXPERT for n in grid.tensor_names)
    assert (tmp_path / "exchange/fedmoe-da/round-002").is_dir()  # while the peers published


def test_a_tampered_expert_stops_the_round_with_exit_3_and_applies_nothing(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        RECIPE.replace("[fedmoe-da, fedavg, oracle-domain]", "[fedmoe-da]").replace(
            "participation: 0.5", "participation: 1.0"
        )
    )
    exchange = tmp_path / "exchange"
    clients = tmp_path / "clients"

    def tamper(msg: Message) -> None:  # storage that flips a byte once client 4 has published
        if msg.metadata.message_type == "train" and msg.metadata.group_id == "2":
            path = exchange / "fedmoe-da/round-002/client-004.safetensors"
            if path.is_file() and not getattr(tamper, "done", False):
                raw = bytearray(path.read_bytes())
                raw[-5] ^= 0x10  # inside the last expert
                path.write_bytes(bytes(raw))
                tamper.done = True  # type: ignore[attr-defined]

    grid = LocalGrid(make_client_app(ClientSettings(str(exchange), str(clients))), 6, tamper)
    before: dict[Path, bytes] = {}
    plain = grid.send_and_receive

    def snapshot(messages: Iterable[Message], **kw: Any) -> Iterable[Message]:
        msgs = list(messages)
        if msgs and msgs[0].metadata.message_type == "train.merge":
            before.update({p: p.read_bytes() for p in clients.rglob("client-???.safetensors")})
        return plain(msgs, **kw)

    grid.send_and_receive = snapshot  # type: ignore[method-assign]
    with pytest.raises(InputError) as info:
        FlowerRun(grid, fresh_settings(tmp_path, recipe))()
    err = info.value
    assert err.exit_code == 3
    assert "client 4's expert 3 of MoE layer 0" in err.message and "sha256" in err.message
    # round 2 is not applied: no metrics line, and every client's model is still the one it
    # started the round with (the clients that merged before the refusal staged theirs only)
    assert [r["round"] for r in metrics(tmp_path / "run")] == [1]
    assert len(before) == 6
    assert all(p.read_bytes() == data for p, data in before.items())
    assert list(clients.rglob("*.merged.safetensors"))  # staged, never made current


def test_a_client_error_reaches_the_server_with_its_exit_code(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("[fedmoe-da, fedavg, oracle-domain]", "[fedmoe-da]"))
    grid = LocalGrid(make_client_app(ClientSettings("", str(tmp_path / "clients"))), 6)
    with pytest.raises(UsageError, match="no exchange location to publish its experts to") as info:
        FlowerRun(grid, fresh_settings(tmp_path, recipe))()
    assert info.value.exit_code == 2


def test_a_client_that_sends_a_wrong_shape_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("[fedmoe-da, fedavg, oracle-domain]", "[fedavg]"))
    base = make_client_app(ClientSettings(str(tmp_path / "x"), str(tmp_path / "clients")))

    def lying(msg: Message, ctx: Context) -> Message:  # client 2 sends a truncated gate
        reply = base(msg, ctx)
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 2:
            body, tensors = unpack(reply.content, "test")
            tensors["gate.weight"] = tensors["gate.weight"][:2]
            return Message(pack(body, tensors), reply_to=msg)
        return reply

    with pytest.raises(InputError, match=r"client 2 sent tensor gate.weight of shape \(2, 8\)"):
        FlowerRun(LocalGrid(lying, 6), fresh_settings(tmp_path, recipe))()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [("seeds: [0, 1]", "seeds runs several federations"),
     ("attack: {kinds: [sign-flip], fraction: 0.2}", "attack simulates malicious clients"),
     ("  wire: bf16", "sends experts as bf16")],
)  # fmt: skip
def test_what_flower_cannot_run_is_refused_before_anything_starts(
    tmp_path: Path, run_cli: Any, extra: str, needle: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE + extra + "\n")
    r = run_cli("flower", str(recipe), "--out", str(tmp_path / "run"))
    assert needle in clean_failure(r, 2)
    assert not (tmp_path / "run").exists()


def test_an_existing_run_needs_force(tmp_path: Path, run_cli: Any) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text("{}\n")
    r = run_cli("flower", str(recipe), "--out", str(tmp_path / "run"))
    assert "already holds a run" in clean_failure(r, 4)
    assert (tmp_path / "run/metrics.jsonl").read_text() == "{}\n"


# ---------------------------------------------------------------------------- Flower's engines


def test_simulation_engine_equals_fedmoe_run_and_the_server_never_opens_the_exchange(
    reference: Path, tmp_path: Path
) -> None:
    exchange = tmp_path / "exchange"
    opened: list[str] = []

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and str(args[0]).startswith(str(exchange)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # cannot be removed: it only records paths under this test's folder
    start = time.perf_counter()
    run_in(
        tmp_path,
        ("flower", str(reference / "recipe.yaml"), "--out", "run", "--exchange", str(exchange),
         "-q"),
    )  # fmt: skip
    assert time.perf_counter() - start > 0
    same_metrics(reference / "run", tmp_path / "run")
    assert (exchange / "fedmoe-da/round-001").is_dir()  # the clients (Ray workers) published
    assert opened == []  # and the server process never opened a file there
    next((exchange / "fedmoe-da/round-001").iterdir()).open("rb").close()
    assert opened  # (the hook does see an open in this process)
    assert (tmp_path / "run/report.json").is_file()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find leftover processes")
def test_local_deployment_superlink_and_two_supernodes_equals_fedmoe_run(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        RECIPE.replace("[fedmoe-da, fedavg, oracle-domain]", "[fedmoe-da]")
        .replace("clients: 6", "clients: 2")
        .replace("participation: 0.5", "participation: 1.0")
    )
    run_in(tmp_path, ("run", "recipe.yaml", "--out", "reference", "--threads", "1", "-q"))
    run_in(tmp_path, ("flower", "recipe.yaml", "--out", "deployed", "--engine", "deployment", "-q"))
    rows = same_metrics(tmp_path / "reference", tmp_path / "deployed")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["moved_p2p_bytes"] == r["p2p_bytes"] > 0 for r in rows)
    # every process the deployment started is gone
    from fedmoe.flower.launch import _TAG

    leftovers = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if _TAG.encode() in (d / "environ").read_bytes():
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    leftovers.append(d.name)
        except OSError:
            continue
    assert leftovers == []
