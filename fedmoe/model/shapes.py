"""The tensor names and shapes of the built-in classifier, computed from its config alone.

Opening a checkpoint checks its tensors against these shapes; computing them needs no torch (the
server-side commands that only read gates never import it). ``tests/test_model.py`` checks them
against the state dict of a model built from the same config.
"""

from __future__ import annotations

from functools import lru_cache

from fedmoe.model.config import MoEConfig
from fedmoe.model.schema import FEDMOE_LAYOUT, ModelSchema


def _linear(prefix: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (fan_out, fan_in), f"{prefix}.bias": (fan_out,)}


def _embed(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    if cfg.embed == "cnn":  # see fedmoe.model.embed.CNNEmbed
        channels, height, width = cfg.input_shape
        c = max(4, cfg.embed_hidden // 8)
        return {
            "embed.conv1.weight": (c, channels, 3, 3),
            "embed.conv1.bias": (c,),
            "embed.conv2.weight": (2 * c, c, 3, 3),
            "embed.conv2.bias": (2 * c,),
            **_linear("embed.fc", 2 * c * (height // 2) * (width // 2), cfg.embed_dim),
        }
    return {  # see fedmoe.model.embed.MLPEmbed
        **_linear("embed.fc1", cfg.input_size, cfg.embed_hidden),
        **_linear("embed.fc2", cfg.embed_hidden, cfg.embed_dim),
    }


def _moe(prefix: str, cfg: MoEConfig, out_dim: int) -> dict[str, tuple[int, ...]]:
    e, h, f = cfg.num_experts, cfg.embed_dim, cfg.expert_hidden
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}gate.weight": (e, h)}
    if cfg.gate_bias:
        shapes[f"{prefix}gate.bias"] = (e,)
    shapes.update(
        {
            f"{prefix}experts.w1": (e, h, f),
            f"{prefix}experts.b1": (e, f),
            f"{prefix}experts.w2": (e, f, out_dim),
            f"{prefix}experts.b2": (e, out_dim),
        }
    )
    return shapes


@lru_cache(maxsize=64)
def expected_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a model of ``cfg`` has."""
    shapes = _embed(cfg)
    for layer in range(cfg.moe_layers - 1):
        shapes.update(_moe(f"blocks.{layer}.", cfg, cfg.embed_dim))
    shapes.update(_moe("", cfg, cfg.num_classes))
    return shapes


@lru_cache(maxsize=64)
def schema_for(cfg: MoEConfig) -> ModelSchema:
    """The :class:`ModelSchema` of the built-in classifier of ``cfg`` (float32 tensors)."""
    return FEDMOE_LAYOUT.resolve(expected_shapes(cfg))
