"""Representative configs of well-known checkpoints, for ``llamakin arch-diff`` by name.

Each entry is the checkpoint's own config (``config.json`` or Meta ``params.json`` keys, sizes as
published), read through its family adapter exactly like a downloaded checkpoint would be.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig
from .errors import UnsupportedError
from .families import get_family

_LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2)

REFERENCE_CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama2-7b": ("llama", _LLAMA2_7B, "Llama-2-7B (HF layout)"),
    "llama2-7b-meta": ("meta", dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-5,
                                    vocab_size=32000), "Llama-2-7B (Meta params.json)"),
    "llama3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                  rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                  rope_theta=500000.0), "Llama-3.1-8B"),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2), "SmolLM2-135M"),
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096), "Mistral-7B-v0.1"),
    "granite-3.1-2b": ("granite", dict(vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=40,
                                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                       rms_norm_eps=1e-5, rope_theta=5000000.0, tie_word_embeddings=True,
                                       embedding_multiplier=12.0, attention_multiplier=0.015625,
                                       residual_multiplier=0.22, logits_scaling=8.0), "Granite-3.1-2B"),
    "granite-3b-code": ("llama", dict(vocab_size=49152, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                                      rms_norm_eps=1e-5, rope_theta=10000000.0, tie_word_embeddings=True,
                                      attention_bias=True, mlp_bias=True), "Granite-3B-Code (LlamaForCausalLM with biases)"),
    "qwen2-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                               rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
                               sliding_window=131072, max_window_layers=28), "Qwen2-7B"),
    "qwen3-8b": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                               attention_bias=False), "Qwen3-8B"),
    "diffllama": ("diffllama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=32, head_dim=64,
                                    max_position_embeddings=2048, rms_norm_eps=1e-5), "DiffLlama (transformers defaults)"),
    "glm-4-9b": ("glm", dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                             num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                             max_position_embeddings=131072, rms_norm_eps=1.5625e-07, rope_theta=5000000.0,
                             partial_rotary_factor=0.5, attention_bias=True), "GLM-4-9B-chat (HF glm)"),
    "glm-4-9b-0414": ("glm4", dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                                   num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                                   max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   partial_rotary_factor=0.5, attention_bias=True), "GLM-4-9B-0414 (HF glm4)"),
    "qwen-7b": ("qwen", dict(vocab_size=151936, hidden_size=4096, num_attention_heads=32, num_hidden_layers=32,
                             kv_channels=128, intermediate_size=22016, layer_norm_epsilon=1e-6, seq_length=8192,
                             max_position_embeddings=8192, rotary_emb_base=10000, rotary_pct=1.0, no_bias=True,
                             use_dynamic_ntk=True, use_logn_attn=True), "Qwen-7B (v1, remote code)"),
    "internlm-7b": ("internlm", dict(vocab_size=103168, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                                     rms_norm_eps=1e-6, bias=True, rotary={"base": 10000, "type": "dynamic",
                                                                           "scaling_factor": 1.0}),
                    "InternLM-7B (v1, remote code; rotary values are the class defaults)"),
    "internlm2-7b": ("internlm2", dict(vocab_size=92544, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000,
                                       bias=False, rope_scaling={"type": "dynamic", "factor": 2.0}),
                     "InternLM2-7B (remote code)"),
    "chatglm-6b": ("chatglm", dict(hidden_size=4096, num_layers=28, num_attention_heads=32, inner_hidden_size=16384,
                                   layernorm_epsilon=1e-5, vocab_size=130528, max_sequence_length=2048,
                                   position_encoding_2d=True, bos_token_id=130004, eos_token_id=130005,
                                   mask_token_id=130000, gmask_token_id=130001, pad_token_id=3),
                   "ChatGLM-6B (v1, remote code)"),
    "chatglm2-6b": ("chatglm2", dict(hidden_size=4096, num_layers=28, num_attention_heads=32, kv_channels=128,
                                     multi_query_attention=True, multi_query_group_num=2, ffn_hidden_size=13696,
                                     padded_vocab_size=65024, seq_length=32768, layernorm_epsilon=1e-5, rmsnorm=True,
                                     add_bias_linear=False, add_qkv_bias=True, post_layer_norm=True,
                                     apply_residual_connection_post_layernorm=False), "ChatGLM2-6B (remote code)"),
    "glm-4-9b-chat": ("chatglm2", dict(hidden_size=4096, num_layers=40, num_attention_heads=32, kv_channels=128,
                                       multi_query_attention=True, multi_query_group_num=2, ffn_hidden_size=13696,
                                       padded_vocab_size=151552, seq_length=131072, layernorm_epsilon=1.5625e-07,
                                       rmsnorm=True, add_bias_linear=False, add_qkv_bias=True, post_layer_norm=True,
                                       rope_ratio=500), "GLM-4-9B-chat (original ChatGLM layout)"),
    "diff-transformer": ("diff_transformer", dict(vocab_size=32000, embed_dim=2048, num_layers=16, num_heads=16,
                                                  num_kv_heads=None, ffn_dim=8192, norm_eps=1e-5),
                         "Differential Transformer, unilm layout (16 pairs = a 32-head baseline)"),
}
# A family name alone means its best-known checkpoint.
ALIASES = {"llama": "llama2-7b", "meta": "llama2-7b-meta", "mistral": "mistral-7b", "granite": "granite-3.1-2b",
           "granite-code": "granite-3b-code", "qwen2": "qwen2-7b", "qwen3": "qwen3-8b", "glm": "glm-4-9b",
           "glm4": "glm-4-9b-0414", "llama3": "llama3.1-8b", "smollm2": "smollm2-135m", "qwen": "qwen-7b",
           "qwen1": "qwen-7b", "internlm": "internlm-7b", "internlm2": "internlm2-7b", "chatglm": "chatglm-6b",
           "chatglm2": "chatglm2-6b", "chatglm3": "chatglm2-6b", "diff_transformer": "diff-transformer",
           "unilm-diff": "diff-transformer"}


def reference_config(name: str) -> tuple[ModelConfig, str]:
    """The knobs and description of a named reference checkpoint."""
    key = ALIASES.get(name, name)
    if key not in REFERENCE_CONFIGS:
        known = sorted(set(REFERENCE_CONFIGS) | set(ALIASES))
        raise UnsupportedError(f"{name!r} is neither a checkpoint path nor a known reference; known names: {', '.join(known)}.")
    family, raw, description = REFERENCE_CONFIGS[key]
    return get_family(family).config_from_checkpoint(raw), description
