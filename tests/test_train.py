"""Local training, routing statistics, and evaluation."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from fedmoe.data import Dataset
from fedmoe.errors import UsageError
from fedmoe.model import MoEConfig, build_model, init_model, state_of
from fedmoe.partition import ClientSplit
from fedmoe.train import (
    TrainConfig,
    accuracy,
    client_seed,
    evaluate_models,
    predict,
    routing_stats,
    tensors,
    train_client,
    train_local,
)

CFG = MoEConfig((4,), 2, embed_hidden=8, embed_dim=8, num_experts=4, top_k=2, expert_hidden=8)


def blobs(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable Gaussian blobs in R^4, centred at -2 and +2 (labels alternate)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2  # (n,)
    x = torch.randn(n, 4, generator=g) * 0.5 + (4.0 * y - 2.0).unsqueeze(1)  # (n, 4)
    return x, y


@pytest.fixture(scope="module")
def start() -> dict[str, torch.Tensor]:
    return state_of(init_model(CFG, 0))


def equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# train_local


def test_training_reduces_the_loss_and_learns(start: dict[str, torch.Tensor]) -> None:
    x, y = blobs()
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-2)
    result = train_local(CFG, start, x, y, cfg, seed=1)
    assert len(result.epoch_loss) == len(result.epoch_balance) == 4
    assert result.epoch_loss[0] > result.epoch_loss[-1]
    assert result.epoch_loss[-1] < 0.5 * result.epoch_loss[0]
    assert result.epoch_loss[0] < 1.0  # ~ln 2 at the start: two classes
    assert all(b > 0 for b in result.epoch_balance)
    assert (result.steps, result.samples) == (4 * 4, 4 * 64)
    assert result.seconds > 0
    before = (predict(build_model(CFG, start), x) == y.numpy()).mean()
    after = (predict(build_model(CFG, result.state), x) == y.numpy()).mean()
    assert after == 1.0 and before < 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_other_optimizers_train(start: dict[str, torch.Tensor], optimizer: str) -> None:
    x, y = blobs()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, optimizer=optimizer, weight_decay=1e-3)
    losses = train_local(CFG, start, x, y, cfg, seed=1).epoch_loss
    assert losses[0] > losses[-1]


def test_steps_count_the_last_short_batch(start: dict[str, torch.Tensor]) -> None:
    x, y = blobs(50)
    r = train_local(CFG, start, x, y, TrainConfig(epochs=3, batch_size=16), seed=0)
    assert (r.steps, r.samples) == (3 * math.ceil(50 / 16), 150)


def test_same_seed_same_bits_different_seed_different(start: dict[str, torch.Tensor]) -> None:
    x, y = blobs()
    cfg = TrainConfig(epochs=2, batch_size=16)
    a = train_local(CFG, start, x, y, cfg, seed=7)
    b = train_local(CFG, start, x, y, cfg, seed=7)
    c = train_local(CFG, start, x, y, cfg, seed=8)
    assert equal_states(a.state, b.state)
    assert a.epoch_loss == b.epoch_loss and a.epoch_balance == b.epoch_balance
    assert not any(torch.equal(a.state[k], c.state[k]) for k in a.state)


def test_bf16_autocast_trains_fp32_master_weights_close_to_fp32(
    start: dict[str, torch.Tensor],
) -> None:
    """precision bf16: the products run in bfloat16 (the first loss differs from fp32's in its
    bits but not beyond bfloat16 rounding), every parameter and the returned state stay float32,
    and the model still learns the blobs."""
    x, y = blobs()
    fp32 = train_local(CFG, start, x, y, TrainConfig(epochs=4, batch_size=16, lr=1e-2), seed=1)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-2, precision="bf16")
    bf16 = train_local(CFG, start, x, y, cfg, seed=1)
    assert all(v.dtype == torch.float32 for v in bf16.state.values())
    assert bf16.epoch_loss[0] != fp32.epoch_loss[0]  # autocast did engage
    assert abs(bf16.epoch_loss[0] - fp32.epoch_loss[0]) < 0.02 * fp32.epoch_loss[0]
    assert bf16.epoch_loss[-1] < 0.5 * bf16.epoch_loss[0]
    assert (predict(build_model(CFG, bf16.state), x) == y.numpy()).mean() == 1.0
    assert cfg.to_dict()["precision"] == "bf16"


def test_experts_under_autocast_compute_in_bf16_and_return_fp32_gradients() -> None:
    """Under CPU autocast the grouped experts take bfloat16 copies (their output matches the
    float32 layer to bfloat16 precision) and the gradients reaching the float32 parameters are
    float32 and match float32's to the same precision."""
    from fedmoe.model import Experts

    ex = Experts(4, 8, 16, 4)
    ex.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[i % 4, (i + 1) % 4] for i in range(12)])
    w = torch.full((12, 2), 0.5)
    outs, grads = {}, {}
    for low in (False, True):
        ex.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            y = ex(x, w, idx)
        y.square().sum().backward()
        outs[low] = y.detach()
        grads[low] = {n: p.grad for n, p in ex.named_parameters()}
    assert outs[True].dtype == torch.float32 and not torch.equal(outs[True], outs[False])
    torch.testing.assert_close(outs[True], outs[False], atol=0.03, rtol=0.02)
    for name, g in grads[True].items():
        assert g is not None and g.dtype == torch.float32
        torch.testing.assert_close(g, grads[False][name], atol=0.05, rtol=0.05, msg=name)


def test_inputs_are_not_modified(start: dict[str, torch.Tensor]) -> None:
    x, y = blobs()
    kept = {k: v.clone() for k, v in start.items()}
    x0, y0 = x.clone(), y.clone()
    r = train_local(CFG, start, x, y, TrainConfig(epochs=1, batch_size=16), seed=0)
    assert equal_states(start, kept)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert not any(torch.equal(r.state[k], start[k]) for k in start)  # it did train
    assert all(r.state[k].data_ptr() != start[k].data_ptr() for k in start)


def test_zero_epochs_returns_the_start(start: dict[str, torch.Tensor]) -> None:
    x, y = blobs(8)
    r = train_local(CFG, start, x, y, TrainConfig(epochs=0), seed=0)
    assert equal_states(r.state, start)
    assert (r.epoch_loss, r.steps, r.samples) == ((), 0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": -1},
        {"batch_size": 0},
        {"lr": 0.0},
        {"weight_decay": -0.1},
        {"balance_coef": -1.0},
        {"optimizer": "adagrad"},
    ],
)
def test_train_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_client_seed() -> None:
    s = client_seed(0, 1, 2)
    assert s == client_seed(0, 1, 2) and isinstance(s, int) and 0 <= s < 2**32
    others = {client_seed(0, 1, 3), client_seed(0, 2, 2), client_seed(1, 1, 2)}
    assert s not in others and len(others) == 3


# ---------------------------------------------------------------------------------------------
# routing statistics


def _dataset(n: int = 40, num_domains: int = 3, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (rng.normal(size=(n, 4)) * 0.5 + (4.0 * y - 2.0)[:, None]).astype(np.float32)
    return Dataset(
        "toy",
        x,
        y.astype(np.int64),
        rng.integers(0, num_domains - 1, n).astype(np.int64),  # the last domain stays empty
        ("a", "b"),
        tuple(f"d{i}" for i in range(num_domains)),
    )


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_routing_stats_invariants(top_k: int) -> None:
    cfg = MoEConfig((4,), 2, embed_dim=8, num_experts=4, top_k=top_k, expert_hidden=8)
    model = init_model(cfg, 3)
    ds = _dataset()
    x, _ = tensors(ds, np.arange(ds.num_samples))
    full = routing_stats(model, x, ds.y, ds.domain, ds.num_domains, batch_size=7)
    assert full["num_samples"] == ds.num_samples and len(full["layers"]) == 1
    stats = {"num_samples": full["num_samples"], **full["layers"][0]}
    n, k = ds.num_samples, top_k
    counts = np.array(stats["topk_count"])
    by_label, by_domain = np.array(stats["by_label"]), np.array(stats["by_domain"])
    assert stats["num_samples"] == n
    assert counts.sum() == n * k
    assert by_label.shape == (4, 2) and by_domain.shape == (4, 3)
    assert by_label.sum(1).tolist() == counts.tolist()
    assert by_domain.sum(1).tolist() == counts.tolist()
    assert by_label.sum(0).tolist() == (k * np.bincount(ds.y, minlength=2)).tolist()
    assert by_domain.sum(0).tolist() == (k * np.bincount(ds.domain, minlength=3)).tolist()
    assert by_domain[:, 2].tolist() == [0, 0, 0, 0]
    assert sum(stats["mean_prob"]) == pytest.approx(1.0, abs=1e-5)
    if k == 4:
        assert counts.tolist() == [n] * 4
    # one batch or many: the same counts; and they match the model's own routing
    assert routing_stats(model, x, ds.y, ds.domain, 3, batch_size=512) == full
    with torch.no_grad():
        out = model(x)
    assert counts.tolist() == np.bincount(out.experts.reshape(-1).numpy(), minlength=4).tolist()
    expected = np.zeros((4, 2), dtype=np.int64)
    for row, label in zip(out.experts.numpy(), ds.y, strict=True):
        for e in row:
            expected[e, label] += 1
    assert by_label.tolist() == expected.tolist()
    assert stats["mean_prob"] == pytest.approx(out.probs.double().mean(0).tolist(), abs=1e-6)


def test_routing_stats_of_no_sample() -> None:
    model = init_model(CFG, 0)
    stats = routing_stats(model, torch.zeros(0, 4), np.zeros(0, np.int64), np.zeros(0, np.int64), 2)
    assert stats == {
        "num_samples": 0,
        "layers": [
            {
                "topk_count": [0, 0, 0, 0],
                "mean_prob": [0.0, 0.0, 0.0, 0.0],
                "by_label": [[0, 0]] * 4,
                "by_domain": [[0, 0]] * 4,
            }
        ],
    }


def test_routing_stats_of_every_moe_layer() -> None:
    """With two MoE layers, each layer's counts sum to n·k and match that layer's routing."""
    cfg = MoEConfig((4,), 2, embed_dim=8, num_experts=4, top_k=2, expert_hidden=8, moe_layers=2)
    model = init_model(cfg, 1)
    ds = _dataset()
    x, _ = tensors(ds, np.arange(ds.num_samples))
    stats = routing_stats(model, x, ds.y, ds.domain, ds.num_domains)
    assert len(stats["layers"]) == 2
    with torch.no_grad():
        out = model(x)
    for layer, route in enumerate(out.routes):
        counts = np.bincount(route.experts.reshape(-1).numpy(), minlength=4).tolist()
        assert stats["layers"][layer]["topk_count"] == counts
        assert sum(counts) == ds.num_samples * 2


def test_train_client_uses_the_train_split() -> None:
    ds = _dataset(30)
    split = ClientSplit(np.arange(0, 20), np.arange(20, 30))
    start = state_of(init_model(CFG, 0))
    update = train_client(CFG, start, ds, split, TrainConfig(epochs=1, batch_size=8), 5, 2, 1)
    assert (update.client, update.num_samples) == (1, 20)
    assert update.routing["num_samples"] == 20
    assert sum(update.routing["layers"][0]["topk_count"]) == 20 * CFG.top_k
    x, y = tensors(ds, split.train)
    again = train_local(CFG, start, x, y, TrainConfig(epochs=1, batch_size=8), client_seed(5, 2, 1))
    assert equal_states(update.result.state, again.state)


def test_tensors_are_fresh_copies() -> None:
    ds = _dataset(10)
    x, y = tensors(ds, np.array([3, 1]))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.tolist() == ds.x[[3, 1]].tolist() and y.tolist() == [int(ds.y[3]), int(ds.y[1])]
    x.zero_()  # writable, and the dataset is unchanged
    assert ds.x[3].any()


# ---------------------------------------------------------------------------------------------
# accuracy and evaluation


def test_accuracy_hand_computed() -> None:
    pred = np.array([0, 1, 1, 2, 0])
    y = np.array([0, 1, 2, 2, 1])
    domains = np.array([0, 0, 1, 1, 1])
    overall, per_domain, n = accuracy(pred, y, domains, 3)
    assert (overall, n) == (0.6, 5)
    assert per_domain == [1.0, 0.333333, None]  # 1/3 rounded to 6 places; domain 2 is empty


def test_accuracy_of_nothing() -> None:
    assert accuracy(np.zeros(0), np.zeros(0), np.zeros(0), 2) == (None, [None, None], 0)


def test_predict_batches_and_empty_input() -> None:
    model = init_model(CFG, 0)
    x, _ = blobs(10)
    assert predict(model, x, batch_size=3).tolist() == predict(model, x).tolist()
    assert predict(model, x).dtype == np.int64
    empty = predict(model, torch.zeros(0, 4))
    assert empty.shape == (0,) and empty.dtype == np.int64


def constant_model(cls: int) -> dict[str, torch.Tensor]:
    """A state whose every expert outputs logits favouring class ``cls`` whatever the input."""
    state = state_of(init_model(CFG, 0))
    state["experts.w2"].zero_()
    state["experts.b2"].zero_()
    state["experts.b2"][:, cls] = 5.0
    return state


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_evaluate_models_hand_computed() -> None:
    """Client 0 always predicts 1, client 1 always 0.

    idx:    1 2 3 4 | 5 6 | 7 8 9 (global test); domain 2 has no sample
    label:  1 1 0 1 | 0 1 | 1 0 1
    domain: 0 1 0 1 | 1 0 | 1 0 1
    """
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 1])
    dom = np.array([0, 0, 1, 0, 1, 1, 0, 1, 0, 1])
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    ds = Dataset("toy", x, y, dom, ("a", "b"), ("d0", "d1", "d2"))
    clients = (
        ClientSplit(np.array([0]), np.array([1, 2, 3, 4])),
        ClientSplit(np.array([0]), np.array([5, 6])),
    )
    states = {0: constant_model(1), 1: constant_model(0)}
    report = evaluate_models(CFG, states, ds, clients, np.array([7, 8, 9]))
    assert report["clients"] == [
        {"id": 0, "local_acc": 0.75, "local_n": 4, "global_acc": 0.666667},
        {"id": 1, "local_acc": 0.5, "local_n": 2, "global_acc": 0.333333},
    ]
    assert report["mean_local_acc"] == 0.625
    assert report["worst_local_acc"] == 0.5
    assert report["mean_global_acc"] == 0.5
    # pooled local tests: domain 0 = idx 1 (hit), 3 (miss), 6 (miss); domain 1 = 2, 4, 5 (all hit)
    assert report["local_acc_by_domain"] == [0.333333, 1.0, None]
    # global by domain, per client [0, 1, -] and [1, 0, -]: mean [0.5, 0.5, -]
    assert report["global_acc_by_domain"] == [0.5, 0.5, None]


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_clients_with_the_same_model_share_one_global_prediction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clients holding the same tensors are scored once on the global test set (the result of
    each is what it gets alone); a model differing in one value is scored on its own."""
    import fedmoe.train.evaluate as ev

    ds = _dataset(40)
    rng = np.random.default_rng(3)
    clients = tuple(ClientSplit(np.arange(4), rng.choice(40, 6, replace=False)) for _ in range(4))
    shared = state_of(init_model(CFG, 1))
    nudged = {k: v.clone() for k, v in shared.items()}
    nudged["experts.b2"][0, 0] += 1.0
    states = {0: shared, 1: {k: v.clone() for k, v in shared.items()}, 2: nudged, 3: shared}
    glob = np.arange(20, 40)
    alone = [
        ev.evaluate_client(CFG, states[c], ds, c, clients[c], glob).global_acc for c in range(4)
    ]
    calls: list[int] = []
    real = ev.predict

    def counting(model: Any, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        calls.append(int(x.shape[0]))
        return real(model, x, batch_size)

    monkeypatch.setattr(ev, "predict", counting)
    report = ev.evaluate_models(CFG, states, ds, clients, glob)
    assert [r["global_acc"] for r in report["clients"]] == alone
    assert calls.count(20) == 2  # the shared model once, the nudged one once
    assert calls.count(6) == 4  # every client's local test split


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_evaluate_models_without_global_test_or_local_samples() -> None:
    ds = _dataset(10)
    clients = (ClientSplit(np.arange(10), np.zeros(0, dtype=np.int64)),)
    report = evaluate_models(CFG, {0: constant_model(1)}, ds, clients, np.zeros(0, np.int64))
    assert report["clients"] == [{"id": 0, "local_acc": None, "local_n": 0, "global_acc": None}]
    assert report["mean_local_acc"] is None and report["worst_local_acc"] is None
    assert report["mean_global_acc"] is None
    assert report["local_acc_by_domain"] == [None, None, None]
    assert report["global_acc_by_domain"] == [None, None, None]


def test_evaluate_models_warns_nothing_for_an_empty_domain() -> None:
    ds = _dataset(10)  # domain 2 has no sample
    clients = (ClientSplit(np.arange(5), np.arange(5, 10)),)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate_models(CFG, {0: constant_model(1)}, ds, clients, np.arange(10))
    assert report["global_acc_by_domain"][2] is None


def test_pool_trains_in_process_when_workers_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """No worker processes (e.g. no semaphores in a sandbox): the same updates, in-process."""
    import fedmoe.pipeline.pool as pool_mod
    from fedmoe.data import DataSpec
    from fedmoe.io.datasets import load_dataset
    from fedmoe.partition import get_partitioner, make_partition
    from fedmoe.pipeline.pool import Job, TrainPool
    from fedmoe.train import TrainConfig as TC

    spec = DataSpec("digits-rot")
    data = load_dataset(spec)
    part = make_partition(data.y, data.domain, 3, get_partitioner("iid", {}), 0)
    cfg = MoEConfig(
        data.input_shape, 10, embed_hidden=8, embed_dim=8, num_experts=4, expert_hidden=8
    )
    state = state_of(init_model(cfg, 0))
    jobs = [Job(cfg, state, part.clients[c], TC(epochs=1), 0, 1, c) for c in range(3)]
    with TrainPool(spec, data.fingerprint(), lambda: data, 1) as pool:
        expected = pool.run(jobs)

    def no_processes(*args: object, **kwargs: object) -> None:
        raise OSError("no semaphores")

    monkeypatch.setattr(pool_mod, "ProcessPoolExecutor", no_processes)
    with TrainPool(spec, data.fingerprint(), lambda: data, 2) as pool:
        assert pool.fallback is not None and "training in-process" in pool.fallback
        got = pool.run(jobs)
    for a, b in zip(expected, got, strict=True):
        assert a.client == b.client
        assert all(torch.equal(a.result.state[k], b.result.state[k]) for k in a.result.state)


# ---------------------------------------------------------------------------------------------
# cohorts: many clients trained as one computation, bit for bit each client alone

_COHORT_MODEL = {
    "input_shape": (1, 8, 8), "num_classes": 10, "embed": "mlp", "embed_hidden": 64,
    "embed_dim": 32, "num_experts": 8, "top_k": 2, "expert_hidden": 64,
}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "train", "sizes"),
    [
        # ragged sizes: last batches of 10, 9, 8, 3 rows, a client with no data
        ({}, {}, [58, 57, 40, 16, 3, 0]),
        ({}, {"optimizer": "adamw", "weight_decay": 0.01}, [58, 33]),  # a one-row batch
        ({}, {"optimizer": "sgd", "weight_decay": 0.001}, [58, 33]),
        ({}, {"prox_mu": 0.1}, [58, 33]),
        ({"top_k": 1, "gate_bias": True}, {}, [58, 33]),
        # hidden MoE layers, k = 3 of 4, a batch size that leaves odd expert segments
        (
            {"num_experts": 4, "top_k": 3, "moe_layers": 3, "expert_hidden": 16},
            {"batch_size": 7, "epochs": 3},
            [1, 2, 7, 8, 15, 29],
        ),
        # products under torch's small-GEMM threshold (its own loop instead of BLAS)
        (
            {"embed_hidden": 8, "embed_dim": 8, "num_experts": 2, "top_k": 1, "expert_hidden": 8},
            {"batch_size": 64, "epochs": 1},
            [30, 31, 64, 65],
        ),
    ],
)
def test_a_cohort_trains_each_client_as_it_trains_alone(
    model: dict[str, object], train: dict[str, object], sizes: list[int]
) -> None:
    """Every tensor of every client, bit for bit, its steps and (to rounding) its loss curve:
    a cohort is only a faster way to run the same local rounds (on one thread, as clients train;
    the fixture gives the thread count back)."""
    from fedmoe.train.cohort import fit_cohort, supported

    torch.set_num_threads(1)

    config = MoEConfig(**{**_COHORT_MODEL, **model})  # type: ignore[arg-type]
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 1e-2, **train})  # type: ignore[arg-type]
    assert supported(config, cfg)
    starts = [state_of(init_model(config, c)) for c in range(len(sizes))]
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
        for n in sizes
    ]
    seeds = [100 + c for c in range(len(sizes))]
    together = fit_cohort(config, starts, data, cfg, seeds)
    for c, got in enumerate(together):
        alone = train_local(config, starts[c], *data[c], cfg, seeds[c])
        assert equal_states(got.state, alone.state), f"client {c}"
        assert (got.steps, got.samples) == (alone.steps, alone.samples)
        assert got.epoch_loss == pytest.approx(alone.epoch_loss, rel=1e-5, abs=1e-7)
        assert got.epoch_balance == pytest.approx(alone.epoch_balance, rel=1e-5, abs=1e-7)
    if sizes[-1] == 0:  # a client with no samples keeps its model
        assert equal_states(together[-1].state, starts[-1]) and together[-1].steps == 0


def test_cnn_and_bf16_clients_train_one_by_one() -> None:
    from fedmoe.train.cohort import supported

    assert not supported(MoEConfig(**{**_COHORT_MODEL, "embed": "cnn"}), TrainConfig())  # type: ignore[arg-type]
    assert not supported(MoEConfig(**_COHORT_MODEL), TrainConfig(precision="bf16"))  # type: ignore[arg-type, call-overload]
