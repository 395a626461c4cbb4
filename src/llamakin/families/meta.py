"""Meta's original LLaMA layout: ``params.json`` + ``consolidated.00.pth`` (docs/variants.md §2.2, §3.1, §3.2).

The same layout serves Mistral's native checkpoints (``params.json`` with ``hidden_dim`` and
``head_dim``, ``consolidated.safetensors``). q and k rows are in the *interleaved* RoPE order;
llamakin computes interleaved RoPE natively, so loading needs no permutation at all, and
``llamakin convert --rope-layout half`` gives the exact HF order (docs/variants.md §2.3).
"""

from __future__ import annotations

import math
from typing import Any

from ..config import ModelConfig, RopeScaling
from ..errors import ConfigError
from .base import Family, require
from .tables import Entry, meta_style_table

# Meta's llama/model.py names (docs/variants.md §3.2): wq/wk/wv/wo, q and k rows in interleaved RoPE order
META_TABLE: dict[str, Entry] = {
    **meta_style_table(),
    "layers.{i}.attn.qkv.weight": tuple(
        f"layers.{{i}}.attention.{w}.weight" for w in ("wq", "wk", "wv")
    ),
    "layers.{i}.attn.o_proj.weight": "layers.{i}.attention.wo.weight",
}

# Llama 3.1's rope scaling, switched on by ``use_scaled_rope`` (docs/variants.md §2.4).
LLAMA31_SCALING = RopeScaling(
    type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
DEFAULT_MAX_SEQ_LEN = 4096  # params.json does not record the context; Llama 2's is used


def ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width rule (docs/variants.md §3.1): 4096 -> 11008, 5120 -> 13824."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def ffn_params_for(dim: int, width: int) -> dict[str, Any]:
    """``multiple_of`` / ``ffn_dim_multiplier`` that reproduce ``width`` under :func:`ffn_width`."""
    for multiple_of in (256, 1024, 4096):
        if ffn_width(dim, multiple_of, None) == width:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": None}
    multiplier = width / int(2 * (4 * dim) / 3)
    return {"multiple_of": width, "ffn_dim_multiplier": multiplier}


class MetaFamily(Family):
    def config_from_checkpoint(self, params: dict[str, Any]) -> ModelConfig:
        where = "params.json"
        dim = require(params, "dim", where)
        heads = require(params, "n_heads", where)
        if params.get("hidden_dim"):
            width = params["hidden_dim"]
        else:
            width = ffn_width(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
        vocab = require(params, "vocab_size", where)
        if vocab <= 0:
            raise ConfigError(
                f"{where} has vocab_size {vocab}; set it to the tokenizer's vocabulary size."
            )
        try:
            return ModelConfig(
                vocab_size=vocab,
                hidden_size=dim,
                num_layers=require(params, "n_layers", where),
                num_heads=heads,
                num_kv_heads=params.get("n_kv_heads") or heads,
                head_dim=params.get("head_dim"),
                intermediate_size=width,
                max_position_embeddings=params.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN,
                norm_eps=params.get("norm_eps", 1e-5),
                rope_layout="interleaved",
                rope_theta=float(params.get("rope_theta", 10000.0)),
                rope_scaling=LLAMA31_SCALING if params.get("use_scaled_rope") else RopeScaling(),
                sliding_window=params.get("sliding_window"),
                family=self.name,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dim": config.hidden_size,
            "n_layers": config.num_layers,
            "n_heads": config.num_heads,
            "n_kv_heads": config.num_kv_heads,
            "vocab_size": config.vocab_size,
            **ffn_params_for(config.hidden_size, config.intermediate_size),
            "norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
        }
        if config.head_dim * config.num_heads != config.hidden_size:
            out["head_dim"] = config.head_dim
        if config.rope_scaling == LLAMA31_SCALING:
            out["use_scaled_rope"] = True
        if config.sliding_window is not None and config.sliding_window_layers is None:
            out["sliding_window"] = config.sliding_window
        if out["ffn_dim_multiplier"] is None:
            del out["ffn_dim_multiplier"]
        # The reader's knobs that this format fixes: check them via the round trip in `unsupported`.
        return out

    def unsupported(self, config: ModelConfig) -> str | None:
        if config.max_position_embeddings != DEFAULT_MAX_SEQ_LEN:
            # not stored, not a knob of the weights
            config = config.replace(max_position_embeddings=DEFAULT_MAX_SEQ_LEN)
        # tokenizer's business
        config = config.replace(bos_token_id=None, eos_token_ids=(), pad_token_id=None)
        return super().unsupported(config)

    def tensor_table(self) -> dict[str, Entry]:
        return META_TABLE


FAMILY = MetaFamily(
    name="meta",
    description="Meta's original LLaMA layout (params.json + consolidated.00.pth; interleaved RoPE); also Mistral's native format",
    tied_output="output.weight",
    config_file="params.json",
    weights_format="torch",
)
