"""Architecture cards and side-by-side architecture differences (``llamakin inspect`` / ``arch-diff``).

Everything here works from configs and file headers: no weights are read, so inspecting a
70B checkpoint takes as long as a 135M one.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import torch

from .checkpoint import read_model_config, stored_dtype
from .config import ModelConfig
from .io.gguf import GGUFFile
from .model import Transformer
from .source import resolve_model

SIZE_FIELDS = {
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_ids",
    "pad_token_id",
    "family",
}


def plain_llama(config: ModelConfig) -> ModelConfig:
    """A plain LLaMA (MHA, RMSNorm, SwiGLU, rotate_half RoPE, no biases) of the same sizes."""
    return ModelConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        head_dim=config.head_dim,
        norm_eps=config.norm_eps,
    )


def knobs_differing_from_llama(config: ModelConfig) -> dict[str, object]:
    base = plain_llama(config)
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in SIZE_FIELDS and getattr(config, f.name) != getattr(base, f.name)
    }


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameters per component, counted on a ``meta`` model (no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    groups = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "output head": 0}
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            key = "embedding"
        elif name.startswith("lm_head."):
            key = "output head"
        elif "norm" in name:
            key = "norms"
        elif ".attn." in name:
            key = "attention"
        else:
            key = "mlp"
        groups[key] += p.numel()
    groups["total"] = sum(groups.values())
    return groups


def _bias_text(config: ModelConfig) -> str:
    parts = [
        n
        for n, on in (
            ("q", config.q_bias),
            ("k", config.k_bias),
            ("v", config.v_bias),
            ("o", config.o_bias),
        )
        if on
    ]
    return " ".join(parts) if parts else "none"


def _heads_text(config: ModelConfig) -> str:
    kind = (
        "MHA"
        if config.num_kv_heads == config.num_heads
        else ("MQA" if config.num_kv_heads == 1 else "GQA")
    )
    return f"{config.num_heads} / {config.num_kv_heads} ({kind})"


def _rope_text(config: ModelConfig) -> str:
    s = config.rope_scaling
    layout = "2-D (two position streams)" if config.rope_layout == "glm2d" else config.rope_layout
    text = f"{layout}, {config.rotary_dim}/{config.head_dim} dims, theta {config.rope_theta:g}"
    if s.type == "qwen_dynamic":
        text += f", Qwen dynamic NTK past {s.original_max_position_embeddings}"
    elif s.type != "default":
        text += f", {s.type} x{s.factor:g}"
    if config.rope_inv_freq_dtype != "float32":
        text += f", {config.rope_inv_freq_dtype}-rounded frequencies"
    if config.rope_table_dtype != "float32":
        text += ", tables in the model dtype"
    if config.rope_cached_keys:
        text += ", cached keys re-rotated"
    return text


def _residual_text(config: ModelConfig) -> str:
    base = (
        "x"
        if config.normed_residual_alpha is None
        else f"{config.normed_residual_alpha:.4g} * norm(x)"
    )
    text = (
        f"{base} + f(norm(x))"
        if config.residual_multiplier == 1
        else f"{base} + {config.residual_multiplier:g} * f(norm(x))"
    )
    return text + (", branch outputs normed" if config.post_sublayer_norms else "")


def describe(config: ModelConfig) -> dict[str, str]:
    """The architectural rows shown by ``arch-diff``, in a fixed order."""
    norm = "RMSNorm" if config.norm_type == "rmsnorm" else "LayerNorm"
    if config.norm_type == "rmsnorm":
        norm += (
            " (x w after cast)"
            if config.rmsnorm_order == "cast_then_mul"
            else " (x w in fp32, then cast)"
        )
    norm_position = (
        "pre-norm + post-branch (sandwich)" if config.post_sublayer_norms else "pre-norm"
    )
    multipliers = []
    if config.embedding_multiplier != 1:
        multipliers.append(f"embedding x{config.embedding_multiplier:g}")
    if config.logits_scaling != 1:
        multipliers.append(f"logits /{config.logits_scaling:g}")
    return {
        "family": config.family or "-",
        "layers x hidden": f"{config.num_layers} x {config.hidden_size}",
        "vocab": str(config.vocab_size),
        "context": str(config.max_position_embeddings),
        "norm": f"{norm}, eps {config.norm_eps:g}",
        "norm position": norm_position,
        "attention": (
            (
                "differential (pairs j, j+H/2)"
                + (", pair-norm weight" if config.diff_norm_affine else "")
            )
            if config.attention_kind == "differential"
            else "standard"
        ),
        "mask": ("prefix LM (bidirectional to <sop>)" if config.prefix_lm else "causal")
        + (
            ""
            if config.logn_attention_length is None
            else f", logn q-scaling past {config.logn_attention_length}"
        ),
        "heads q / kv": _heads_text(config),
        "head dim": str(config.head_dim),
        "attention bias": _bias_text(config),
        "attention scale": (
            "1/sqrt(head_dim)" if config.attention_scale is None else f"{config.attention_scale:g}"
        ),
        "qk norm": "per-head RMSNorm" if config.qk_norm else "none",
        "sliding window": (
            "none"
            if config.sliding_window is None
            else f"{config.sliding_window}"
            + (
                ""
                if config.sliding_window_layers is None
                else f" on {len(config.sliding_window_layers)} layers"
            )
        ),
        "mlp": f"{'SwiGLU' if config.mlp_type == 'swiglu' else 'GELU-tanh'} {config.intermediate_size}",
        "mlp bias": "yes" if config.mlp_bias else "no",
        "rope": _rope_text(config),
        "residual": _residual_text(config),
        "multipliers": ", ".join(multipliers) or "none",
        "tied embeddings": "yes" if config.tie_word_embeddings else "no",
    }


def kv_bytes_per_token(config: ModelConfig, bytes_per_value: int) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * bytes_per_value


def gguf_tensor_types(path: Path) -> str:
    """A GGUF file's tensor types, the most common first: ``Q4_1 (182 tensors), F32 (61 tensors)``."""
    with GGUFFile(path) as gguf:
        counts = Counter(gguf.quant_type(name) for name in gguf.names())
    return ", ".join(
        f"{kind} ({n} tensor{'s' if n > 1 else ''})" for kind, n in counts.most_common()
    )


def card(path: str | Path) -> tuple[ModelConfig, list[tuple[str, str]]]:
    """The rows of ``llamakin inspect``: what the checkpoint is and what it costs."""
    source = resolve_model(path)
    family, config = read_model_config(source)
    dtype = stored_dtype(source) if not source.is_gguf else gguf_tensor_types(source.path)
    counts = parameter_breakdown(config)
    rows = [
        ("path", str(source.path)),
        ("family", f"{family.name} - {family.description}"),
        ("stored dtype", dtype),
        ("context length", str(config.max_position_embeddings)),
    ]
    rows += [(f"parameters: {k}", f"{v:,}") for k, v in counts.items()]
    differing = knobs_differing_from_llama(config)
    rows.append(("differs from plain LLaMA", "nothing" if not differing else ""))
    rows += [(f"  {k}", str(v)) for k, v in differing.items()]
    total = counts["total"]
    rows += [
        (
            "memory: weights",
            f"{total * 4 / 2**20:,.1f} MiB float32, {total * 2 / 2**20:,.1f} MiB bfloat16",
        ),
        (
            "memory: KV cache",
            f"{kv_bytes_per_token(config, 2) / 2**10:,.1f} KiB/token bf16; "
            f"{kv_bytes_per_token(config, 2) * config.max_position_embeddings / 2**20:,.1f} MiB "
            "for the full context",
        ),
    ]
    return config, rows
