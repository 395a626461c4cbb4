"""Re-implementations of the original remote-code models, written in these tests from reading them.

transformers 5 cannot import the original ``modeling_*.py`` files (they target transformers 4.x),
so each reference below follows one original file statement by statement, in its own layout
(sequence-first where the original is), with its own cache, mask and dtype handling, reading its
config through attribute access as the original does. Nothing here is llamakin code.

* :class:`QwenV1` — ``modeling_qwen.py`` of Qwen-7B (``QWenModel.forward``'s per-row NTK alpha list
  cached at prefill, RoPE by slot index sliced ``[-cur_len:]``, logn by key index, the SDPA branch
  with its additive ``finfo.min`` masks, rotation in float32, RMSNorm cast then multiply).
* :class:`InternLMV1` — ``tools/transformers/internlm_model/modeling_internlm.py``: keys cached
  *before* RoPE and re-rotated every step, ``InternLMDynamicNTKScalingRotaryEmbedding._update_cached``
  (base from the whole key length), the query taking the last table row when it is one token.
* :class:`ChatGLM2` — ``modeling_chatglm.py`` of ChatGLM2-6B: sequence-first ``[T, B, ...]``, cache
  ``[S, B, G, hd]`` concatenated on dim 0, ``RotaryEmbedding.forward_impl`` computed in
  ``config.torch_dtype``, ``get_masks``, the SDPA branch of ``CoreAttention``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def linear(x, w, b=None):
    return F.linear(x, w, b)


def load_original(directory: Path, dtype: torch.dtype) -> tuple[dict, dict]:
    config = json.loads((Path(directory) / "config.json").read_text())
    weights = {k: v.to(dtype) for k, v in load_file(Path(directory) / "model.safetensors").items()}
    return config, weights


# -- Qwen v1 -------------------------------------------------------------------------------------------
class QwenV1:
    """``QWenLMHeadModel`` (eager; the torch-2 SDPA branch, no flash-attn, no cache quantization)."""

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float32):
        c, self.w = load_original(directory, dtype)
        self.config = SimpleNamespace(**c)
        self.dtype = dtype
        self.ntk_alpha_cached_list = [1.0]  # RotaryEmbedding._ntk_alpha_cached_list
        L = self.config.seq_length
        self.logn = torch.tensor([math.log(i, L) if i > L else 1 for i in range(1, 32768)])[
            None, :, None, None
        ]

    def get_ntk_alpha(self, true_seq_len):
        context_value = math.log(true_seq_len / self.config.seq_length, 2) + 1
        return max(2 ** math.ceil(context_value) - 1, 1)

    def rotary(self, seqlen, ntk_alpha):
        """``RotaryEmbedding.forward``: float32 tables of ``max(2 * seqlen, 16)`` rows, sliced."""
        c = self.config
        dim = int(c.kv_channels * c.rotary_pct)
        base = c.rotary_emb_base * ntk_alpha ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        seq = torch.arange(max(2 * seqlen, 16))
        emb = torch.outer(seq.type_as(inv_freq), inv_freq)
        emb = torch.cat((emb, emb), -1)[None, :, None, :]
        return emb.cos()[:, :seqlen], emb.sin()[:, :seqlen]

    @staticmethod
    def apply_rotary(t, cos, sin):
        rot_dim = cos.shape[-1]
        t_float = t.float()
        t_rot, t_pass = t_float[..., :rot_dim], t_float[..., rot_dim:]
        x1, x2 = t_rot.unflatten(-1, (2, -1)).unbind(-2)
        t_rot = t_rot * cos + torch.cat((-x2, x1), -1) * sin
        return torch.cat((t_rot, t_pass), -1).type_as(t)

    def rms(self, x, name):
        eps = self.config.layer_norm_epsilon
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * self.w[name]

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, past=None):
        """``input_ids [B, T]``, ``attention_mask [B, past + T]``; returns ``(logits, presents)``."""
        c, w = self.config, self.w
        B, T = input_ids.shape
        if attention_mask is not None:
            attention_mask = attention_mask.view(B, -1)[:, None, None, :].to(self.dtype)
            attention_mask = (1.0 - attention_mask) * torch.finfo(self.dtype).min
        hidden = w["transformer.wte.weight"][input_ids]
        kv_seq_len = T + (past[0][0].shape[1] if past is not None else 0)
        if not c.use_dynamic_ntk:
            alphas = [1.0]
        elif kv_seq_len != T:
            alphas = self.ntk_alpha_cached_list
        else:
            alphas = []
            if attention_mask is not None and kv_seq_len > c.seq_length:
                true_seq_lens = (
                    attention_mask.squeeze(1).squeeze(1).eq(0).sum(dim=-1, dtype=torch.int32)
                )
                for i in range(B):
                    alphas.append(self.get_ntk_alpha(true_seq_lens[i].item()))
            else:
                alphas.append(self.get_ntk_alpha(kv_seq_len))
        self.ntk_alpha_cached_list = alphas
        rotary_list = [self.rotary(kv_seq_len, a) for a in alphas]
        H, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        presents = []
        for i in range(c.num_hidden_layers):
            p = f"transformer.h.{i}."
            x = self.rms(hidden, p + "ln_1.weight")
            mixed = linear(x, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
            q, k, v = (t.view(B, T, H, hd) for t in mixed.split(c.hidden_size, dim=2))
            if len(rotary_list) == 1:
                cos, sin = (t[:, -T:] for t in rotary_list[0])
                q, k = self.apply_rotary(q, cos, sin), self.apply_rotary(k, cos, sin)
            else:
                qs, ks = [], []
                for b, (cos, sin) in enumerate(rotary_list):
                    cos, sin = cos[:, -T:], sin[:, -T:]
                    qs.append(self.apply_rotary(q[b : b + 1], cos, sin))
                    ks.append(self.apply_rotary(k[b : b + 1], cos, sin))
                q, k = torch.cat(qs), torch.cat(ks)
            if past is not None:
                k, v = torch.cat((past[i][0], k), 1), torch.cat((past[i][1], v), 1)
            presents.append((k, v))
            key_size = k.shape[1]
            if key_size > c.seq_length and c.use_logn_attn:
                q = q * self.logn[:, key_size - T : key_size].type_as(q).expand_as(q)
            causal = (
                torch.tril(torch.ones(key_size, key_size, dtype=torch.bool)).view(
                    1, 1, key_size, key_size
                )
                if T == key_size
                else None
            )
            q, kk, vv = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            if attention_mask is not None:
                mask = attention_mask.expand(-1, -1, T, -1)
                if causal is not None:
                    mask = mask.masked_fill(~causal, torch.finfo(q.dtype).min)
            else:
                mask = causal
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(1, 2)
            out = linear(
                out.reshape(B, T, H * hd),
                w[p + "attn.c_proj.weight"],
                w.get(p + "attn.c_proj.bias"),
            )
            hidden = hidden + out
            x = self.rms(hidden, p + "ln_2.weight")
            a1 = linear(x, w[p + "mlp.w1.weight"], w.get(p + "mlp.w1.bias"))
            a2 = linear(x, w[p + "mlp.w2.weight"], w.get(p + "mlp.w2.bias"))
            hidden = hidden + linear(
                a1 * F.silu(a2), w[p + "mlp.c_proj.weight"], w.get(p + "mlp.c_proj.bias")
            )
        return linear(self.rms(hidden, "transformer.ln_f.weight"), w["lm_head.weight"]), presents

    def greedy(
        self, rows: list[list[int]], new_tokens: int
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """HF-style greedy generation of a left-padded batch with the cache; the step logits too."""
        T = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
        logits, past = self.forward(ids, mask)
        steps, out = [logits[:, -1]], [[] for _ in rows]
        for _ in range(new_tokens):
            nxt = steps[-1].argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                out[b].append(t)
            mask = torch.cat((mask, torch.ones(len(rows), 1, dtype=mask.dtype)), 1)
            logits, past = self.forward(nxt[:, None], mask, past)
            steps.append(logits[:, -1])
        return out, steps


# -- InternLM v1 ---------------------------------------------------------------------------------------
class InternLMV1:
    """``InternLMForCausalLM`` of ``tools/transformers/internlm_model`` (eager attention)."""

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float32):
        c, self.w = load_original(directory, dtype)
        self.config = SimpleNamespace(**c)
        self.dtype = dtype

    def rotary(self, seq_len, dtype):
        """``InternLMRotaryEmbedding`` / ``InternLMDynamicNTKScalingRotaryEmbedding`` (``_update_cached``)."""
        c = self.config
        dim = c.hidden_size // c.num_attention_heads
        base, max_pos = c.rotary["base"], c.max_position_embeddings
        if c.rotary["type"] == "dynamic" and seq_len > max_pos:
            factor = c.rotary.get("scaling_factor", 1.0)
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        t = torch.arange(max(seq_len, max_pos), dtype=inv_freq.dtype)
        freqs = torch.einsum("i,j->ij", t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None, :seq_len].to(dtype), emb.sin()[None, None, :seq_len].to(dtype)

    def rms(self, x, name):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.config.rms_norm_eps)
        weight = self.w[name]
        if weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(weight.dtype)
        return weight * x

    @staticmethod
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    def decoder_mask(self, attention_mask, B, T, past_length):
        """``_prepare_decoder_attention_mask``: ``_make_causal_mask`` + ``_expand_mask``."""
        dtype, big = self.dtype, torch.finfo(self.dtype).min
        causal = None
        if T > 1:
            mask = torch.full((T, T), big)
            cond = torch.arange(T)
            mask.masked_fill_(cond < (cond + 1).view(T, 1), 0)
            mask = mask.to(dtype)
            if past_length > 0:
                mask = torch.cat([torch.zeros(T, past_length, dtype=dtype), mask], dim=-1)
            causal = mask[None, None].expand(B, 1, T, T + past_length)
        expanded = (
            attention_mask[:, None, None, :].expand(B, 1, T, attention_mask.shape[1]).to(dtype)
        )
        inverted = 1.0 - expanded
        expanded = inverted.masked_fill(inverted.to(torch.bool), big)
        return expanded if causal is None else expanded + causal

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, past=None):
        c, w = self.config, self.w
        B, T = input_ids.shape
        past_length = past[0][0].shape[2] if past is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, T + past_length, dtype=torch.bool)
        mask = self.decoder_mask(attention_mask, B, T, past_length)
        hidden = w["model.embed_tokens.weight"][input_ids]
        H = c.num_attention_heads
        hd = c.hidden_size // H
        presents = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            x = self.rms(hidden, p + "input_layernorm.weight")
            q, k, v = (
                linear(
                    x, w[p + f"self_attn.{n}_proj.weight"], w.get(p + f"self_attn.{n}_proj.bias")
                )
                .view(B, T, H, hd)
                .transpose(1, 2)
                for n in "qkv"
            )
            if past is not None:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            presents.append((k, v))  # keys cached BEFORE RoPE
            S = k.shape[-2]
            cos, sin = self.rotary(S, v.dtype)
            cos, sin = (
                cos[0, 0][None, None].expand(B, -1, -1, -1),
                sin[0, 0][None, None].expand(B, -1, -1, -1),
            )
            if q.shape[2] == 1:
                q = q * cos[:, :, -1, :] + self.rotate_half(q) * sin[:, :, -1, :]
            else:
                q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd)
            scores = torch.max(scores + mask, torch.tensor(torch.finfo(scores.dtype).min))
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, c.hidden_size)
            hidden = hidden + linear(
                out, w[p + "self_attn.o_proj.weight"], w.get(p + "self_attn.o_proj.bias")
            )
            x = self.rms(hidden, p + "post_attention_layernorm.weight")
            gate, up = (
                linear(x, w[p + "mlp.gate_proj.weight"]),
                linear(x, w[p + "mlp.up_proj.weight"]),
            )
            hidden = hidden + linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])
        return linear(self.rms(hidden, "model.norm.weight"), w["lm_head.weight"]), presents


# -- ChatGLM2-6B ---------------------------------------------------------------------------------------
CHATGLM2_CONFIG_DEFAULTS = dict(  # ChatGLMConfig.__init__'s defaults (configuration_chatglm.py)
    num_layers=28,
    padded_vocab_size=65024,
    hidden_size=4096,
    ffn_hidden_size=13696,
    kv_channels=128,
    num_attention_heads=32,
    seq_length=2048,
    hidden_dropout=0.0,
    classifier_dropout=None,
    attention_dropout=0.0,
    layernorm_epsilon=1e-5,
    rmsnorm=True,
    apply_residual_connection_post_layernorm=False,
    post_layer_norm=True,
    add_bias_linear=False,
    add_qkv_bias=False,
    bias_dropout_fusion=True,
    multi_query_attention=False,
    multi_query_group_num=1,
    apply_query_key_layer_scaling=True,
    attention_softmax_in_fp32=True,
    fp32_residual_connection=False,
    quantization_bit=0,
    pre_seq_len=None,
    prefix_projection=False,
    initializer_range=0.02,
)


def chatglm2_config(config_json: dict) -> SimpleNamespace:
    """What ``ChatGLMConfig(**config.json)`` holds: its defaults, the file's keys, ``torch_dtype`` as a
    dtype. Nothing else: PretrainedConfig (4.x) gives no ``use_cache``, which ``forward`` reads."""
    values = {**CHATGLM2_CONFIG_DEFAULTS, **config_json}
    values["vocab_size"] = values["padded_vocab_size"]
    if isinstance(values.get("torch_dtype"), str):
        values["torch_dtype"] = getattr(torch, values["torch_dtype"])
    values.setdefault("torch_dtype", None)
    return SimpleNamespace(**values)


class ChatGLM2:
    """``ChatGLMForConditionalGeneration`` of ChatGLM2-6B, sequence-first, torch-2 SDPA attention."""

    def __init__(self, directory: Path):
        raw, _ = load_original(directory, torch.float32)
        self.config = chatglm2_config(raw)
        dtype = self.config.torch_dtype or torch.float32
        self.w = {
            k: v.to(dtype) for k, v in load_file(Path(directory) / "model.safetensors").items()
        }
        self.dtype = dtype

    def rope_cache(self):
        """``RotaryEmbedding(rotary_dim // 2, dtype=config.torch_dtype).forward(seq_length)``."""
        c = self.config
        rotary_dim = (
            c.hidden_size // c.num_attention_heads if c.kv_channels is None else c.kv_channels
        )
        n_elem, dtype = rotary_dim // 2, self.dtype
        theta = 1.0 / (10000 ** (torch.arange(0, n_elem, 2, dtype=dtype) / n_elem))
        seq_idx = torch.arange(c.seq_length, dtype=dtype)
        idx_theta = torch.outer(seq_idx, theta).float()
        cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
        if dtype in (torch.float16, torch.bfloat16):
            cache = cache.bfloat16() if dtype == torch.bfloat16 else cache.half()
        return cache

    @staticmethod
    def apply_rope(x, rope_cache):
        sq, np_ = x.size(0), x.size(2)
        rot_dim = rope_cache.shape[-2] * 2
        x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        rope_cache = rope_cache[:sq]
        xshaped = x.reshape(sq, -1, np_, rot_dim // 2, 2)
        rope_cache = rope_cache.view(sq, -1, 1, xshaped.size(3), 2)
        out = torch.stack(
            [
                xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
                xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1],
            ],
            -1,
        )
        return torch.cat((out.flatten(3), x_pass), dim=-1)

    def rms(self, x, name):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (self.w[name] * (x * torch.rsqrt(variance + self.config.layernorm_epsilon))).to(
            x.dtype
        )

    @staticmethod
    def get_masks(input_ids, past, padding_mask):
        B, T = input_ids.shape
        full = torch.ones(B, T, T).tril_()
        past_length = past[0][0].shape[0] if past else 0
        if past_length:
            full = torch.cat((torch.ones(B, T, past_length), full), dim=-1)
        if padding_mask is not None:
            full = full * padding_mask.unsqueeze(1)
        if not past_length and padding_mask is not None:
            full -= padding_mask.unsqueeze(-1) - 1
        return (full < 0.5).bool().unsqueeze(1)

    @torch.no_grad()
    def forward(self, input_ids, position_ids, attention_mask=None, past=None, use_cache=None):
        c, w = self.config, self.w
        # AttributeError without the key
        use_cache = use_cache if use_cache is not None else c.use_cache
        B, T = input_ids.shape
        # [T, B, d]
        hidden = w["transformer.embedding.word_embeddings.weight"][input_ids].transpose(0, 1)
        full_mask = None
        if (attention_mask is not None and not attention_mask.all()) or (past and T != 1):
            full_mask = self.get_masks(input_ids, past, attention_mask)
        rope = self.rope_cache()[position_ids].transpose(0, 1).contiguous()
        H, G = (
            c.num_attention_heads,
            (c.multi_query_group_num if c.multi_query_attention else c.num_attention_heads),
        )
        hd = c.kv_channels
        presents = []
        for i in range(c.num_layers):
            p = f"transformer.encoder.layers.{i}."
            x = self.rms(hidden, p + "input_layernorm.weight")
            mixed = linear(
                x,
                w[p + "self_attention.query_key_value.weight"],
                w.get(p + "self_attention.query_key_value.bias"),
            )
            q, k, v = mixed.split([H * hd, G * hd, G * hd], dim=-1)
            q, k, v = q.view(T, B, H, hd), k.view(T, B, G, hd), v.view(T, B, G, hd)
            q, k = self.apply_rope(q, rope), self.apply_rope(k, rope)
            if past is not None:
                k, v = torch.cat((past[i][0], k), dim=0), torch.cat((past[i][1], v), dim=0)
            presents.append((k, v) if use_cache else None)
            k = (
                k.unsqueeze(-2)
                .expand(-1, -1, -1, H // G, -1)
                .contiguous()
                .view(k.shape[0], B, H, hd)
            )
            v = (
                v.unsqueeze(-2)
                .expand(-1, -1, -1, H // G, -1)
                .contiguous()
                .view(v.shape[0], B, H, hd)
            )
            qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
            if full_mask is None and qq.shape[2] == kk.shape[2]:
                ctx = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
            else:
                ctx = F.scaled_dot_product_attention(
                    qq, kk, vv, None if full_mask is None else ~full_mask
                )
            ctx = ctx.permute(2, 0, 1, 3).reshape(T, B, H * hd)
            out = linear(
                ctx, w[p + "self_attention.dense.weight"], w.get(p + "self_attention.dense.bias")
            )
            hidden = hidden + out
            y = self.rms(hidden, p + "post_attention_layernorm.weight")
            z = linear(y, w[p + "mlp.dense_h_to_4h.weight"])
            a, b = torch.chunk(z, 2, dim=-1)
            hidden = hidden + linear(F.silu(a) * b, w[p + "mlp.dense_4h_to_h.weight"])
        hidden = self.rms(hidden, "transformer.encoder.final_layernorm.weight")
        logits = linear(hidden, w["transformer.output_layer.weight"]).transpose(0, 1).contiguous()
        return logits, presents


# -- ChatGLM-6B -----------------------------------------------------------------------------------------
class ChatGLM6B:
    """``ChatGLMForConditionalGeneration`` of ChatGLM-6B (final release), sequence-first, with the
    tokenizer's ``_pad`` (left padding: blocked mask rows/columns, zero positions) and
    ``_update_model_kwargs_for_generation`` for decoding with its ``[S, B, H, hd]`` cache."""

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float32):
        c, self.w = load_original(directory, dtype)
        self.config = SimpleNamespace(**c)
        self.dtype = dtype

    def encode(self, rows: list[list[int]]):
        """``ChatGLMTokenizer._pad`` for already-encoded rows: ``(ids, position_ids [B,2,T], mask [B,1,T,T])``."""
        c = self.config
        T = max(len(r) for r in rows)
        ids, positions, masks = [], [], []
        for r in rows:
            n = len(r)
            ctx = r.index(c.bos_token_id) if c.bos_token_id in r else n
            mask = torch.ones(1, n, n).tril()
            mask[:, :, :ctx] = 1
            mask = mask < 0.5
            pos = torch.arange(n)
            mask_token = c.mask_token_id if c.mask_token_id in r else c.gmask_token_id
            if mask_token in r:
                pos[ctx:] = r.index(mask_token)
            block = torch.cat([torch.zeros(ctx, dtype=torch.long), torch.arange(1, n - ctx + 1)])
            pad = T - n
            ids.append([c.pad_token_id] * pad + r)
            masks.append(F.pad(mask, (pad, 0, pad, 0), value=True))
            positions.append(F.pad(torch.stack([pos, block]), (pad, 0), value=0))
        return torch.tensor(ids), torch.stack(positions), torch.stack(masks)

    def table(self, seq_len):
        """``RotaryEmbedding``: inv_freq created ``.half()``, then a buffer in the model's dtype."""
        dim = self.config.hidden_size // (self.config.num_attention_heads * 2)
        inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half().to(self.dtype)
        t = torch.arange(seq_len, dtype=inv_freq.dtype)
        freqs = torch.einsum("i,j->ij", t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def rotate(x, cos, sin, position_id):  # x [sq, b, np, hn], position_id [sq, b]
        cos, sin = (
            F.embedding(position_id, cos).unsqueeze(2),
            F.embedding(position_id, sin).unsqueeze(2),
        )
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return x * cos + torch.cat((-x2, x1), dim=x1.ndim - 1) * sin

    def ln(self, x, name):
        return F.layer_norm(
            x,
            (x.shape[-1],),
            self.w[name + ".weight"],
            self.w[name + ".bias"],
            self.config.layernorm_epsilon,
        )

    @torch.no_grad()
    def forward(self, ids, position_ids, attention_mask, past=None):
        c, w = self.config, self.w
        B, T = ids.shape
        H = c.num_attention_heads
        hn = c.hidden_size // H
        alpha = (
            2 * 28
        ) ** 0.5  # GLMBlock(num_layers=28): ChatGLMModel.get_layer never passes its depth
        hidden = w["transformer.word_embeddings.weight"][ids].transpose(0, 1)  # [T, B, d]
        cos, sin = self.table(int(position_ids.max()) + 1)
        pos, block = position_ids[:, 0, :].transpose(0, 1), position_ids[:, 1, :].transpose(0, 1)
        presents = []
        for i in range(c.num_layers):
            t = f"transformer.layers.{i}."
            x = self.ln(hidden, t + "input_layernorm")
            mixed = linear(
                x,
                w[t + "attention.query_key_value.weight"],
                w[t + "attention.query_key_value.bias"],
            )
            q, k, v = mixed.view(T, B, H, 3 * hn).split(hn, dim=-1)
            q1, q2 = q.chunk(2, dim=-1)
            k1, k2 = k.chunk(2, dim=-1)
            q = torch.cat(
                [self.rotate(q1, cos, sin, pos), self.rotate(q2, cos, sin, block)], dim=-1
            )
            k = torch.cat(
                [self.rotate(k1, cos, sin, pos), self.rotate(k2, cos, sin, block)], dim=-1
            )
            if past is not None:
                k, v = torch.cat((past[i][0], k), dim=0), torch.cat((past[i][1], v), dim=0)
            presents.append((k, v))
            S = k.shape[0]
            coeff = float(i + 1)
            q = q / (math.sqrt(hn) * coeff)
            scores = torch.baddbmm(
                torch.zeros(1, 1, 1, dtype=q.dtype),
                q.reshape(T, B * H, hn).transpose(0, 1),
                k.reshape(S, B * H, hn).transpose(0, 1).transpose(1, 2),
                beta=0.0,
                alpha=1.0,
            )
            scores = scores.view(B, H, T, S)
            if not (attention_mask == 0).all():
                scores = scores.masked_fill(attention_mask, -10000.0)
            dtype = scores.dtype
            probs = F.softmax(scores.float() * coeff, dim=-1).type(dtype)
            ctx = torch.bmm(probs.view(B * H, T, S), v.reshape(S, B * H, hn).transpose(0, 1))
            ctx = ctx.view(B, H, T, hn).permute(2, 0, 1, 3).reshape(T, B, c.hidden_size)
            attn = linear(ctx, w[t + "attention.dense.weight"], w[t + "attention.dense.bias"])
            hidden = x * alpha + attn
            y = self.ln(hidden, t + "post_attention_layernorm")
            up = linear(y, w[t + "mlp.dense_h_to_4h.weight"], w[t + "mlp.dense_h_to_4h.bias"])
            gelu = (
                0.5 * up * (1.0 + torch.tanh(0.7978845608028654 * up * (1.0 + 0.044715 * up * up)))
            )
            hidden = y * alpha + linear(
                gelu, w[t + "mlp.dense_4h_to_h.weight"], w[t + "mlp.dense_4h_to_h.bias"]
            )
        hidden = self.ln(hidden, "transformer.final_layernorm")
        # tied when not stored
        head = w.get("lm_head.weight", w["transformer.word_embeddings.weight"])
        return linear(hidden, head).permute(1, 0, 2).contiguous(), presents

    def greedy(self, rows, new_tokens):
        """The original generation loop (greedy): its masks and positions grow as
        ``_update_model_kwargs_for_generation`` grows them; returns every step's logits ``[B, V]``."""
        ids, positions, mask = self.encode(rows)
        logits, past = self.forward(ids, positions, mask)
        steps = [logits[:, -1]]
        for _ in range(new_tokens):
            nxt = steps[-1].argmax(-1)[:, None]
            mask = torch.cat([mask, mask.new_ones((*mask.shape[:3], 1))], dim=3)
            new = mask[:, :, -1:].clone()
            new[..., -1] = False
            mask = torch.cat([mask, new], dim=2)
            new_position = positions[..., -1:].clone()
            new_position[:, 1, :] += 1
            positions = torch.cat([positions, new_position], dim=-1)
            logits, past = self.forward(nxt, positions[..., -1:], mask[:, :, -1:], past)
            steps.append(logits[:, -1])
        return steps


# -- InternLM2 ------------------------------------------------------------------------------------------
class InternLM2:
    """``InternLM2ForCausalLM`` (remote ``modeling_internlm2.py``, eager attention): grouped ``wqkv``
    rearranged ``b q (h gs d) -> b q h gs d``, keys cached after RoPE, the rotary module's state
    (``max_seq_len_cached`` and, for ``dynamic``, the base of the longest length seen so far)."""

    def __init__(self, directory: Path, dtype: torch.dtype = torch.float32):
        c, self.w = load_original(directory, dtype)
        self.config = SimpleNamespace(**c)
        self.dtype = dtype
        dim = c["hidden_size"] // c["num_attention_heads"]
        self.inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
        self._set_cos_sin_cache(c["max_position_embeddings"], torch.get_default_dtype())

    def _set_cos_sin_cache(self, seq_len, dtype):
        c = self.config
        self.max_seq_len_cached = seq_len
        scaling = c.rope_scaling or {}
        dim = c.hidden_size // c.num_attention_heads
        if scaling.get("type") == "dynamic" and seq_len > c.max_position_embeddings:
            factor = scaling["factor"]
            base = c.rope_theta * (
                (factor * seq_len / c.max_position_embeddings) - (factor - 1)
            ) ** (dim / (dim - 2))
            self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        t = torch.arange(self.max_seq_len_cached, dtype=self.inv_freq.dtype)
        if scaling.get("type") == "linear":
            t = t / scaling["factor"]
        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cached, self.sin_cached = emb.cos().to(dtype), emb.sin().to(dtype)

    def rotary(self, x, seq_len):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len, torch.float32)
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)

    def rms(self, x, name):
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return self.w[name] * x.to(input_dtype)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, past=None):
        c, w = self.config, self.w
        B, T = input_ids.shape
        past_length = past[0][0].shape[2] if past is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, T + past_length, dtype=torch.bool)
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[
            :, -T:
        ]
        mask = InternLMV1.decoder_mask(self, attention_mask, B, T, past_length)
        H, Hkv = c.num_attention_heads, c.num_key_value_heads
        hd, n_rep = c.hidden_size // H, H // Hkv
        hidden = w["model.tok_embeddings.weight"][input_ids]
        presents = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            x = self.rms(hidden, p + "attention_norm.weight")
            qkv = linear(x, w[p + "attention.wqkv.weight"], w.get(p + "attention.wqkv.bias"))
            qkv = qkv.view(B, T, Hkv, 2 + n_rep, hd)
            q = qkv[..., :n_rep, :].reshape(B, T, H, hd).transpose(1, 2)
            k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
            cos, sin = self.rotary(v, T + past_length)
            cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
            q = q * cos + InternLMV1.rotate_half(q) * sin
            k = k * cos + InternLMV1.rotate_half(k) * sin
            if past is not None:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            presents.append((k, v))
            kk = k[:, :, None].expand(B, Hkv, n_rep, k.shape[2], hd).reshape(B, H, k.shape[2], hd)
            vv = v[:, :, None].expand(B, Hkv, n_rep, v.shape[2], hd).reshape(B, H, v.shape[2], hd)
            scores = torch.matmul(q, kk.transpose(2, 3)) / math.sqrt(hd) + mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, vv).transpose(1, 2).reshape(B, T, c.hidden_size)
            hidden = hidden + linear(
                out, w[p + "attention.wo.weight"], w.get(p + "attention.wo.bias")
            )
            x = self.rms(hidden, p + "ffn_norm.weight")
            hidden = hidden + linear(
                F.silu(linear(x, w[p + "feed_forward.w1.weight"]))
                * linear(x, w[p + "feed_forward.w3.weight"]),
                w[p + "feed_forward.w2.weight"],
            )
        return linear(self.rms(hidden, "model.norm.weight"), w["output.weight"]), presents
