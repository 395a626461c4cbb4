"""Rotary position embedding: frequencies, scaling types and the two pair layouts (docs/variants.md §2).

Frequencies are computed in float32 exactly as transformers does (``modeling_rope_utils``);
cos/sin are cast to the activation dtype and the rotation runs in that dtype (docs/variants.md §2.1, §10).
ChatGLM-6B instead rounds its inverse frequencies to float16 once and computes its tables in the
model's dtype (``rope_inv_freq_dtype``, ``rope_table_dtype``, docs/variants.md §6.1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig, RopeScaling


def default_inv_freq(
    rotary_dim: int, theta: float, device: torch.device | None = None
) -> torch.Tensor:
    """``1 / theta ** (2i / rd)`` for ``i < rd/2`` (docs/variants.md §2.1)."""
    exponents = (
        torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    )
    return 1.0 / (theta**exponents)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling, original_context: int) -> torch.Tensor:
    """Llama 3.1 piecewise rule on wavelengths (docs/variants.md §2.4)."""
    low_wavelen = original_context / s.low_freq_factor
    high_wavelen = original_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original_context / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(
    inv_freq: torch.Tensor, s: RopeScaling, rotary_dim: int, theta: float, original_context: int
) -> tuple[torch.Tensor, float]:
    """YaRN: ramp between interpolated and extrapolated frequencies (docs/variants.md §2.4)."""
    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(
            s.factor, s.mscale_all_dim
        )
    else:
        attention_factor = _yarn_mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return (
            rotary_dim
            * math.log(original_context / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = (
        (torch.arange(rotary_dim // 2, dtype=torch.float32, device=inv_freq.device) - low)
        / (high - low)
    ).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    powers = theta ** (torch.arange(0, rotary_dim, 2, device=inv_freq.device).float() / rotary_dim)
    interpolated = 1.0 / (s.factor * powers)
    return interpolated * (
        1 - extrapolation_weight
    ) + inv_freq * extrapolation_weight, attention_factor


def frequency_dim(config: ModelConfig) -> int:
    """Features one frequency table covers: the rotary dim, or half of it for 2-D RoPE (docs/variants.md §6.1)."""
    return config.rotary_dim // 2 if config.rope_layout == "glm2d" else config.rotary_dim


def qwen_ntk_alpha(length: int, trained_length: int) -> float:
    """Qwen v1's dynamic-NTK alpha for a row of ``length`` real tokens (docs/variants.md §5.1):
    ``max(2 ** ceil(log(L / trained, 2) + 1) - 1, 1)``, with Python's two-argument log as the
    original ``QWenModel.get_ntk_alpha`` computes it."""
    return max(2 ** math.ceil(math.log(length / trained_length, 2) + 1) - 1, 1)


def qwen_ntk_inv_freq(config: ModelConfig, alpha: torch.Tensor) -> torch.Tensor:
    """Per-row inverse frequencies ``[B, 1, rd/2]`` for Qwen v1's NTK ``alpha`` ``[B]`` (docs/variants.md §5.1):
    ``base' = base * alpha ** (rd / (rd - 2))``, then ``1 / base' ** (2i / rd)`` in float32. Computed
    from a tensor, so a traced decode step follows each generation's own alphas."""
    rd = frequency_dim(config)
    base = (config.rope_theta * alpha.double() ** (rd / (rd - 2))).float()
    exponents = torch.arange(0, rd, 2, dtype=torch.int64, device=alpha.device).float() / rd
    return (1.0 / base[:, None] ** exponents)[:, None]


def inv_freq_for(
    config: ModelConfig, seq_len: int | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin attention factor for ``config.rope_scaling``.

    ``seq_len`` (max position + 1 of the current call) only matters for ``dynamic`` scaling,
    which grows the base once the sequence is longer than ``max_position_embeddings``:
    ``base' = base * (factor * L / max_pos - (factor - 1)) ** (rd / (rd - 2))``. transformers
    keeps the grown frequencies while a later call is shorter but still past ``max_pos``; llamakin
    is stateless and always uses the current call's length (identical for growing sequences, and
    what InternLM v1's own ``_update_cached`` does). Qwen v1's per-row NTK is
    :func:`qwen_ntk_inv_freq`; here it gives the unscaled frequencies.
    """
    s, theta = config.rope_scaling, config.rope_theta
    rd = frequency_dim(config)
    original_context = s.original_max_position_embeddings or config.max_position_embeddings
    if s.type == "dynamic":
        length = max(seq_len or 0, config.max_position_embeddings)
        theta = theta * ((s.factor * length / config.max_position_embeddings) - (s.factor - 1)) ** (
            rd / (rd - 2)
        )
    inv_freq = default_inv_freq(rd, theta, device)
    # ChatGLM-6B creates them .half() (docs/variants.md §6.1)
    if config.rope_inv_freq_dtype == "float16":
        inv_freq = inv_freq.half().float()
    if s.type == "linear":
        return inv_freq / s.factor, 1.0
    if s.type == "llama3":
        return _llama3(inv_freq, s, original_context), 1.0
    if s.type == "yarn":
        return _yarn(inv_freq, s, rd, theta, original_context)
    return inv_freq, 1.0


class Rope(NamedTuple):
    """What attention needs from positions: cos/sin tables, an optional per-query scale of q, and,
    for a cache of keys stored before RoPE (``rope_cached_keys``), the tables of every cached slot
    (``key_cos``/``key_sin`` ``[B, 1, S, rd]``, rotating all keys with the current frequencies)."""

    cos: torch.Tensor
    sin: torch.Tensor
    q_scale: torch.Tensor | None = None
    key_cos: torch.Tensor | None = None
    key_sin: torch.Tensor | None = None


class RotaryEmbedding(nn.Module):
    """Maps position ids ``[B, T]`` to the tables ``(cos, signed_sin)``, each ``[B, 1, T, rotary_dim]``,
    laid out for the configured pair layout so that :func:`apply_rotary` is four kernels.

    The frequencies are not a buffer: they are derived from the config (cached per device), so
    ``module.to(bfloat16)`` can never round them.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._static: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def frequencies(
        self, positions: torch.Tensor, ntk_alpha: torch.Tensor | None, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        """``[rd/2]`` inverse frequencies, or ``[B, 1, rd/2]`` (one set per row) for Qwen v1's NTK."""
        device = positions.device
        kind = self.config.rope_scaling.type
        if kind == "dynamic":
            return inv_freq_for(self.config, seq_len or int(positions.max()) + 1, device)
        if kind == "qwen_dynamic" and not self.training and ntk_alpha is not None:  # inference only
            return qwen_ntk_inv_freq(self.config, ntk_alpha), 1.0
        if device not in self._static:
            self._static[device] = inv_freq_for(self.config, None, device)
        return self._static[device]

    def _tables(
        self, positions: torch.Tensor, inv_freq: torch.Tensor, factor: float, dtype: torch.dtype
    ):
        # float32 tables cast to the activations' dtype (transformers, docs/variants.md §2.1), or ChatGLM-6B's
        # tables computed in the model's dtype (docs/variants.md §6.1)
        table_dtype = dtype if self.config.rope_table_dtype == "model" else torch.float32
        # [B, T, rd/2] (docs/variants.md §2.1)
        angles = positions.to(table_dtype)[..., None] * inv_freq.to(table_dtype)
        cos, sin = angles.cos(), angles.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        cos, sin = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
        # pairs (2i, 2i + 1): [c0 c0 c1 c1 ...], [-s0 s0 -s1 s1 ...]
        if self.config.rope_layout == "interleaved":
            return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
        # pairs (i, i + rd/2): [c | c], [-s | s]
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)

    def forward(
        self,
        positions: torch.Tensor,
        dtype: torch.dtype,
        ntk_alpha: torch.Tensor | None = None,
        seq_len: int | None = None,
        key_positions: torch.Tensor | None = None,
    ):
        """``positions`` ``[B, T]``, or ``[B, 2, T]`` (position and block position) for 2-D RoPE;
        ``ntk_alpha`` ``[B]`` Qwen v1's per-row NTK alpha; ``seq_len`` what ``dynamic`` scaling
        measures (default: the largest position + 1). With ``key_positions`` ``[B, S]`` also the
        tables of those key slots, from the same frequencies: ``(cos, sin, key_cos, key_sin)``."""
        inv_freq, factor = self.frequencies(positions, ntk_alpha, seq_len)
        if key_positions is not None:
            return (
                *self._tables(positions, inv_freq, factor, dtype),
                *self._tables(key_positions, inv_freq, factor, dtype),
            )
        if self.config.rope_layout != "glm2d":
            return self._tables(positions, inv_freq, factor, dtype)
        (cos1, sin1), (cos2, sin2) = (
            self._tables(positions[:, i], inv_freq, factor, dtype) for i in (0, 1)
        )
        return torch.cat((cos1, cos2), -1), torch.cat((sin1, sin2), -1)


def rotary_partner(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The feature each feature is rotated with: ``[b | a]`` for ``half``, ``[x1 x0 x3 x2 ...]`` for
    ``interleaved``, and the ``half`` partner within each half of the head for ``glm2d``."""
    if layout == "half":
        return x.roll(x.shape[-1] // 2, dims=-1)
    if layout == "glm2d":
        return x.unflatten(-1, (2, -1)).roll(x.shape[-1] // 4, dims=-1).flatten(-2)
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, layout: str
) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of every head of ``x`` ``[B, H, T, hd]``.

    ``half`` rotates pairs ``(i, i + rd/2)`` (HF rotate_half, docs/variants.md §2.1); ``interleaved`` rotates
    pairs ``(2i, 2i + 1)`` (Meta's complex form, ChatGLM2/3, HF GLM, docs/variants.md §2.2, §6.2, §6.3);
    ``glm2d`` rotates each half of the head rotate_half-style with its own table (docs/variants.md §6.1). With
    the partner feature p and its signed sine, every output is ``x * cos + p * signed_sin`` — the
    same products and sums, rounded the same way, as transformers' ``q * cos + rotate_half(q) * sin``.
    Features past the rotary dim pass through unchanged (partial rotary).
    """
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotary_partner(x, layout) * signed_sin
    rotary = x[..., :rd]
    rotated = rotary * cos + rotary_partner(rotary, layout) * signed_sin
    return torch.cat((rotated, x[..., rd:]), dim=-1)
