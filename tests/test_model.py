"""The MoE classifier: shapes, sparse dispatch against the dense reference, router, balance loss,
seeded initialisation and the config."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch

from fedmoe.errors import InputError, UsageError
from fedmoe.model import (
    Experts,
    MoEClassifier,
    MoEConfig,
    Router,
    build_model,
    expected_shapes,
    init_model,
    load_balance_loss,
    state_of,
)

TINY = {"embed_dim": 8, "num_experts": 4, "expert_hidden": 8, "embed_hidden": 16}


def tiny(**overrides: object) -> MoEConfig:
    """A tiny image config (1, 8, 8) → 10 classes."""
    fields: dict[str, object] = {"input_shape": (1, 8, 8), "num_classes": 10, **TINY}
    fields.update(overrides)
    return MoEConfig(**fields)  # type: ignore[arg-type]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _global_rng_untouched() -> Iterator[None]:
    """``Router()`` and ``Experts()`` draw their default init from the global RNG; give it back."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------------
# shapes and tensor names


@pytest.mark.parametrize(
    ("embed", "shape"), [("mlp", (1, 8, 8)), ("mlp", (5,)), ("cnn", (1, 8, 8)), ("cnn", (3, 7, 5))]
)
def test_forward_shapes(embed: str, shape: tuple[int, ...]) -> None:
    cfg = tiny(embed=embed, input_shape=shape, num_classes=3, top_k=2)
    model = init_model(cfg, 0)
    out = model(torch.randn(6, *shape, generator=gen(1)))
    assert out.logits.shape == (6, 3)
    assert out.probs.shape == (6, 4) and out.probs.dtype == torch.float32
    assert out.weights.shape == (6, 2) and out.weights.dtype == torch.float32
    assert out.experts.shape == (6, 2) and out.experts.dtype == torch.int64
    assert int(out.experts.min()) >= 0 and int(out.experts.max()) < 4
    # the two chosen experts of a sample are distinct
    assert bool((out.experts[:, 0] != out.experts[:, 1]).all())


def test_state_names_and_shapes_mlp() -> None:
    """The tensor names and shapes are the checkpoint format."""
    cfg = tiny(input_shape=(1, 8, 8), num_classes=10)
    shapes = {k: tuple(v.shape) for k, v in init_model(cfg, 0).state_dict().items()}
    assert shapes == {
        "embed.fc1.weight": (16, 64),
        "embed.fc1.bias": (16,),
        "embed.fc2.weight": (8, 16),
        "embed.fc2.bias": (8,),
        "gate.weight": (4, 8),
        "experts.w1": (4, 8, 8),
        "experts.b1": (4, 8),
        "experts.w2": (4, 8, 10),
        "experts.b2": (4, 10),
    }


def test_state_names_and_shapes_cnn_with_gate_bias() -> None:
    cfg = tiny(embed="cnn", input_shape=(3, 7, 5), num_classes=2, gate_bias=True)
    shapes = {k: tuple(v.shape) for k, v in init_model(cfg, 0).state_dict().items()}
    c = 4  # max(4, embed_hidden // 8)
    assert shapes["embed.conv1.weight"] == (c, 3, 3, 3)
    assert shapes["embed.conv2.weight"] == (2 * c, c, 3, 3)
    assert shapes["embed.fc.weight"] == (8, 2 * c * 3 * 2)  # 7x5 pooled to 3x2
    assert shapes["gate.bias"] == (4,)
    assert shapes["experts.w2"] == (4, 8, 2)


# ---------------------------------------------------------------------------------------------
# sparse grouped dispatch == dense masked reference == a per-sample loop


def _loop_reference(
    ex: Experts, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """The definition, one sample and one chosen expert at a time."""
    rows = []
    for b in range(x.shape[0]):
        y = torch.zeros(ex.w2.shape[2], dtype=x.dtype)
        for w, e in zip(weights[b], experts[b].tolist(), strict=True):
            h = torch.relu(x[b] @ ex.w1[e] + ex.b1[e])
            y = y + w * (h @ ex.w2[e] + ex.b2[e])
        rows.append(y)
    return torch.stack(rows)


def _experts_grads(
    ex: Experts, x: torch.Tensor, w: torch.Tensor, e: torch.Tensor, dense: bool, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    ex.zero_grad(set_to_none=True)
    y = (ex.forward_dense if dense else ex.forward)(x, w, e)
    (y * g).sum().backward()
    out = {name: p.grad.clone() for name, p in ex.named_parameters()}  # type: ignore[union-attr]
    out.update(y=y.detach(), x=x.grad.clone(), weights=w.grad.clone())  # type: ignore[union-attr]
    return out


TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_experts_sparse_equals_dense_with_starved_experts(dtype: torch.dtype) -> None:
    """Experts 1 and 4 get no sample; ids arrive unsorted; the same expert appears in both slots
    across samples."""
    ex = Experts(5, 6, 7, 3)
    ex.reset_parameters(gen(0))
    ex = ex.to(dtype)
    x = torch.randn(6, 6, generator=gen(1), dtype=dtype)
    experts = torch.tensor([[3, 0], [0, 2], [2, 3], [3, 2], [0, 3], [2, 0]])
    weights = torch.rand(6, 2, generator=gen(2), dtype=dtype)
    g = torch.randn(6, 3, generator=gen(3), dtype=dtype)
    sparse = _experts_grads(ex, x, weights, experts, False, g)
    dense = _experts_grads(ex, x, weights, experts, True, g)
    tol = TOL[dtype]
    assert set(sparse) == {"w1", "b1", "w2", "b2", "y", "x", "weights"}
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], atol=tol, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            sparse["y"], _loop_reference(ex, x, weights, experts), atol=tol, rtol=0
        )
    for name in ("w1", "b1", "w2", "b2"):  # starved experts get exactly zero gradient
        assert not sparse[name][1].any() and not sparse[name][4].any()
        assert sparse[name][0].any() and sparse[name][2].any() and sparse[name][3].any()


@pytest.mark.parametrize("dims", [(8, 16, 4), (6, 7, 3)])
def test_grouped_gemm_is_the_per_expert_loop_bit_for_bit(
    dims: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backward's one-call grouped GEMM (``torch._grouped_mm``, taken when every stride is
    16-byte aligned: the first dims) gives the per-expert loop's tensors exactly, so training
    results do not depend on which path ran; expert 1 gets no sample."""
    import fedmoe.model.experts as module

    hidden_in, hidden, out = dims
    ex = Experts(4, hidden_in, hidden, out)
    ex.reset_parameters(gen(0))
    x = torch.randn(9, hidden_in, generator=gen(1))
    experts = torch.tensor([[3, 0], [0, 2], [2, 3], [3, 2], [0, 3], [2, 0], [0, 2], [3, 0], [2, 3]])
    weights = torch.rand(9, 2, generator=gen(2))
    g = torch.randn(9, out, generator=gen(3))
    runs = {}
    for grouped in (True, False):
        monkeypatch.setattr(module, "_HAS_GROUPED_MM", grouped and module._HAS_GROUPED_MM)
        runs[grouped] = _experts_grads(ex, x, weights, experts, False, g)
    for name in runs[True]:
        assert torch.equal(runs[True][name], runs[False][name]), name
    assert not runs[True]["w1"][1].any() and not runs[True]["b2"][1].any()
    dense = _experts_grads(ex, x, weights, experts, True, g)
    for name in runs[True]:
        torch.testing.assert_close(runs[True][name], dense[name], atol=1e-6, rtol=0, msg=name)


def test_experts_single_sample_single_expert_is_the_plain_mlp() -> None:
    """Hand-set weights: x = [1, -2], one expert, weight 0.5."""
    ex = Experts(2, 2, 2, 1).double()
    with torch.no_grad():
        ex.w1.zero_(), ex.b1.zero_(), ex.w2.zero_(), ex.b2.zero_()
        ex.w1[1] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # h = relu(x) = [1, 0]
        ex.b1[1] = torch.tensor([0.0, 0.0])
        ex.w2[1] = torch.tensor([[3.0], [5.0]])  # y = 3*1 + 5*0 + 2 = 5
        ex.b2[1] = torch.tensor([2.0])
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    y = ex(x, torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([[1]]))
    assert y.tolist() == [[2.5]]


def _model_grads(
    model: MoEClassifier, x: torch.Tensor, dense: bool, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(x, dense=dense)
    loss = (out.logits * g).sum() + 0.3 * out.balance_loss()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["logits"] = out.logits.detach()
    return grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("embed", "top_k"), [("mlp", 1), ("mlp", 2), ("mlp", 4), ("cnn", 2)])
def test_model_sparse_equals_dense_forward_and_every_gradient(
    dtype: torch.dtype, embed: str, top_k: int
) -> None:
    cfg = tiny(embed=embed, input_shape=(1, 6, 6), num_classes=5, top_k=top_k, gate_bias=True)
    model = init_model(cfg, 3).to(dtype)
    x = torch.randn(12, 1, 6, 6, generator=gen(4), dtype=dtype)
    g = torch.randn(12, 5, generator=gen(5), dtype=dtype)
    sparse = _model_grads(model, x, False, g)
    dense = _model_grads(model, x, True, g)
    names = {n for n, _ in model.named_parameters()}
    assert set(sparse) == set(dense) == names | {"logits"}  # every parameter has a gradient
    for name in sparse:
        # float32: 1e-6 relative to the gradient's scale (the embedding's layer norm scales the
        # gradients of the layers before it by ~5); float64: 1e-12 absolute
        tol = TOL[dtype] * (
            1.0 if dtype == torch.float64 else max(1.0, float(dense[name].abs().max()))
        )
        torch.testing.assert_close(sparse[name], dense[name], atol=tol, rtol=0, msg=name)
    assert sparse["gate.weight"].abs().sum() > 0  # the gate learns from the task loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_expert_that_no_sample_chooses(dtype: torch.dtype) -> None:
    cfg = tiny(input_shape=(4,), num_classes=3, top_k=2, gate_bias=True)
    model = init_model(cfg, 1).to(dtype)
    with torch.no_grad():
        model.gate.bias[2] = -100.0  # expert 2 is never in the top 2
    x = torch.randn(10, 4, generator=gen(6), dtype=dtype)
    g = torch.randn(10, 3, generator=gen(7), dtype=dtype)
    assert not bool((model(x).experts == 2).any())
    sparse = _model_grads(model, x, False, g)
    dense = _model_grads(model, x, True, g)
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], atol=TOL[dtype], rtol=0, msg=name)
    for name in ("experts.w1", "experts.b1", "experts.w2", "experts.b2"):
        assert not sparse[name][2].any()


# ---------------------------------------------------------------------------------------------
# router


def _router(top_k: int) -> Router:
    r = Router(2, 3, top_k)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))  # (E, H)
    return r


def test_router_hand_computed() -> None:
    """h = [ln 4, ln 2] → logits [ln 4, ln 2, 0] → probs [4, 2, 1] / 7."""
    h = torch.tensor([[math.log(4.0), math.log(2.0)]])
    for k, weights, experts in ((1, [4 / 7], [0]), (2, [2 / 3, 1 / 3], [0, 1])):
        probs, w, e = _router(k)(h)
        torch.testing.assert_close(probs, torch.tensor([[4 / 7, 2 / 7, 1 / 7]]))
        torch.testing.assert_close(w, torch.tensor([weights]))
        assert e.tolist() == [experts]
    probs, w, e = _router(3)(h)
    torch.testing.assert_close(w, torch.tensor([[4 / 7, 2 / 7, 1 / 7]]))
    assert e.tolist() == [[0, 1, 2]]


def test_router_bias_shifts_the_choice() -> None:
    r = Router(2, 3, 1, bias=True)
    with torch.no_grad():
        r.weight.zero_()
        r.bias.copy_(torch.tensor([0.0, 0.0, math.log(2.0)]))  # type: ignore[union-attr]
    probs, w, e = r(torch.ones(1, 2))
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.25, 0.5]]))
    assert e.tolist() == [[2]] and w.tolist() == [[0.5]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_router_softmax_is_fp32_and_weights_follow_the_input(dtype: torch.dtype) -> None:
    r = Router(8, 5, 2)
    with torch.no_grad():
        r.weight.normal_(0.0, 0.5, generator=gen(9))
    r = r.to(dtype)
    h = torch.randn(7, 8, generator=gen(0)).to(dtype)
    probs, w, e = r(h)
    assert probs.dtype == torch.float32  # softmax in fp32, whatever the input precision
    assert w.dtype == dtype and e.dtype == torch.int64
    logits = torch.nn.functional.linear(h, r.weight)  # in the input's precision
    torch.testing.assert_close(probs, logits.float().softmax(-1), atol=0, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7))


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_router_topk_weights(top_k: int) -> None:
    r = Router(8, 5, top_k)
    with torch.no_grad():
        r.weight.normal_(0.0, 0.5, generator=gen(8))
    probs, w, e = r(torch.randn(9, 8, generator=gen(1)))
    chosen = probs.gather(1, e)  # (B, k) raw probabilities of the chosen experts
    assert bool((chosen[:, :-1] >= chosen[:, 1:]).all())  # sorted, best first
    torch.testing.assert_close(chosen[:, 0], probs.max(dim=1).values, atol=0, rtol=0)
    if top_k == 1:
        torch.testing.assert_close(w, chosen, atol=0, rtol=0)  # the raw probability
        assert bool((w < 1).all())
    else:
        torch.testing.assert_close(w.sum(-1), torch.ones(9))
        torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# load-balancing loss


def test_balance_loss_hand_computed_top1() -> None:
    """f = [3/4, 1/4], P = [0.6, 0.4]: L = 2 · (0.75·0.6 + 0.25·0.4) = 1.1."""
    probs = torch.tensor(
        [[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]], dtype=torch.float64, requires_grad=True
    )
    experts = torch.tensor([[0], [0], [0], [1]])
    loss = load_balance_loss(probs, experts, 2)
    assert loss.item() == pytest.approx(1.1, abs=1e-15)
    loss.backward()
    # dL/dp_be = E · f_e / B: [2 · 0.75 / 4, 2 · 0.25 / 4] for every sample
    assert probs.grad is not None
    torch.testing.assert_close(probs.grad, torch.tensor([[0.375, 0.125]] * 4, dtype=torch.float64))


def test_balance_loss_hand_computed_top2() -> None:
    """3 experts, 2 samples, k = 2: counts [2, 1, 1] → f = [1/2, 1/4, 1/4];
    P = [0.35, 0.35, 0.3]; L = 3 · (0.175 + 0.0875 + 0.075) = 1.0125."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.4, 0.4]], dtype=torch.float64)
    experts = torch.tensor([[0, 1], [2, 0]])
    assert load_balance_loss(probs, experts, 3).item() == pytest.approx(1.0125, abs=1e-15)


@pytest.mark.parametrize(("num_experts", "k"), [(2, 1), (4, 1), (4, 2), (4, 4), (8, 3)])
def test_balance_loss_uniform_router_is_exactly_one(num_experts: int, k: int) -> None:
    probs = torch.full((16, num_experts), 1.0 / num_experts)
    experts = torch.randint(0, num_experts, (16, k), generator=gen(k))  # any choice
    assert load_balance_loss(probs, experts, num_experts).item() == 1.0


def test_balance_loss_of_an_output() -> None:
    model = init_model(tiny(input_shape=(4,), num_classes=3), 0)
    out = model(torch.randn(5, 4, generator=gen(0)))
    assert out.balance_loss().item() == load_balance_loss(out.probs, out.experts, 4).item()


# ---------------------------------------------------------------------------------------------
# seeded initialisation, build_model, state_of


@pytest.mark.parametrize("embed", ["mlp", "cnn"])
def test_init_is_deterministic_and_leaves_the_global_rng_alone(embed: str) -> None:
    cfg = tiny(embed=embed, gate_bias=True)
    before = torch.random.get_rng_state()
    a, b, c = (state_of(init_model(cfg, s)) for s in (5, 5, 6))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == torch.float32
        assert torch.equal(a[name], b[name]), name
        assert bool(torch.isfinite(a[name]).all()), name
    random_names = [n for n in a if n != "gate.bias"]
    assert all(not torch.equal(a[n], c[n]) for n in random_names)
    assert not a["gate.bias"].any()  # the gate bias starts at zero


def test_init_bounds_and_scales() -> None:
    cfg = MoEConfig((2, 3), 5, embed_hidden=16, embed_dim=16, num_experts=16, expert_hidden=9)
    s = state_of(init_model(cfg, 0))
    for name, fan_in in (
        ("embed.fc1.weight", 6), ("embed.fc1.bias", 6), ("embed.fc2.weight", 16),
        ("experts.w1", 16), ("experts.b1", 16), ("experts.w2", 9), ("experts.b2", 9),
    ):  # fmt: skip
        bound = 1 / math.sqrt(fan_in)
        assert float(s[name].abs().max()) <= bound, name
        assert float(s[name].abs().max()) > 0.8 * bound, name  # uses the range
    # gate N(0, 1/H): 256 draws, std 1/4
    assert float(s["gate.weight"].std()) == pytest.approx(0.25, rel=0.2)
    # experts differ from one another (per-expert draws)
    assert not torch.equal(s["experts.w1"][0], s["experts.w1"][1])


def test_build_model_copies_the_state() -> None:
    cfg = tiny()
    state = state_of(init_model(cfg, 0))
    kept = {k: v.clone() for k, v in state.items()}
    model = build_model(cfg, state)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k in state:
        assert torch.equal(state[k], kept[k])
    copy = state_of(model)
    copy["gate.weight"].zero_()  # a copy: the model keeps its weights
    assert model.gate.weight.abs().sum() > 0
    assert all(t.is_contiguous() and not t.requires_grad for t in copy.values())


def test_build_model_runs_like_the_original() -> None:
    cfg = tiny()
    model = init_model(cfg, 2)
    x = torch.randn(4, 1, 8, 8, generator=gen(0))
    torch.testing.assert_close(build_model(cfg, state_of(model))(x).logits, model(x).logits)


# ---------------------------------------------------------------------------------------------
# config


def test_config_json_is_canonical_and_round_trips() -> None:
    cfg = MoEConfig((1, 8, 8), 10)
    assert cfg.to_json() == (
        '{"embed":"mlp","embed_dim":64,"embed_hidden":128,"expert_hidden":64,"gate_bias":false,'
        '"input_shape":[1,8,8],"moe_layers":1,"num_classes":10,"num_experts":8,"top_k":2}'
    )
    other = tiny(embed="cnn", gate_bias=True, top_k=3)
    for c in (cfg, other):
        back = MoEConfig.from_json(c.to_json(), "x")
        assert back == c and hash(back) == hash(c)
        assert isinstance(back.input_shape, tuple)
    assert cfg.input_size == 64


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"top_k": 5}, "top_k must be at most num_experts = 4, got 5"),
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"num_experts": 0}, "num_experts must be >= 1"),
        ({"input_shape": (1, 0, 8)}, "input_shape must be a list of positive integers"),
        ({"input_shape": ()}, "input_shape must be a list of positive integers"),
        ({"embed": "rnn"}, "embed must be one of mlp, cnn"),
        ({"embed": "cnn", "input_shape": (64,)}, "embed 'cnn' needs image inputs"),
    ],
)
def test_config_validation(fields: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        tiny(**fields)


def test_from_dict_names_the_unknown_key() -> None:
    with pytest.raises(UsageError, match=r"recipe.yaml: unknown key 'experts' \(valid: embed,"):
        MoEConfig.from_dict(
            {"input_shape": [4], "num_classes": 2, "experts": 3}, where="recipe.yaml"
        )
    with pytest.raises(UsageError, match="needs input_shape and num_classes"):
        MoEConfig.from_dict({"input_shape": [4]})


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "model_config metadata is not valid JSON"),
        ('{"input_shape":[4],"num_classes":2,"bogus":1}', "bad model_config .*unknown key 'bogus'"),
        (
            '{"input_shape":[4],"num_classes":2,"top_k":9}',
            "bad model_config .*top_k must be at most",
        ),
        ('{"input_shape":[4]}', "bad model_config"),
    ],
)
def test_from_json_errors_are_input_errors(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        MoEConfig.from_json(text, "ck.safetensors")
    assert info.value.message.startswith("ck.safetensors: ")


@pytest.mark.parametrize("fields", [{"num_experts": "four"}, {"top_k": 1.5}])
def test_from_dict_rejects_values_of_the_wrong_type(fields: dict[str, object]) -> None:
    with pytest.raises(UsageError, match=next(iter(fields))):
        MoEConfig.from_dict({"input_shape": [4], "num_classes": 2, **fields})


def test_cnn_on_images_too_small_to_pool_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="input_shape"):
        MoEConfig((1, 1, 4), 3, embed="cnn")


def test_check_data() -> None:
    cfg = tiny()
    cfg.check_data((1, 8, 8), 10, "p.json")  # fits: no error
    with pytest.raises(InputError) as info:
        cfg.check_data((1, 4, 4), 10, "p.json")
    assert info.value.message == (
        "p.json: the model takes inputs of shape [1, 8, 8], the data has [1, 4, 4]"
    )
    assert "fedmoe init --partition" in (info.value.hint or "")
    with pytest.raises(InputError) as info:
        cfg.check_data((1, 8, 8), 3, "p.json")
    assert info.value.message == "p.json: the model has 10 classes, the data 3"
    assert info.value.exit_code == 3


def test_config_is_frozen() -> None:
    cfg = tiny()
    with pytest.raises(AttributeError):
        cfg.top_k = 3  # type: ignore[misc]
    assert json.loads(cfg.to_json())["top_k"] == 2


@pytest.mark.parametrize(
    "cfg",
    [
        MoEConfig((1, 8, 8), 10),
        MoEConfig((1, 8, 8), 10, embed="cnn", embed_hidden=40, gate_bias=True),
        MoEConfig((3, 7, 5), 4, embed="cnn", moe_layers=3, num_experts=5, expert_hidden=9),
        MoEConfig((40,), 3, embed_dim=16, moe_layers=2, gate_bias=True),
    ],
)
def test_declared_shapes_are_the_built_models_tensors(cfg: MoEConfig) -> None:
    """The shapes computed from the config alone (no torch) are the built model's state dict."""
    model = MoEClassifier(cfg)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(cfg) == built
