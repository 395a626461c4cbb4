"""InternLM v1 and InternLM2 in their original remote-code layouts (docs/variants.md §5.4, §5.5).

InternLM v1 uses Llama's tensor names with a bias on q, k, v *and* o (``bias``, default true) and
its own ``rotary`` dict (``origin`` or ``dynamic``). Its cache holds keys before RoPE and every
step re-rotates all of them with the current base; with ``dynamic`` the base grows with the
sequence past ``max_position_embeddings``, so llamakin keeps keys unrotated too
(``rope_cached_keys``; transformers' dynamic RoPE, and InternLM2's, cache rotated keys). InternLM2 renames everything
(``tok_embeddings``, ``attention.wqkv``, ``feed_forward.w1/w3/w2``, ``output``) and groups q, k, v
per KV head inside ``wqkv``.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RopeScaling, eos_ids_from_json, eos_ids_to_json
from ..errors import ConfigError, UnsupportedError
from ..transforms import fused_qkv_to_grouped, grouped_qkv_to_fused
from .base import Family, require
from .hf import HFDecoderFamily
from .tables import Entry, Transformed, meta_style_table, one_source

_M = "model.layers.{i}.attention."
# wqkv groups, per KV head, its query heads then one key and one value head (docs/variants.md §5.5)
_GROUPED = one_source(
    lambda t, c: grouped_qkv_to_fused(t, c.num_heads, c.num_kv_heads),
    lambda t, c: fused_qkv_to_grouped(t, c.num_heads, c.num_kv_heads),
)
INTERNLM2_TABLE: dict[str, Entry] = {
    **meta_style_table(prefix="model."),
    **{
        f"layers.{{i}}.attn.qkv.{s}": Transformed((_M + f"wqkv.{s}",), _GROUPED)
        for s in ("weight", "bias")
    },
    **{f"layers.{{i}}.attn.o_proj.{s}": _M + f"wo.{s}" for s in ("weight", "bias")},
}


def _common(c: dict[str, Any], where: str) -> dict[str, Any]:
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(
            f"{where}: hidden_act {act!r} is not supported (llamakin's SwiGLU uses silu)."
        )
    heads = require(c, "num_attention_heads", where)
    return dict(
        vocab_size=require(c, "vocab_size", where),
        hidden_size=require(c, "hidden_size", where),
        intermediate_size=require(c, "intermediate_size", where),
        num_layers=require(c, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        max_position_embeddings=c.get("max_position_embeddings") or 2048,
        norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=eos_ids_from_json(c.get("eos_token_id")),
        pad_token_id=c.get("pad_token_id"),
    )


def _common_out(config: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos_ids_to_json(config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
    }


class InternLMFamily(HFDecoderFamily):
    """InternLM v1: HF Llama tensor names, so the shared HF rules apply; only the config differs."""

    def config_from_checkpoint(self, c: dict[str, Any]) -> ModelConfig:
        where = "internlm config.json"
        rotary = c.get("rotary") or {}
        kind = rotary.get("type", "origin")
        if kind not in ("origin", "dynamic"):
            raise UnsupportedError(
                f"{where}: rotary type {kind!r} is not supported; InternLM uses origin or dynamic."
            )
        scaling = (
            RopeScaling(type="dynamic", factor=float(rotary.get("scaling_factor", 1.0)))
            if kind == "dynamic"
            else RopeScaling()
        )
        bias = bool(c.get("bias", True))
        try:
            return ModelConfig(
                **_common(c, where),
                rope_theta=float(rotary.get("base", 10000.0)),
                rope_scaling=scaling,
                rope_cached_keys=kind == "dynamic",
                q_bias=bias,
                k_bias=bias,
                v_bias=bias,
                o_bias=bias,
                family=self.name,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        s = config.rope_scaling
        if s.type not in ("default", "dynamic"):
            raise ConfigError(f"InternLM's rotary config has no {s.type} scaling.")
        if s.type == "dynamic" and not config.rope_cached_keys:
            raise ConfigError(
                "InternLM's dynamic rotary re-rotates cached keys whenever its base grows; this model "
                "keeps them rotated with the base they were cached with."
            )
        rotary = {
            "base": config.rope_theta,
            "type": "dynamic" if s.type == "dynamic" else "origin",
            "scaling_factor": s.factor if s.type == "dynamic" else 1.0,
        }
        return {
            "architectures": ["InternLMForCausalLM"],
            "model_type": self.name,
            **_common_out(config),
            "bias": config.q_bias,
            "rotary": rotary,
        }


class InternLM2Family(Family):
    def config_from_checkpoint(self, c: dict[str, Any]) -> ModelConfig:
        where = "internlm2 config.json"
        scaling = c.get("rope_scaling") or {}
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in (None, "dynamic", "linear"):
            raise UnsupportedError(
                f"{where}: rope_scaling type {kind!r} is not supported; InternLM2 uses dynamic or linear."
            )
        bias = bool(c.get("bias", False))
        try:
            return ModelConfig(
                **_common(c, where),
                rope_theta=float(c.get("rope_theta", 10000.0)),
                rope_scaling=RopeScaling(type=kind, factor=float(scaling["factor"]))
                if kind
                else RopeScaling(),
                q_bias=bias,
                k_bias=bias,
                v_bias=bias,
                o_bias=bias,
                family=self.name,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        s = config.rope_scaling
        if s.type not in ("default", "dynamic", "linear"):
            raise ConfigError(f"InternLM2's rope_scaling has no {s.type} type.")
        return {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": self.name,
            **_common_out(config),
            "num_key_value_heads": config.num_kv_heads,
            "bias": config.q_bias,
            "rope_theta": config.rope_theta,
            "rope_scaling": None if s.type == "default" else {"type": s.type, "factor": s.factor},
        }

    def tensor_table(self) -> dict[str, Entry]:
        return INTERNLM2_TABLE


INTERNLM = InternLMFamily(
    name="internlm",
    description="InternLM v1 (remote code; q/k/v/o biases, rotary origin/dynamic)",
    architectures=("InternLMForCausalLM",),
)
INTERNLM2 = InternLM2Family(
    name="internlm2",
    description="InternLM2 (remote code; grouped wqkv)",
    architectures=("InternLM2ForCausalLM",),
    tied_output="output.weight",
)
