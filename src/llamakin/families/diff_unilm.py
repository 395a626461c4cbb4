"""The Differential Transformer in microsoft/unilm's module layout (docs/variants.md §7.1, §7.3).

unilm ships the attention module (``multihead_diffattn.py``), not a whole model, so llamakin
defines the container: ``config.json`` with ``model_type: diff_transformer`` and unilm's own
attention parameters (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``lambda_q1..k2``,
``subln``) inside a LLaMA-style block (RMSNorm, SwiGLU ``w1/w3/w2``). Its conventions, which this
adapter translates exactly into llamakin's HF-DiffLlama pairing:

* ``num_heads`` counts *pairs* (half the baseline's heads); q and k hold ``2 * num_heads`` heads of
  ``head_dim = embed_dim / num_heads / 2``, paired *adjacently* (2i, 2i+1); HF pairs (j, j + H/2);
* v holds ``num_kv_heads`` heads of ``2 * head_dim``: HF's value head g is its first half, g + H/2
  its second half;
* RoPE rotates interleaved pairs (kept: llamakin computes that layout natively);
* ``subln`` is an RMSNorm over ``2 * head_dim`` *with* a weight (HF's has none) and its own
  epsilon, 1e-5 in unilm whatever the blocks' norms use (``subln_eps`` in the container's config,
  the ``diff_norm_eps`` knob).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..transforms import adjacent_pairs_to_halves, halves_to_adjacent_pairs
from .base import Family, TensorRule, require
from .tables import Entry, Transformed, meta_style_table


def _adjacent_pairs(canonical: str, names: tuple[str, ...], config: ModelConfig) -> TensorRule:
    """unilm's q, k, v with each differential pair of heads adjacent; v holds ``Hkv/2`` heads of
    ``2 * head_dim``, the same rows as ``Hkv`` heads of ``head_dim`` in adjacent pairs."""
    H, Hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    sizes = (H * hd, Hkv * hd, Hkv * hd)

    def to_canonical(parts: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        return torch.cat(
            (
                adjacent_pairs_to_halves(q, H),
                adjacent_pairs_to_halves(k, Hkv),
                adjacent_pairs_to_halves(v, Hkv),
            )
        )

    def from_canonical(t: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = t.split(sizes)
        return [
            halves_to_adjacent_pairs(q, H),
            halves_to_adjacent_pairs(k, Hkv),
            halves_to_adjacent_pairs(v, Hkv),
        ]

    return TensorRule(canonical, names, to_canonical, from_canonical)


_A = "layers.{i}.attn."
UNILM_TABLE: dict[str, Entry] = {
    **meta_style_table(),
    "layers.{i}.attn.qkv.weight": Transformed(
        tuple(_A + f"{p}_proj.weight" for p in "qkv"), _adjacent_pairs
    ),
    "layers.{i}.attn.o_proj.weight": _A + "out_proj.weight",
    "layers.{i}.attn.pair_norm.weight": _A + "subln.weight",
    **{
        f"layers.{{i}}.attn.{n}": _A + n
        for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    },
}

UNILM_SUBLN_EPS = (
    1e-5  # multihead_diffattn.py: RMSNorm(2 * head_dim, eps=1e-5, elementwise_affine=True)
)


class DiffUnilmFamily(Family):
    def config_from_checkpoint(self, c: dict[str, Any]) -> ModelConfig:
        where = "diff_transformer config.json"
        pairs = require(c, "num_heads", where)
        embed = require(c, "embed_dim", where)
        try:
            return ModelConfig(
                vocab_size=require(c, "vocab_size", where),
                hidden_size=embed,
                num_layers=require(c, "num_layers", where),
                num_heads=2 * pairs,
                num_kv_heads=2 * (c.get("num_kv_heads") or pairs),
                head_dim=embed // pairs // 2,
                intermediate_size=require(c, "ffn_dim", where),
                max_position_embeddings=c.get("max_positions", 2048),
                norm_eps=c.get("norm_eps", 1e-5),
                rope_theta=float(c.get("rope_theta", 10000.0)),
                rope_layout="interleaved",
                attention_kind="differential",
                diff_norm_affine=True,
                diff_norm_eps=float(c.get("subln_eps", UNILM_SUBLN_EPS)),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                family=self.name,
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def config_to_checkpoint(self, config: ModelConfig) -> dict[str, Any]:
        if 2 * config.head_dim * (config.num_heads // 2) != config.hidden_size:
            raise ConfigError(
                "unilm's attention derives head_dim from embed_dim; they disagree here."
            )
        return {
            "architectures": ["DiffTransformer"],
            "model_type": self.name,
            "vocab_size": config.vocab_size,
            "embed_dim": config.hidden_size,
            "num_layers": config.num_layers,
            "num_heads": config.num_heads // 2,
            "num_kv_heads": config.num_kv_heads // 2,
            "ffn_dim": config.intermediate_size,
            "max_positions": config.max_position_embeddings,
            "norm_eps": config.norm_eps,
            "subln_eps": config.norm_eps if config.diff_norm_eps is None else config.diff_norm_eps,
            "rope_theta": config.rope_theta,
            "tie_word_embeddings": config.tie_word_embeddings,
        }

    def tensor_table(self) -> dict[str, Entry]:
        return UNILM_TABLE


FAMILY = DiffUnilmFamily(
    name="diff_transformer",
    description="Differential Transformer, microsoft/unilm module layout (adjacent pairs, subln)",
    tied_output="output.weight",
)
