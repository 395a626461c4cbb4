"""GGUF (llama.cpp) checkpoints of the ``llama``, ``qwen2`` and ``qwen3`` architectures.

The "config" of a GGUF checkpoint is its key-value metadata plus the list of its tensor names
(under ``tensor_names``: a file without ``output.weight`` ties its output to the embedding).
llama.cpp's converter stores the q and k rows of ``llama`` models in the interleaved (Meta) RoPE
order; loading un-permutes them into rotate_half order, as transformers' GGUF loader does, and
export permutes them back (docs/variants.md §2.3). ``qwen2``/``qwen3`` files keep HF's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig, RopeScaling
from ..errors import ConfigError, UnsupportedError
from ..transforms import half_to_interleaved, interleaved_to_half
from .base import Family, TensorRule, require
from .tables import Entry, Transformed

TENSOR_NAMES = "tensor_names"


def _interleaved_qk(canonical: str, names: tuple[str, ...], config: ModelConfig) -> TensorRule:
    """q, k, v stored separately, the q and k rows in interleaved RoPE order (weights or biases)."""
    H, Hkv, hd, rd = config.num_heads, config.num_kv_heads, config.head_dim, config.rotary_dim
    sizes = (H * hd, Hkv * hd, Hkv * hd)

    def to_canonical(parts: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        return torch.cat((interleaved_to_half(q, H, rd), interleaved_to_half(k, Hkv, rd), v))

    def from_canonical(t: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = t.split(sizes)
        return [half_to_interleaved(q, H, rd), half_to_interleaved(k, Hkv, rd), v]

    return TensorRule(canonical, names, to_canonical, from_canonical)


_B = "blk.{i}."
# llama.cpp's tensor names (gguf-py's tensor_mapping), the layout shared by its llama/qwen2/qwen3 graphs
GGUF_TABLE: dict[str, Entry] = {
    "embed.weight": "token_embd.weight",
    "final_norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{i}.attn_norm.weight": _B + "attn_norm.weight",
    "layers.{i}.mlp_norm.weight": _B + "ffn_norm.weight",
    "layers.{i}.attn.qkv.weight": tuple(_B + f"attn_{p}.weight" for p in "qkv"),
    "layers.{i}.attn.o_proj.weight": _B + "attn_output.weight",
    "layers.{i}.mlp.gate_up.weight": (_B + "ffn_gate.weight", _B + "ffn_up.weight"),
    "layers.{i}.mlp.down.weight": _B + "ffn_down.weight",
}
QKV_BIAS: dict[str, Entry] = {
    "layers.{i}.attn.qkv.bias": tuple(_B + f"attn_{p}.bias" for p in "qkv")
}
QK_NORM: dict[str, Entry] = {
    "layers.{i}.attn.q_norm.weight": _B + "attn_q_norm.weight",
    "layers.{i}.attn.k_norm.weight": _B + "attn_k_norm.weight",
}


@dataclass
class GGUFFamily(Family):
    """One llama.cpp architecture."""

    arch: str = "llama"
    permute_qk: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False

    def config_from_checkpoint(self, meta: dict[str, Any]) -> ModelConfig:
        where = "GGUF metadata"
        p = f"{self.arch}."
        hidden = require(meta, p + "embedding_length", where)
        heads = require(meta, p + "attention.head_count", where)
        head_dim = meta.get(p + "attention.key_length") or hidden // heads
        names = set(meta.get(TENSOR_NAMES, ()))
        if "rope_freqs.weight" in names:
            raise UnsupportedError(
                "this GGUF stores RoPE frequency factors (rope_freqs.weight, Llama 3.1 style), "
                "which llamakin does not read yet; use the Hugging Face checkpoint instead."
            )
        scaling_type = meta.get(p + "rope.scaling.type", "none")
        if scaling_type in ("none", None):
            scaling = RopeScaling()
        elif scaling_type in ("linear", "yarn"):
            scaling = RopeScaling(
                type=scaling_type,
                factor=float(require(meta, p + "rope.scaling.factor", where)),
                original_max_position_embeddings=meta.get(
                    p + "rope.scaling.original_context_length"
                ),
            )
        else:
            raise UnsupportedError(f"{where}: RoPE scaling {scaling_type!r} is not supported.")
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = meta.get(p + "vocab_size") or (len(tokens) if tokens else None)
        if not vocab:
            raise ConfigError(
                f"{where} gives no vocabulary size ({p}vocab_size or tokenizer.ggml.tokens)."
            )
        eos = [
            meta[k]
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if k in meta
        ]
        try:
            return ModelConfig(
                vocab_size=int(vocab),
                hidden_size=hidden,
                num_layers=require(meta, p + "block_count", where),
                num_heads=heads,
                num_kv_heads=meta.get(p + "attention.head_count_kv") or heads,
                head_dim=head_dim,
                intermediate_size=require(meta, p + "feed_forward_length", where),
                max_position_embeddings=meta.get(p + "context_length") or 2048,
                norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
                rotary_dim=meta.get(p + "rope.dimension_count") or head_dim,
                rope_scaling=scaling,
                q_bias=self.qkv_bias,
                k_bias=self.qkv_bias,
                v_bias=self.qkv_bias,
                qk_norm=self.qk_norm,
                tie_word_embeddings="output.weight" not in names,
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=tuple(dict.fromkeys(eos)),
                pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
                family=self.name,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        p = f"{self.arch}."
        meta: dict[str, Any] = {
            "general.architecture": self.arch,
            p + "vocab_size": config.vocab_size,
            p + "context_length": config.max_position_embeddings,
            p + "embedding_length": config.hidden_size,
            p + "block_count": config.num_layers,
            p + "feed_forward_length": config.intermediate_size,
            p + "attention.head_count": config.num_heads,
            p + "attention.head_count_kv": config.num_kv_heads,
            p + "attention.layer_norm_rms_epsilon": config.norm_eps,
            p + "rope.freq_base": config.rope_theta,
            p + "rope.dimension_count": config.rotary_dim,
        }
        if config.head_dim * config.num_heads != config.hidden_size:
            meta[p + "attention.key_length"] = meta[p + "attention.value_length"] = config.head_dim
        s = config.rope_scaling
        if s.type != "default":
            meta[p + "rope.scaling.type"] = s.type
            meta[p + "rope.scaling.factor"] = s.factor
            if s.original_max_position_embeddings is not None:
                meta[p + "rope.scaling.original_context_length"] = (
                    s.original_max_position_embeddings
                )
        if config.bos_token_id is not None:
            meta["tokenizer.ggml.bos_token_id"] = config.bos_token_id
        if config.eos_token_ids:
            meta["tokenizer.ggml.eos_token_id"] = config.eos_token_ids[0]
        if len(config.eos_token_ids) > 1:
            meta["tokenizer.ggml.eot_token_id"] = config.eos_token_ids[1]
        if config.pad_token_id is not None:
            meta["tokenizer.ggml.padding_token_id"] = config.pad_token_id
        meta[TENSOR_NAMES] = [n for r in self.tensor_rules(config) for n in r.sources]
        return meta

    def unsupported(self, config: ModelConfig) -> str | None:
        if len(config.eos_token_ids) > 2:
            config = config.replace(eos_token_ids=config.eos_token_ids[:2])
        # GGUF keeps only type, factor, original context
        if config.rope_scaling.type in (
            "linear",
            "yarn",
        ):
            s = config.rope_scaling
            config = config.replace(
                rope_scaling=RopeScaling(
                    type=s.type,
                    factor=s.factor,
                    original_max_position_embeddings=s.original_max_position_embeddings,
                )
            )
        return super().unsupported(config)

    def tensor_table(self) -> dict[str, Entry]:
        table = {
            **GGUF_TABLE,
            **(QKV_BIAS if self.qkv_bias else {}),
            **(QK_NORM if self.qk_norm else {}),
        }
        # llama.cpp's converter stores llama's q/k rows in Meta's interleaved order
        if self.permute_qk:
            for key in ("layers.{i}.attn.qkv.weight", "layers.{i}.attn.qkv.bias"):
                if key in table:
                    table[key] = Transformed(table[key], _interleaved_qk)
        return table


LLAMA = GGUFFamily(
    name="gguf-llama",
    description="GGUF, llama architecture (LLaMA, Mistral, SmolLM, ...)",
    tied_output="output.weight",
    weights_format="gguf",
    arch="llama",
)
QWEN2 = GGUFFamily(
    name="gguf-qwen2",
    description="GGUF, qwen2 architecture",
    tied_output="output.weight",
    weights_format="gguf",
    arch="qwen2",
    permute_qk=False,
    qkv_bias=True,
)
QWEN3 = GGUFFamily(
    name="gguf-qwen3",
    description="GGUF, qwen3 architecture",
    tied_output="output.weight",
    weights_format="gguf",
    arch="qwen3",
    permute_qk=False,
    qk_norm=True,
)
GGUF_FAMILIES = {f.arch: f for f in (LLAMA, QWEN2, QWEN3)}


def gguf_family(meta: dict[str, Any], where: str) -> GGUFFamily:
    arch = meta.get("general.architecture")
    if arch not in GGUF_FAMILIES:
        raise UnsupportedError(
            f"{where} has GGUF architecture {arch!r}; llamakin reads {', '.join(GGUF_FAMILIES)}."
        )
    return GGUF_FAMILIES[arch]
