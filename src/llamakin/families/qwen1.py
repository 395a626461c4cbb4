"""Qwen (v1) in its original remote-code layout (``model_type: qwen``, ``QWenLMHeadModel``, docs/variants.md §5.1).

Traps this adapter handles: ``c_attn`` is one fused ``[q | k | v]`` matrix that always has a bias;
``intermediate_size`` is *twice* the MLP width; SiLU is applied to ``w2`` (the gate), not ``w1``;
``kv_channels`` is the head dim, ``rotary_pct`` the rotary fraction. The inference-only extras
``use_logn_attn`` and ``use_dynamic_ntk`` become the ``logn_attention_length`` knob and
``qwen_dynamic`` RoPE scaling, both keyed to ``seq_length`` and ignored in training.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RopeScaling, eos_ids_from_json
from ..errors import ConfigError
from .base import Family, require
from .tables import Entry

_H = "transformer.h.{i}."
QWEN1_TABLE: dict[str, Entry] = {
    "embed.weight": "transformer.wte.weight",
    "final_norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": _H + "ln_1.weight",
    "layers.{i}.mlp_norm.weight": _H + "ln_2.weight",
    # already [q | k | v]
    **{f"layers.{{i}}.attn.qkv.{s}": _H + f"attn.c_attn.{s}" for s in ("weight", "bias")},
    **{f"layers.{{i}}.attn.o_proj.{s}": _H + f"attn.c_proj.{s}" for s in ("weight", "bias")},
    # the naming trap: SiLU is applied to w2, so w2 is the gate and w1 the up projection
    **{
        f"layers.{{i}}.mlp.gate_up.{s}": (_H + f"mlp.w2.{s}", _H + f"mlp.w1.{s}")
        for s in ("weight", "bias")
    },
    **{f"layers.{{i}}.mlp.down.{s}": _H + f"mlp.c_proj.{s}" for s in ("weight", "bias")},
}


class Qwen1Family(Family):
    def config_from_checkpoint(self, c: dict[str, Any]) -> ModelConfig:
        where = "qwen config.json"
        hidden, heads = require(c, "hidden_size", where), require(c, "num_attention_heads", where)
        head_dim = c.get("kv_channels") or hidden // heads
        doubled = c.get("intermediate_size") or require(c, "ffn_hidden_size", where)
        trained = c.get("seq_length") or 2048
        no_bias = bool(c.get("no_bias", True))
        eos = c.get("eos_token_id")
        try:
            return ModelConfig(
                vocab_size=require(c, "vocab_size", where),
                hidden_size=hidden,
                num_layers=require(c, "num_hidden_layers", where),
                num_heads=heads,
                head_dim=head_dim,
                intermediate_size=doubled // 2,
                max_position_embeddings=c.get("max_position_embeddings") or trained,
                norm_eps=c.get("layer_norm_epsilon", 1e-6),
                rope_theta=float(c.get("rotary_emb_base", 10000.0)),
                rotary_dim=int(head_dim * c.get("rotary_pct", 1.0)),
                rope_scaling=(
                    RopeScaling(type="qwen_dynamic", original_max_position_embeddings=trained)
                    if c.get("use_dynamic_ntk")
                    else RopeScaling()
                ),
                logn_attention_length=trained if c.get("use_logn_attn") else None,
                q_bias=True,
                k_bias=True,
                v_bias=True,
                o_bias=not no_bias,
                mlp_bias=not no_bias,
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                eos_token_ids=eos_ids_from_json(eos),
                family=self.name,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        trained = (
            config.rope_scaling.original_max_position_embeddings
            or config.logn_attention_length
            or config.max_position_embeddings
        )
        if config.o_bias != config.mlp_bias:
            raise ConfigError(
                "Qwen v1's no_bias switches the o and MLP biases together; they differ here."
            )
        out = {
            "architectures": ["QWenLMHeadModel"],
            "model_type": self.name,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "kv_channels": config.head_dim,
            "intermediate_size": 2 * config.intermediate_size,
            "layer_norm_epsilon": config.norm_eps,
            "seq_length": trained,
            "max_position_embeddings": config.max_position_embeddings,
            "rotary_emb_base": config.rope_theta,
            "rotary_pct": config.rotary_dim / config.head_dim,
            "no_bias": not config.o_bias,
            "tie_word_embeddings": config.tie_word_embeddings,
            "use_dynamic_ntk": config.rope_scaling.type == "qwen_dynamic",
            "use_logn_attn": config.logn_attention_length is not None,
        }
        if config.eos_token_ids:
            out["eos_token_id"] = config.eos_token_ids[0]
        return out

    def tensor_table(self) -> dict[str, Entry]:
        return QWEN1_TABLE

    def unsupported(self, config: ModelConfig) -> str | None:
        if config.num_kv_heads != config.num_heads:
            return "Qwen v1 has no grouped KV heads"
        return super().unsupported(config)


FAMILY = Qwen1Family(
    name="qwen",
    description="Qwen v1 (remote-code QWenLMHeadModel: fused c_attn, w2 = gate, logn/NTK)",
    architectures=("QWenLMHeadModel",),
)
