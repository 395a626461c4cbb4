"""ChatGLM-6B (v1) and ChatGLM2/3-6B (and GLM-4-9B-chat) in their original remote-code layouts.

Both say ``model_type: chatglm``; :func:`chatglm_family` tells them apart by their keys.

* ChatGLM2/3 (docs/variants.md §6.2): ``multi_query_group_num`` KV groups, one contiguous
  ``query_key_value`` with bias, RoPE on the first half of each head in interleaved pairs with base
  ``10000 * rope_ratio``, fused SwiGLU (gate first), RMSNorm multiplying in float32 before the cast,
  ``padded_vocab_size``, ``output_layer``.
* ChatGLM-6B (docs/variants.md §6.1): LayerNorm, GELU-tanh MLP with biases, a per-head interleaved
  ``query_key_value`` with bias, the residual on the normalised input scaled by ``sqrt(56)`` —
  ``GLMBlock``'s ``num_layers=28`` default, which ``ChatGLMModel`` never overrides, so checkpoints
  of every depth use it — 2-D RoPE whose inverse frequencies are rounded to float16 once while the
  tables follow the model's dtype, and a prefix-LM mask over the prompt up to ``<sop>``.

Exports write every key the original configuration classes and ``forward`` read, as the released
``config.json`` files do (``use_cache``, ``auto_map``, dropout and fusion flags, ...), so the
original modeling files dropped beside an exported checkpoint run it.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import ModelConfig, eos_ids_from_json, eos_ids_to_json
from ..errors import ConfigError, UnsupportedError
from ..transforms import fused_to_per_head_qkv, per_head_qkv_to_fused
from .base import Family, require
from .tables import Entry, Transformed, one_source

# ChatGLM-6B's residual scale: GLMBlock(num_layers=28) by default, never given the model's depth (docs/variants.md §6.1)
CHATGLM6B_ALPHA = math.sqrt(2 * 28)


_E = "transformer.encoder.layers.{i}."
# ChatGLM2/3's names (docs/variants.md §6.2): query_key_value is [q | k | v], dense_h_to_4h gate rows first
CHATGLM2_TABLE: dict[str, Entry] = {
    "embed.weight": "transformer.embedding.word_embeddings.weight",
    "final_norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
    "layers.{i}.attn_norm.weight": _E + "input_layernorm.weight",
    "layers.{i}.mlp_norm.weight": _E + "post_attention_layernorm.weight",
    **{
        f"layers.{{i}}.attn.qkv.{s}": _E + f"self_attention.query_key_value.{s}"
        for s in ("weight", "bias")
    },
    **{
        f"layers.{{i}}.attn.o_proj.{s}": _E + f"self_attention.dense.{s}"
        for s in ("weight", "bias")
    },
    **{f"layers.{{i}}.mlp.gate_up.{s}": _E + f"mlp.dense_h_to_4h.{s}" for s in ("weight", "bias")},
    **{f"layers.{{i}}.mlp.down.{s}": _E + f"mlp.dense_4h_to_h.{s}" for s in ("weight", "bias")},
}

_T = "transformer.layers.{i}."
# ChatGLM-6B's query_key_value interleaves q, k, v per head (docs/variants.md §6.1)
_PER_HEAD = one_source(
    lambda t, config: per_head_qkv_to_fused(t, config.num_heads),
    lambda t, config: fused_to_per_head_qkv(t, config.num_heads),
)
CHATGLM6B_TABLE: dict[str, Entry] = {
    "embed.weight": "transformer.word_embeddings.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"final_norm.{s}": f"transformer.final_layernorm.{s}" for s in ("weight", "bias")},
    **{
        k: v
        for s in ("weight", "bias")
        for k, v in {
            f"layers.{{i}}.attn_norm.{s}": _T + f"input_layernorm.{s}",
            f"layers.{{i}}.mlp_norm.{s}": _T + f"post_attention_layernorm.{s}",
            f"layers.{{i}}.attn.qkv.{s}": Transformed(
                (_T + f"attention.query_key_value.{s}",), _PER_HEAD
            ),
            f"layers.{{i}}.attn.o_proj.{s}": _T + f"attention.dense.{s}",
            f"layers.{{i}}.mlp.up.{s}": _T + f"mlp.dense_h_to_4h.{s}",
            f"layers.{{i}}.mlp.down.{s}": _T + f"mlp.dense_4h_to_h.{s}",
        }.items()
    },
}


def _auto_map(version: int) -> dict[str, str]:
    """The released configs' ``auto_map`` (which original file and class transformers loads)."""
    model = "modeling_chatglm.ChatGLMForConditionalGeneration"
    out = {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": model}
    if version == 2:
        out["AutoModelForCausalLM"] = model
    out["AutoModelForSeq2SeqLM"] = model
    if version == 2:
        out["AutoModelForSequenceClassification"] = (
            "modeling_chatglm.ChatGLMForSequenceClassification"
        )
    return out


class ChatGLM2Family(Family):
    def config_from_checkpoint(self, c: dict[str, Any]) -> ModelConfig:
        where = "chatglm config.json"
        for key, needed in (
            ("rmsnorm", True),
            ("post_layer_norm", True),
            ("apply_residual_connection_post_layernorm", False),
        ):
            if bool(c.get(key, needed)) != needed:
                raise UnsupportedError(
                    f"{where}: {key}={c.get(key)} is not supported (released ChatGLM2/3 use {needed})."
                )
        heads = require(c, "num_attention_heads", where)
        head_dim = c.get("kv_channels") or require(c, "hidden_size", where) // heads
        linear_bias = bool(c.get("add_bias_linear", False))
        qkv_bias = linear_bias or bool(c.get("add_qkv_bias", False))
        try:
            return ModelConfig(
                vocab_size=c.get("padded_vocab_size") or require(c, "vocab_size", where),
                hidden_size=require(c, "hidden_size", where),
                num_layers=require(c, "num_layers", where),
                num_heads=heads,
                head_dim=head_dim,
                num_kv_heads=c.get("multi_query_group_num", heads)
                if c.get("multi_query_attention")
                else heads,
                intermediate_size=require(c, "ffn_hidden_size", where),
                max_position_embeddings=c.get("seq_length") or 2048,
                norm_eps=c.get("layernorm_epsilon", 1e-5),
                rmsnorm_order="mul_then_cast",
                rope_layout="interleaved",
                rotary_dim=head_dim // 2,
                rope_theta=10000.0 * float(c.get("rope_ratio", 1.0)),
                q_bias=qkv_bias,
                k_bias=qkv_bias,
                v_bias=qkv_bias,
                o_bias=linear_bias,
                mlp_bias=linear_bias,
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                eos_token_ids=eos_ids_from_json(c.get("eos_token_id")),
                pad_token_id=c.get("pad_token_id"),
                family=self.name,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        if config.q_bias != config.k_bias or config.k_bias != config.v_bias:
            raise ConfigError("ChatGLM2 biases q, k and v together.")
        return {
            "architectures": ["ChatGLMModel"],
            "model_type": "chatglm",
            "auto_map": _auto_map(2),
            # read by the original code with no default in its config class (forward: config.use_cache)
            "use_cache": True,
            # the released config's fixed switches (ChatGLMConfig defaults differ for some)
            "apply_query_key_layer_scaling": True,
            "attention_softmax_in_fp32": True,
            "fp32_residual_connection": False,
            "bias_dropout_fusion": True,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "classifier_dropout": None,
            "quantization_bit": 0,
            "pre_seq_len": None,
            "prefix_projection": False,
            "padded_vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "kv_channels": config.head_dim,
            "multi_query_attention": config.num_kv_heads != config.num_heads,
            "multi_query_group_num": config.num_kv_heads,
            "ffn_hidden_size": config.intermediate_size,
            "seq_length": config.max_position_embeddings,
            "layernorm_epsilon": config.norm_eps,
            "rmsnorm": True,
            "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": False,
            "add_bias_linear": config.o_bias,
            "add_qkv_bias": config.q_bias,
            "rope_ratio": config.rope_theta / 10000.0,
            "original_rope": True,
            "tie_word_embeddings": config.tie_word_embeddings,
            "eos_token_id": eos_ids_to_json(config.eos_token_ids),
            "pad_token_id": config.pad_token_id,
        }

    def tensor_table(self) -> dict[str, Entry]:
        return CHATGLM2_TABLE


class ChatGLM1Family(Family):
    def config_from_checkpoint(self, c: dict[str, Any]) -> ModelConfig:
        where = "chatglm-6b config.json"
        if not c.get("position_encoding_2d", True):
            raise UnsupportedError(
                f"{where}: position_encoding_2d=false is not supported (ChatGLM-6B uses 2-D RoPE)."
            )
        layers = require(c, "num_layers", where)
        hidden = require(c, "hidden_size", where)
        sop = c.get("bos_token_id", 130004)
        try:
            return ModelConfig(
                vocab_size=require(c, "vocab_size", where),
                hidden_size=hidden,
                num_layers=layers,
                num_heads=require(c, "num_attention_heads", where),
                intermediate_size=c.get("inner_hidden_size") or 4 * hidden,
                max_position_embeddings=c.get("max_sequence_length") or 2048,
                norm_type="layernorm",
                norm_eps=c.get("layernorm_epsilon", 1e-5),
                mlp_type="gelu_tanh",
                mlp_bias=True,
                q_bias=True,
                k_bias=True,
                v_bias=True,
                o_bias=True,
                rope_layout="glm2d",
                rope_inv_freq_dtype="float16",
                rope_table_dtype="model",
                normed_residual_alpha=CHATGLM6B_ALPHA,
                prefix_lm=True,
                mask_token_ids=(c.get("gmask_token_id", 130001), c.get("mask_token_id", 130000)),
                sop_token_id=sop,
                bos_token_id=sop,
                # no tie_word_embeddings key in the released config: transformers' default (True) ties
                tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
                eos_token_ids=eos_ids_from_json(c.get("eos_token_id")),
                pad_token_id=c.get("pad_token_id"),
                family=self.name,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        if config.normed_residual_alpha != CHATGLM6B_ALPHA:
            raise ConfigError(
                f"ChatGLM-6B's code scales its residuals by sqrt(56) whatever the depth; this model "
                f"uses {config.normed_residual_alpha}."
            )
        if (config.rope_inv_freq_dtype, config.rope_table_dtype) != ("float16", "model"):
            raise ConfigError(
                "ChatGLM-6B's code rounds its RoPE frequencies to float16 and builds its tables in the "
                "model's dtype; this model does not."
            )
        gmask, mask = (config.mask_token_ids + (None, None))[:2]
        return {
            "architectures": ["ChatGLMModel"],
            "model_type": "chatglm",
            "auto_map": _auto_map(1),
            "use_cache": True,
            "quantization_bit": 0,
            "pre_seq_len": None,
            "prefix_projection": False,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "inner_hidden_size": config.intermediate_size,
            "max_sequence_length": config.max_position_embeddings,
            "layernorm_epsilon": config.norm_eps,
            "position_encoding_2d": True,
            "bos_token_id": config.sop_token_id,
            "eos_token_id": config.eos_token_ids[0] if config.eos_token_ids else None,
            "gmask_token_id": gmask,
            "mask_token_id": mask,
            "pad_token_id": config.pad_token_id,
            "tie_word_embeddings": config.tie_word_embeddings,
        }

    def tensor_table(self) -> dict[str, Entry]:
        return CHATGLM6B_TABLE


CHATGLM = ChatGLM1Family(
    name="chatglm",
    description="ChatGLM-6B v1 (remote code; 2-D RoPE, prefix LM, alpha residual)",
    architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    ignored=(r"(^|\.)rotary_emb\.inv_freq$",),
)
CHATGLM2 = ChatGLM2Family(
    name="chatglm2",
    description="ChatGLM2/3-6B, GLM-4-9B-chat (remote code; MQA groups, half RoPE)",
    architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    ignored=(r"(^|\.)rotary_pos_emb\.inv_freq$",),
    tied_output="transformer.output_layer.weight",
)


def chatglm_family(config: dict[str, Any]) -> Family:
    """ChatGLM2/3 configs carry keys v1 never had (``padded_vocab_size``, ``multi_query_attention``, ...)."""
    v2_keys = (
        "padded_vocab_size",
        "multi_query_attention",
        "multi_query_group_num",
        "ffn_hidden_size",
        "kv_channels",
    )
    return CHATGLM2 if any(k in config for k in v2_keys) else CHATGLM
