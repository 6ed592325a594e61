"""The model configuration, stored inside every checkpoint (``model_config`` metadata)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from fedmoe.errors import InputError, ParamError, UsageError

EMBEDDINGS = ("mlp", "cnn")

# size limits: a config read from an untrusted checkpoint or manifest cannot make fedmoe build an
# absurd model (beyond them a config is refused, naming the key)
MAXIMUM = {
    "num_classes": 1 << 20,
    "embed_hidden": 1 << 16,
    "embed_dim": 1 << 16,
    "num_experts": 1 << 12,
    "top_k": 1 << 12,
    "expert_hidden": 1 << 16,
    "moe_layers": 256,
}
MAX_INPUT_SIZE = 1 << 28  # features per sample


@dataclass(frozen=True)
class MoEConfig:
    """Architecture of the MoE classifier (FedMoE-DA, arXiv 2411.02115, Sec. III: an embedding
    network φ, a gating network G, and E experts θ_1..θ_E of which the top-k run per sample)."""

    input_shape: tuple[int, ...]  # shape of one sample, e.g. (1, 8, 8)
    num_classes: int  # C: each expert outputs C class logits
    embed: str = "mlp"  # embedding network φ: "mlp" or "cnn" (image inputs (C, H, W))
    embed_hidden: int = 128  # φ's hidden width (MLP) or first conv channels (CNN)
    embed_dim: int = 64  # H: width of the embedding the gate and experts read
    num_experts: int = 8  # E
    top_k: int = 2  # experts run per sample
    expert_hidden: int = 64  # F: hidden width of each expert's two-layer MLP
    gate_bias: bool = False  # a bias on the gate (the proxies of Eq. 8 are the weight rows)
    moe_layers: int = 1  # L: MoE layers; the first L-1 map H → H (residual), the last classifies

    def __post_init__(self) -> None:
        ints = (
            "num_classes",
            "embed_hidden",
            "embed_dim",
            "num_experts",
            "top_k",
            "expert_hidden",
            "moe_layers",
        )
        for key in ints:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamError(key, value, "must be an integer")
        if not isinstance(self.gate_bias, bool):
            raise ParamError("gate_bias", self.gate_bias, "must be true or false")
        shape = self.input_shape
        if (
            not isinstance(shape, tuple)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
            or not shape
        ):
            raise ParamError("input_shape", shape, "must be a list of positive integers")
        minimum = {
            "num_classes": 2,
            "embed_hidden": 1,
            "embed_dim": 1,
            "num_experts": 1,
            "top_k": 1,
            "expert_hidden": 1,
            "moe_layers": 1,
        }
        for key, low in minimum.items():
            if getattr(self, key) < low:
                raise ParamError(key, getattr(self, key), f"must be >= {low}")
            if getattr(self, key) > MAXIMUM[key]:
                raise ParamError(key, getattr(self, key), f"must be <= {MAXIMUM[key]}")
        if len(shape) > 8 or self.input_size > MAX_INPUT_SIZE:
            raise ParamError(
                "input_shape", list(shape), f"must have at most 8 axes and {MAX_INPUT_SIZE} values"
            )
        if self.top_k > self.num_experts:
            raise ParamError(
                "top_k", self.top_k, f"must be at most num_experts = {self.num_experts}"
            )
        if self.embed not in EMBEDDINGS:
            raise ParamError("embed", self.embed, f"must be one of {', '.join(EMBEDDINGS)}")
        if self.embed == "cnn" and (len(self.input_shape) != 3 or min(self.input_shape[1:]) < 2):
            raise UsageError(
                f"model config: embed 'cnn' needs image inputs (channels, height ≥ 2, width ≥ 2), "
                f"got input_shape {list(self.input_shape)}",
                hint="use embed: mlp for flat features",
            )

    @property
    def input_size(self) -> int:
        """Number of input features (product of ``input_shape``)."""
        size = 1
        for s in self.input_shape:
            size *= s
        return size

    def check_data(self, input_shape: tuple[int, ...], num_classes: int, where: str) -> None:
        """Refuse data whose sample shape or class count does not fit the model (exit 3)."""
        if tuple(input_shape) != tuple(self.input_shape):
            raise InputError(
                f"{where}: the model takes inputs of shape {list(self.input_shape)}, the data has "
                f"{list(input_shape)}",
                hint="initialise the model from this partition (fedmoe init --partition ...)",
            )
        if num_classes != self.num_classes:
            raise InputError(
                f"{where}: the model has {self.num_classes} classes, the data {num_classes}",
                hint="initialise the model from this partition (fedmoe init --partition ...)",
            )

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the same config always gives the same string."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> MoEConfig:
        """Validate a mapping into a config; unknown keys are errors naming the key. Keys absent
        from ``data`` take the defaults declared above (the one source of model defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise UsageError(
                    f"{where}: unknown key '{key}' (valid: {', '.join(sorted(names))})"
                )
        if "input_shape" not in data or "num_classes" not in data:
            raise UsageError(f"{where}: needs input_shape and num_classes")
        kwargs = dict(data)
        shape = data["input_shape"]
        if not isinstance(shape, (list, tuple)):
            raise UsageError(f"{where}: input_shape must be a list of integers, got {shape!r}")
        kwargs["input_shape"] = tuple(shape)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str, where: str) -> MoEConfig:
        """Parse the ``model_config`` metadata of a checkpoint."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise InputError(f"{where}: model_config metadata is not valid JSON") from None
        try:
            return cls.from_dict(data, where)
        except (UsageError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: bad model_config ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``input_shape`` as a list)."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d
