"""Shared machinery of the Hugging Face decoder families (docs/variants.md §3.2, §3.3, §2.4).

Every native transformers class llamakin targets (Llama, Mistral, Granite, Qwen2, Qwen3,
DiffLlama, GLM, GLM-4) uses the same tensor naming under ``model.layers.{i}``; they differ only
in config keys and in which optional tensors exist. :class:`HFDecoderFamily` implements the
common part; each family module overrides :meth:`family_knobs` (config.json -> knobs) and
:meth:`family_keys` (knobs -> config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..config import ModelConfig, RopeScaling, eos_ids_from_json, eos_ids_to_json
from ..errors import ConfigError, UnsupportedError
from .base import Family, require
from .tables import Entry

# rope_parameters keys -> RopeScaling fields (transformers' names, docs/variants.md §2.4).
_ROPE_KEYS = {f.name for f in fields(RopeScaling)} - {"type"}


def read_rope(
    hf: dict[str, Any], where: str, default_partial: float = 1.0
) -> tuple[float, float, RopeScaling]:
    """(theta, partial_rotary_factor, scaling) from a transformers config dict.

    Accepts the v5 ``rope_parameters`` dict and the legacy ``rope_theta`` / ``rope_scaling``
    (with ``type`` or ``rope_type``) / ``partial_rotary_factor`` keys; like transformers, a
    legacy ``rope_scaling`` takes precedence.
    """
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters must be a JSON object, got {params!r}.")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedError(f"{where}: per-layer-type RoPE parameters are not supported yet.")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "linear", "dynamic", "llama3", "yarn"):
        raise UnsupportedError(
            f"{where}: RoPE scaling type {rope_type!r} is not supported; llamakin implements "
            "default, linear, dynamic, llama3 and yarn."
        )
    if rope_type == "default":
        return float(theta), float(partial), RopeScaling()
    scaling = {k: v for k, v in params.items() if k in _ROPE_KEYS and v is not None}
    if rope_type == "yarn" and "factor" not in scaling:
        orig = require(params, "original_max_position_embeddings", f"{where} rope_parameters")
        scaling["factor"] = require(hf, "max_position_embeddings", where) / orig
    else:
        require(params, "factor", f"{where} rope_parameters")
    if rope_type == "llama3":
        require(params, "original_max_position_embeddings", f"{where} rope_parameters")
    return float(theta), float(partial), RopeScaling(type=rope_type, **scaling)


def write_rope(config: ModelConfig, always_partial: bool = False) -> dict[str, Any]:
    """config.json keys for RoPE: v5 ``rope_parameters`` plus the legacy keys older readers use."""
    partial = config.rotary_dim / config.head_dim
    params: dict[str, Any] = {
        "rope_type": config.rope_scaling.type,
        "rope_theta": config.rope_theta,
    }
    if partial != 1.0 or always_partial:
        params["partial_rotary_factor"] = partial
    scaling = None
    s = config.rope_scaling
    if s.type != "default":
        scaling = {"rope_type": s.type, "factor": s.factor}
        if s.type == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.type == "yarn":
            scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
            if not s.truncate:
                scaling["truncate"] = False
        for key in (
            "original_max_position_embeddings",
            "mscale",
            "mscale_all_dim",
            "attention_factor",
        ):
            if getattr(s, key) is not None:
                scaling[key] = getattr(s, key)
        if s.type in ("llama3", "yarn") and s.original_max_position_embeddings is None:
            scaling["original_max_position_embeddings"] = config.max_position_embeddings
        params.update(scaling)
    out = {"rope_parameters": params, "rope_theta": config.rope_theta, "rope_scaling": scaling}
    if "partial_rotary_factor" in params:
        out["partial_rotary_factor"] = partial
    return out


_P, _A = "model.layers.{i}.", "model.layers.{i}.self_attn."
# Llama's tensor names, shared by every transformers class llamakin targets (docs/variants.md §3.2)
HF_TABLE: dict[str, Entry] = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": _P + "input_layernorm.weight",
    "layers.{i}.mlp_norm.weight": _P + "post_attention_layernorm.weight",
    **{
        f"layers.{{i}}.attn.qkv.{s}": tuple(_A + f"{p}_proj.{s}" for p in "qkv")
        for s in ("weight", "bias")
    },
    **{f"layers.{{i}}.attn.o_proj.{s}": _A + f"o_proj.{s}" for s in ("weight", "bias")},
    "layers.{i}.attn.q_norm.weight": _A + "q_norm.weight",  # Qwen3
    "layers.{i}.attn.k_norm.weight": _A + "k_norm.weight",
    # DiffLlama
    **{
        f"layers.{{i}}.attn.{n}": _A + n
        for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    },
    "layers.{i}.attn_out_norm.weight": _P + "post_self_attn_layernorm.weight",  # GLM-4-0414
    "layers.{i}.mlp_out_norm.weight": _P + "post_mlp_layernorm.weight",
    **{
        f"layers.{{i}}.mlp.gate_up.{s}": (_P + f"mlp.gate_proj.{s}", _P + f"mlp.up_proj.{s}")
        for s in ("weight", "bias")
    },
    **{f"layers.{{i}}.mlp.down.{s}": _P + f"mlp.down_proj.{s}" for s in ("weight", "bias")},
}
# GLM stores gate and up as one matrix, gate rows first (docs/variants.md §6.3)
GATE_UP_FUSED: dict[str, Entry] = {
    f"layers.{{i}}.mlp.gate_up.{s}": _P + f"mlp.gate_up_proj.{s}" for s in ("weight", "bias")
}


@dataclass
class HFDecoderFamily(Family):
    """A transformers ``*ForCausalLM`` whose tensors follow Llama's naming (docs/variants.md §3.2)."""

    fused_gate_up: bool = (
        False  # GLM stores ``mlp.gate_up_proj`` (gate rows first, docs/variants.md §6.3)
    )
    default_max_positions: int = 2048
    default_eps: float = 1e-6
    default_partial_rotary: float = 1.0

    # -- config.json -> knobs -----------------------------------------------------------------
    def config_from_checkpoint(self, hf: dict[str, Any]) -> ModelConfig:
        where = f"{self.name} config.json"
        act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
        if act != "silu":
            raise UnsupportedError(
                f"{where}: hidden_act {act!r} is not supported (llamakin's SwiGLU uses silu)."
            )
        theta, partial, scaling = read_rope(hf, where, self.default_partial_rotary)
        hidden, heads = require(hf, "hidden_size", where), require(hf, "num_attention_heads", where)
        head_dim = hf.get("head_dim") or (hidden // heads if heads else None)
        knobs: dict[str, Any] = dict(
            vocab_size=require(hf, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=require(hf, "intermediate_size", where),
            num_layers=require(hf, "num_hidden_layers", where),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings") or self.default_max_positions,
            norm_eps=hf.get("rms_norm_eps", self.default_eps),
            rope_theta=theta,
            rotary_dim=int(head_dim * partial),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids_from_json(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            family=self.name,
        )
        knobs.update(self.family_knobs(hf))
        try:
            return ModelConfig(**knobs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def family_knobs(self, hf: dict[str, Any]) -> dict[str, Any]:
        """Knobs specific to this family (biases, multipliers, windows, ...)."""
        return {}

    # -- knobs -> config.json -----------------------------------------------------------------
    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": [self.architectures[0]],
            "model_type": self.name,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.norm_eps,
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos_ids_to_json(config.eos_token_ids),
            "pad_token_id": config.pad_token_id,
            "attention_dropout": 0.0,
        }
        out.update(write_rope(config, always_partial=self.default_partial_rotary != 1.0))
        out.update(self.family_keys(config))
        return out

    def family_keys(self, config: ModelConfig) -> dict[str, Any]:
        return {}

    # -- tensors -----------------------------------------------------------------------------
    def tensor_table(self) -> dict[str, Entry]:
        return {**HF_TABLE, **GATE_UP_FUSED} if self.fused_gate_up else HF_TABLE


def sliding_layers_from_types(
    hf: dict[str, Any], num_layers: int, default_start: int
) -> tuple[int, ...]:
    """Layer indices using the sliding window, from ``layer_types`` or ``max_window_layers``."""
    types = hf.get("layer_types")
    if types:
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    start = hf.get("max_window_layers", default_start)
    return tuple(range(start, num_layers))


def layer_types_keys(config: ModelConfig) -> dict[str, Any]:
    """Qwen2/Qwen3-style sliding-window keys for a config."""
    sliding = (
        set(range(config.num_layers))
        if config.sliding_window_layers is None
        else set(config.sliding_window_layers)
    )
    if config.sliding_window is None:
        sliding = set()
    types = [
        "sliding_attention" if i in sliding else "full_attention" for i in range(config.num_layers)
    ]
    first = min(sliding) if sliding else config.num_layers
    return {
        "use_sliding_window": config.sliding_window is not None,
        "sliding_window": config.sliding_window,
        "max_window_layers": first,
        "layer_types": types,
    }
