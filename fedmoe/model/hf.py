"""Hugging Face MoE language models: their architectures as :class:`~fedmoe.model.schema.Layout`
values, and the part of ``config.json`` that identifies an architecture.

FedMoE-DA (arXiv 2411.02115) is stated for one MoE layer; a transformer MoE has one per block (or
per ``decoder_sparse_step`` blocks). Each MoE block is one MoE layer of the schema: its router
``mlp.gate`` (Mixtral: ``block_sparse_moe.gate``) is the layer's gate, whose rows are the proxies
of Eq. 8; its routed experts are the layer's experts; everything else — attention, embeddings,
norms, ``lm_head``, dense MLP blocks and Qwen-MoE's *shared expert* and its gate — is a shared
part, averaged by the server. Published checkpoints store one tensor per expert
(``experts.{j}.w1.weight``); ``transformers`` 5 holds them stacked in memory
(``experts.gate_up_proj``, shape (E, 2F, H)) and reads either from disk, so each family has rules
for both.

A user declares another architecture as data (:meth:`Layout.from_dict`, from a YAML/JSON file
given with ``--layout``): the rules, and which ``config.json`` keys hold E and H.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmoe.errors import InputError, ParamError
from fedmoe.model.config import MoEConfig
from fedmoe.model.schema import Layout, Role, TensorRule
from fedmoe.params import check_params, param

# config.json keys that do not change the architecture (tools, versions, runtime switches)
VOLATILE_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_router_logits",
        "_attn_implementation",
        "_attn_implementation_autoset",
    }
)


@dataclass(frozen=True)
class HFArch:
    """One Hugging Face MoE family: its tensor layout and the ``config.json`` keys of E and H."""

    layout: Layout
    experts_keys: tuple[str, ...]  # config.json keys of E (the first present is used)
    hidden_key: str = "hidden_size"  # config.json key of H, the width the router reads

    def num_experts(self, config: Mapping[str, Any]) -> Any:
        """E as ``config`` states it (None when no key is present)."""
        return next((config[k] for k in self.experts_keys if k in config), None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> HFArch:
        """A user-declared architecture::

        name: my-moe
        experts_key: n_routed_experts        # config.json key of E
        hidden_key: hidden_size              # optional
        rules:                               # tried in order, first match wins
          - {pattern: "model.layers.{layer}.moe.router.weight", role: gate, proxy: true}
          - {pattern: "model.layers.{layer}.moe.experts.{expert}.{name}", role: expert}
          - {pattern: "model.layers.{layer}.moe.experts.{name}", role: expert, expert_axis: 0}
          - {pattern: "{name}", role: shared}
        """
        known = {"name", "experts_key", "hidden_key", "rules"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"{where}: unknown key '{unknown[0]}'",
                hint=f"a layout has {', '.join(sorted(known))}",
            )
        rules = data.get("rules")
        if not isinstance(rules, list) or not rules:
            raise InputError(f"{where}: 'rules' must be a non-empty list")
        parsed = []
        for i, rule in enumerate(rules):
            parsed.append(_rule(rule, f"{where}: rules[{i}]"))
        name, experts_key = data.get("name", "custom"), data.get("experts_key")
        hidden_key = data.get("hidden_key", "hidden_size")
        keys = experts_key if isinstance(experts_key, list) and experts_key else [experts_key]
        checks = [("name", name), ("hidden_key", hidden_key), *(("experts_key", k) for k in keys)]
        for key, value in checks:
            if not isinstance(value, str) or not value:
                raise InputError(f"{where}: '{key}' must be a non-empty string (or a list of them)")
        if not any(r.proxy for r in parsed):
            raise InputError(
                f"{where}: no rule has proxy: true", hint="mark the router weight rule"
            )
        return cls(Layout(str(name), tuple(parsed)), tuple(str(k) for k in keys), str(hidden_key))


def _rule(rule: object, where: str) -> TensorRule:
    if not isinstance(rule, Mapping):
        raise InputError(f"{where}: a rule is a mapping with pattern and role")
    unknown = sorted(set(rule) - {"pattern", "role", "proxy", "expert_axis"})
    if unknown:
        raise InputError(f"{where}: unknown key '{unknown[0]}'")
    pattern, role = rule.get("pattern"), rule.get("role")
    if not isinstance(pattern, str) or not pattern:
        raise InputError(f"{where}: 'pattern' must be a non-empty string")
    if role not in {r.value for r in Role}:
        raise InputError(f"{where}: 'role' must be one of {', '.join(r.value for r in Role)}")
    proxy, axis = rule.get("proxy", False), rule.get("expert_axis")
    if not isinstance(proxy, bool):
        raise InputError(f"{where}: 'proxy' must be true or false")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or axis < 0):
        raise InputError(f"{where}: 'expert_axis' must be a non-negative integer")
    if role != Role.SHARED.value and "{layer}" not in pattern:
        raise InputError(f"{where}: a {role} pattern needs {{layer}}")
    if role == Role.EXPERT.value and ("{expert}" in pattern) == (axis is not None):
        raise InputError(
            f"{where}: an expert pattern has either {{expert}} or expert_axis (stacked experts)"
        )
    return TensorRule(pattern, Role(role), expert_axis=axis, proxy=proxy)


def _family(name: str, router: str, experts: str, *experts_keys: str) -> HFArch:
    """A family whose MoE block ``model.layers.{l}.<router>`` / ``<experts>`` holds the router and
    the routed experts; every other tensor the family has is declared shared."""
    block = "model.layers.{index}"
    return HFArch(
        Layout(
            name,
            (
                TensorRule(f"model.layers.{{layer}}.{router}.weight", Role.GATE, proxy=True),
                TensorRule(f"model.layers.{{layer}}.{experts}.{{expert}}.{{name}}", Role.EXPERT),
                TensorRule(
                    f"model.layers.{{layer}}.{experts}.{{name}}", Role.EXPERT, expert_axis=0
                ),
                # the stacked layout transformers 5 holds in memory (and reads back from disk)
                TensorRule("model.layers.{layer}.mlp.gate.weight", Role.GATE, proxy=True),
                TensorRule("model.layers.{layer}.mlp.experts.{name}", Role.EXPERT, expert_axis=0),
                TensorRule("model.embed_tokens.weight", Role.SHARED),
                TensorRule("model.norm.weight", Role.SHARED),
                TensorRule("lm_head.weight", Role.SHARED),
                TensorRule(f"{block}.self_attn.{{name}}", Role.SHARED),
                TensorRule(f"{block}.input_layernorm.weight", Role.SHARED),
                TensorRule(f"{block}.post_attention_layernorm.weight", Role.SHARED),
                TensorRule(f"{block}.mlp.shared_expert.{{name}}", Role.SHARED),
                TensorRule(f"{block}.mlp.shared_expert_gate.weight", Role.SHARED),
                TensorRule(f"{block}.mlp.gate_proj.weight", Role.SHARED),  # dense blocks
                TensorRule(f"{block}.mlp.up_proj.weight", Role.SHARED),
                TensorRule(f"{block}.mlp.down_proj.weight", Role.SHARED),
            ),
        ),
        experts_keys,
    )


HF_ARCHS: dict[str, HFArch] = {
    "mixtral": _family(
        "mixtral", "block_sparse_moe.gate", "block_sparse_moe.experts", "num_local_experts"
    ),
    "qwen2_moe": _family("qwen2_moe", "mlp.gate", "mlp.experts", "num_experts"),
    # transformers 5 writes Qwen3-MoE's E as num_local_experts; published configs say num_experts
    "qwen3_moe": _family(
        "qwen3_moe", "mlp.gate", "mlp.experts", "num_experts", "num_local_experts"
    ),
    "olmoe": _family("olmoe", "mlp.gate", "mlp.experts", "num_experts"),
}
"""Built-in layouts by ``config.json`` ``model_type``."""


@dataclass(frozen=True)
class HFConfig:
    """The architecture of a Hugging Face model: its ``config.json`` without the keys that do not
    change it (:data:`VOLATILE_KEYS`), canonically serialised, so two clients' configs compare
    equal exactly when their models have the same architecture."""

    text: str  # canonical JSON (sorted keys, no volatile keys)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HFConfig:
        """From a parsed ``config.json``."""
        kept = {k: v for k, v in data.items() if k not in VOLATILE_KEYS}
        return cls(json.dumps(kept, sort_keys=True, separators=(",", ":")))

    @property
    def data(self) -> dict[str, Any]:
        """The config as a dict."""
        loaded: dict[str, Any] = json.loads(self.text)
        return loaded

    @property
    def model_type(self) -> str:
        """``model_type`` ('' when the config has none)."""
        return str(self.data.get("model_type", ""))

    @property
    def num_classes(self) -> int:
        """A language model has no class labels (the label share table is empty)."""
        return 0

    def to_json(self) -> str:
        """The canonical JSON text."""
        return self.text

    def differs(self, other: HFConfig) -> str:
        """The first key whose value differs, as ``key: a vs b`` ('' when equal)."""
        a, b = self.data, other.data
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
        return ""


ModelConfig = MoEConfig | HFConfig
"""A model's architecture: fedmoe's built-in classifier, or a Hugging Face model's config."""


class TrainParts(str, enum.Enum):
    """Which tensors a client of a Hugging Face language model trains."""

    ALL = "all"
    EXPERTS = "experts"  # the routed experts and the routers only


@dataclass(frozen=True)
class TinyLM:
    """A small byte-level MoE language model of a Hugging Face family, built offline from its
    ``transformers`` config with random initialisation (``fedmoe init --hf``; a recipe's
    ``model:`` section with ``family``). The one source of these defaults."""

    family: str = param("mixtral", f"Hugging Face MoE family: {', '.join(HF_ARCHS)}")
    embed_dim: int = param(64, "hidden width H (divisible by 4: 4 attention heads)", ge=4)
    expert_hidden: int = param(128, "width of each routed expert's MLP", ge=1)
    num_experts: int = param(4, "routed experts per MoE layer (E)", ge=1)
    top_k: int = param(2, "experts per token", ge=1)
    moe_layers: int = param(2, "transformer blocks, each with one MoE layer", ge=1, le=64)
    trains: TrainParts = param(
        TrainParts.ALL, "which tensors clients train: all, or experts (routed experts and routers)"
    )

    def __post_init__(self) -> None:
        check_params(self)
        if self.family not in HF_ARCHS:
            raise ParamError("family", self.family, f"must be one of {', '.join(HF_ARCHS)}")
        if self.embed_dim % 4:
            raise ParamError("embed_dim", self.embed_dim, "must be divisible by 4")
        if self.top_k > self.num_experts:
            raise ParamError("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")

    def config_json(self) -> dict[str, Any]:
        """The model's ``config.json``."""
        return tiny_lm_config(
            self.family, self.embed_dim, self.expert_hidden, self.moe_layers, self.num_experts,
            self.top_k,
        )  # fmt: skip


def tiny_lm_config(
    family: str, hidden: int, ffn: int, layers: int, experts: int, top_k: int, vocab: int = 256
) -> dict[str, Any]:
    """The ``config.json`` of a small byte-level MoE language model of ``family`` (built offline,
    randomly initialised): ``hidden`` width, expert width ``ffn``, ``layers`` MoE blocks of
    ``experts`` routed experts, ``top_k`` per token, 4 attention heads (2 key/value heads)."""
    if family not in HF_ARCHS:
        raise InputError(
            f"unknown Hugging Face family '{family}'", hint=f"one of {', '.join(HF_ARCHS)}"
        )
    if hidden % 4 or min(hidden, ffn, layers, experts, top_k) < 1 or top_k > experts:
        raise InputError(
            "a tiny language model needs a width divisible by 4 and 1 ≤ top-k ≤ experts"
        )
    common: dict[str, Any] = {
        "model_type": family,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": top_k,
        "max_position_embeddings": 512,
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": None,
    }
    if family == "mixtral":
        return {**common, "intermediate_size": ffn, "num_local_experts": experts}
    moe = {"num_experts": experts, "intermediate_size": ffn, "moe_intermediate_size": ffn}
    if family == "qwen2_moe":
        return {**common, **moe, "shared_expert_intermediate_size": ffn, "decoder_sparse_step": 1}
    if family == "qwen3_moe":
        return {**common, **moe, "head_dim": hidden // 4, "decoder_sparse_step": 1}
    return {**common, "intermediate_size": ffn, "num_experts": experts}
