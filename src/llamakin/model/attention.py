"""Self-attention: standard MHA/GQA/MQA and differential attention (docs/variants.md §1.2, §5.3, §7, §8)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..hardware import HALF_DTYPES
from .cache import KVCache
from .linear import Linear
from .masks import AttentionMask
from .norm import RMSNorm
from .rope import Rope, apply_rotary

FEW_QUERIES = 16


def few_half_queries_on_cpu(q: torch.Tensor) -> bool:
    """Whether attention for ``q [B, H, T, hd]`` is computed in float32 (then rounded back):
    decoding (at most :data:`FEW_QUERIES` queries) in bfloat16/float16 on CPU. PyTorch's CPU
    attention kernel is slow for a few half-precision queries over a masked cache, with or without
    native instructions for them; in float32 it is faster and rounds once. Measured per call, 9
    query and 3 KV heads of 64 over a 256-slot cache, bfloat16 vs float32 inside: 2.8x for 8 rows
    on an AVX2 EPYC (no native bf16); on an AVX-512 EPYC with ``avx512_bf16`` 1,100 -> 198 us for
    8 rows and 147 -> 53 us for one (2026-12-01). Long prompts keep the half-precision kernel
    (512 causal queries: 5.1 ms in bfloat16, 5.6 ms through float32 on the latter machine)."""
    return q.shape[2] <= FEW_QUERIES and q.device.type == "cpu" and q.dtype in HALF_DTYPES


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, through ``scaled_dot_product_attention``.

    q, k and v come from one fused projection ``qkv`` whose rows are ``[q | k | v]`` (the
    layout of Qwen v1's ``c_attn`` and ChatGLM2's ``query_key_value``, docs/variants.md §5.1, §6.2). Biases are
    independent per part (Qwen2/GLM: q, k, v; InternLM v1 and Granite Code: all four, docs/variants.md §4, §5):
    when only some parts have one, ``qkv.bias`` is masked so the others stay exactly zero.
    Query head h uses KV head ``h // kv_groups`` (docs/variants.md §8.1).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        H, Hkv, hd, d = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        self.split_sizes = (H * hd, Hkv * hd, Hkv * hd)
        part_bias = (config.q_bias, config.k_bias, config.v_bias)
        self.qkv = Linear(d, sum(self.split_sizes), bias=any(part_bias))
        self.partial_bias = any(part_bias) and not all(part_bias)
        self.register_buffer("qkv_bias_zeroed", None, persistent=False)
        self.init_buffers()
        self.o_proj = Linear(H * hd, d, bias=config.o_bias)
        # Qwen3: one weight shared by all heads, before RoPE (docs/variants.md §5.3)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps, config.rmsnorm_order)
            self.k_norm = RMSNorm(hd, config.norm_eps, config.rmsnorm_order)
        else:
            self.q_norm = self.k_norm = None

    def init_buffers(self) -> None:
        """(Re)build the non-persistent buffers (also after ``to_empty`` on a meta-built model)."""
        # quantized qkv carry their bias masked
        if self.partial_bias and isinstance(self.qkv, nn.Linear):
            c = self.config
            flags = (c.q_bias, c.k_bias, c.v_bias)
            zeroed = torch.cat([torch.full((n,), not f) for n, f in zip(self.split_sizes, flags)])
            self.qkv_bias_zeroed = zeroed.to(self.qkv.weight.device)
        else:
            self.qkv_bias_zeroed = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, d]`` -> the q and k heads together ``[B, H + Hkv, T, hd]`` and v ``[B, Hkv, T, hd]``.

        q and k stay side by side (as the fused projection produced them) so RoPE rotates both in
        one call: they share positions, and it halves the kernels per layer.
        """
        if self.qkv_bias_zeroed is None:
            qkv = self.qkv(x)
        else:
            qkv = self.qkv(x, bias=self.qkv.bias.masked_fill(self.qkv_bias_zeroed, 0.0))
        B, T, _ = x.shape
        c = self.config
        qk, v = qkv.split((self.split_sizes[0] + self.split_sizes[1], self.split_sizes[2]), dim=-1)
        qk = qk.view(B, T, c.num_heads + c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            qk = torch.cat(
                (self.q_norm(qk[:, :, : c.num_heads]), self.k_norm(qk[:, :, c.num_heads :])), dim=2
            )
        return qk.transpose(1, 2), v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: AttentionMask, cache: KVCache | None = None
    ) -> torch.Tensor:
        qk, v = self.project(x)
        layout = self.config.rope_layout
        if cache is not None and rope.key_cos is not None:
            # keys cached before RoPE (InternLM v1, docs/variants.md §5.4): every cached key is rotated with this
            # call's frequencies, which dynamic NTK changes as the sequence grows
            q, k = qk.split((self.config.num_heads, self.config.num_kv_heads), dim=1)
            q = apply_rotary(q, rope.cos, rope.sin, layout)
            k, v = cache.write(self.layer_idx, k, v)
            k = apply_rotary(k, rope.key_cos, rope.key_sin, layout)
        else:
            qk = apply_rotary(qk, rope.cos, rope.sin, layout)
            q, k = qk.split((self.config.num_heads, self.config.num_kv_heads), dim=1)
            if cache is not None:
                k, v = cache.write(self.layer_idx, k, v)
        if rope.q_scale is not None:
            q = q * rope.q_scale
        out = self.attend(q, k, v, mask)  # [B, T, H * hd]
        return self.o_proj(out)

    def sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        """``scaled_dot_product_attention``; a few queries in half precision on CPU are computed
        in float32 (:func:`few_half_queries_on_cpu`)."""
        dtype = q.dtype
        attn_mask = mask.mask
        if few_half_queries_on_cpu(q):
            q, k, v = q.float(), k.float(), v.float()
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.float()  # an additive mask (0 / -inf): exact in any dtype
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=mask.is_causal,
            scale=self.config.scale,
            enable_gqa=self.config.kv_groups > 1,
        )
        return out.to(dtype)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        out = self.sdpa(q, k, v, mask)
        B, _, T, _ = q.shape
        return out.transpose(1, 2).reshape(B, T, -1)


def lambda_init_for(layer_idx: int) -> float:
    """``0.8 - 0.6 * exp(-0.3 * layer)`` with a 0-based layer index (docs/variants.md §7.1, §7.2, §7.4 item 4)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DifferentialAttention(Attention):
    """Differential attention in HF DiffLlama's layout (docs/variants.md §7.2).

    The ``H`` heads of size ``hd`` form ``H/2`` pairs: head j with head ``j + H/2``. Both heads of a
    pair attend over the same keys with their own softmax; their outputs over the concatenated
    value halves (``2 * hd`` wide) are subtracted *after* the softmax,
    ``o = A_j V - lambda * A_{j+H/2} V`` with one scalar per layer
    ``lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init``, then each pair is RMS-normalised
    over its ``2 * hd`` features and scaled by ``1 - lambda_init``.

    Value heads: the KV heads split in two halves; the value of KV head g is
    ``[v_{g mod Hkv/2} | v_{Hkv/2 + g mod Hkv/2}]`` (HF's ``chunk(v, 2).repeat``), computed in one
    SDPA call with a ``2 * hd``-wide value instead of two calls.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        hd = config.head_dim
        self.lambda_init = lambda_init_for(layer_idx)
        self.lambda_q1 = nn.Parameter(torch.zeros(hd))
        self.lambda_k1 = nn.Parameter(torch.zeros(hd))
        self.lambda_q2 = nn.Parameter(torch.zeros(hd))
        self.lambda_k2 = nn.Parameter(torch.zeros(hd))
        # HF DiffLlama's group norm has no weight; unilm's ``subln`` has one (docs/variants.md §7.1, §7.2)
        # unilm's subln: 1e-5
        eps = config.norm_eps if config.diff_norm_eps is None else config.diff_norm_eps
        self.pair_norm = RMSNorm(2 * hd, eps, config.rmsnorm_order, affine=config.diff_norm_affine)

    def reset_lambdas(self, std: float = 0.1) -> None:
        """``N(0, std)`` for the four lambda vectors (HF ``lambda_std_dev``, unilm 0.1)."""
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, 0.0, std)

    def lambda_full(self, dtype: torch.dtype) -> torch.Tensor:
        lambda_1 = torch.exp(
            torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1, dtype=torch.float32)
        ).to(dtype)
        lambda_2 = torch.exp(
            torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1, dtype=torch.float32)
        ).to(dtype)
        return lambda_1 - lambda_2 + self.lambda_init

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        B, Hkv, S, hd = v.shape
        halves = v.view(B, 2, Hkv // 2, S, hd)
        # [B, Hkv, S, 2hd]
        wide_v = torch.cat((halves[:, 0], halves[:, 1]), dim=-1).repeat(1, 2, 1, 1)
        out = self.sdpa(q, k, wide_v, mask)  # [B, H, T, 2hd]
        first, second = out.chunk(2, dim=1)  # pairs (j, j + H/2)
        diff = first - self.lambda_full(q.dtype) * second
        out = (1 - self.lambda_init) * self.pair_norm(diff)  # [B, H/2, T, 2hd]
        T = q.shape[2]
        return out.transpose(1, 2).reshape(B, T, -1)


def make_attention(config: ModelConfig, layer_idx: int) -> Attention:
    if config.attention_kind == "differential":
        return DifferentialAttention(config, layer_idx)
    return Attention(config, layer_idx)
