"""Model-level behaviour beyond parity: chunked prefill, caches, padding, init."""

from __future__ import annotations

import pytest
import torch

import llamakin
from llamakin.model.attention import lambda_init_for

BASE = dict(
    vocab_size=101, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, intermediate_size=64
)


def randomized(config):
    torch.manual_seed(0)
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        dict(sliding_window=3),
        dict(attention_kind="differential"),
        dict(rope_layout="interleaved", rotary_dim=4, qk_norm=True),
    ],
)
@torch.no_grad()
def test_chunked_prefill_and_decode_equal_full_forward(knobs):
    model = randomized(llamakin.ModelConfig(**BASE, **knobs))
    ids = torch.randint(0, 101, (2, 17))
    full = model(ids)
    cache = model.new_cache(2, 32)
    pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 17)]
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5
    cache.reset()
    assert (model(ids, cache=cache) - full).abs().max() < 1e-5


@torch.no_grad()
def test_padding_never_leaks_into_real_tokens():
    model = randomized(llamakin.ModelConfig(**BASE))
    ids = torch.randint(0, 101, (1, 6))
    alone = model(ids)
    padded = torch.cat([torch.full((1, 4), 7), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    got = model(padded, attention_mask=mask)
    assert torch.isfinite(got).all()
    assert (got[:, 4:] - alone).abs().max() < 1e-5
    # with a cache, decoding after a padded prompt matches the unpadded run
    cache = model.new_cache(1, 16)
    model(padded, attention_mask=mask, cache=cache)
    nxt = torch.tensor([[5]])
    step = model(
        nxt, attention_mask=torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1), cache=cache
    )
    assert (step[0, -1] - model(torch.cat([ids, nxt], 1))[0, -1]).abs().max() < 1e-5


@torch.no_grad()
def test_last_only_returns_the_last_position():
    model = randomized(llamakin.ModelConfig(**BASE))
    ids = torch.randint(0, 101, (2, 7))
    assert (model(ids, last_only=True) - model(ids)[:, -1:]).abs().max() < 1e-6


def test_lambda_init_uses_a_zero_based_layer_index():
    assert lambda_init_for(0) == pytest.approx(0.2)
    assert lambda_init_for(1) == pytest.approx(0.3555, abs=1e-4)
    assert lambda_init_for(7) == pytest.approx(0.7265, abs=1e-4)
    model = llamakin.Transformer(llamakin.ModelConfig(**BASE, attention_kind="differential"))
    assert [b.attn.lambda_init for b in model.layers] == [lambda_init_for(i) for i in range(3)]
    assert 0.05 < model.layers[0].attn.lambda_q1.std() < 0.2


def test_training_init_and_gradients_flow():
    model = llamakin.Transformer(llamakin.ModelConfig(**BASE, q_bias=True, k_bias=True))
    ids = torch.randint(0, 101, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.3
    bias_grad = model.layers[0].attn.qkv.bias.grad
    q, k = 6 * 8, 2 * 8
    # no v bias: stays zero
    assert bias_grad[: q + k].abs().sum() > 0 and bias_grad[q + k :].abs().sum() == 0


def test_rmsnorm_rounding_orders_match_their_references():
    from llamakin.model.norm import RMSNorm

    torch.manual_seed(0)
    x = torch.randn(4, 64).to(torch.bfloat16)
    w = (1 + 0.3 * torch.randn(64)).to(torch.bfloat16)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    hf = RMSNorm(64, 1e-5, "cast_then_mul")
    glm2 = RMSNorm(64, 1e-5, "mul_then_cast")
    with torch.no_grad():
        hf.weight.copy_(w)
        glm2.weight.copy_(w)
        hf, glm2 = hf.to(torch.bfloat16), glm2.to(torch.bfloat16)
        assert torch.equal(hf(x), w * normed.to(torch.bfloat16))  # docs/variants.md §1.1
        assert torch.equal(glm2(x), (w * normed).to(torch.bfloat16))  # docs/variants.md §6.2
        assert not torch.equal(hf(x), glm2(x))  # the orders really round differently


def test_layernorm_gelu_model_matches_a_plain_reference():
    """ChatGLM-6B-style knobs (LayerNorm with bias, GELU-tanh MLP with biases) vs explicit math."""
    config = llamakin.ModelConfig(
        **{**BASE, "num_layers": 1},
        norm_type="layernorm",
        mlp_type="gelu_tanh",
        mlp_bias=True,
        norm_eps=1e-5,
    )
    model = randomized(config)
    block = model.layers[0]
    x = torch.randn(2, 5, 48)

    def ln(m, t):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * m.weight + m.bias

    def gelu_tanh(t):
        return 0.5 * t * (1 + torch.tanh(0.7978845608028654 * (t + 0.044715 * t**3)))

    with torch.no_grad():
        y = ln(block.mlp_norm, x)
        expected = block.mlp.down(gelu_tanh(block.mlp.up(y)))
        assert (block.mlp(block.mlp_norm(x)) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_few_half_precision_queries_attend_in_float32_on_any_cpu(dtype):
    """Decoding in half precision on CPU computes attention in float32 and rounds once, whether or
    not the CPU has half-precision instructions (on an AVX-512/bf16 EPYC PyTorch's bf16 kernel
    took 5.5x longer for 8 decoding rows over a masked 256-slot cache); a prompt keeps the kernel
    in its own dtype."""
    from llamakin.model.attention import FEW_QUERIES
    from llamakin.model.masks import build_mask

    config = llamakin.ModelConfig(
        vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    attention = llamakin.Transformer(config).layers[0].attn
    torch.manual_seed(0)
    key_valid = torch.ones(3, 40, dtype=torch.bool)
    key_valid[0, :5] = False  # a padded row
    for queries in (1, FEW_QUERIES, FEW_QUERIES + 1):
        q = torch.randn(3, 4, queries, 16).to(dtype)
        k, v = (torch.randn(3, 2, 40, 16).to(dtype) for _ in range(2))
        mask = build_mask(key_valid, 40 - queries, queries, None, q.device)
        out = attention.sdpa(q, k, v, mask)
        as_float32 = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask.mask, is_causal=mask.is_causal,
            scale=config.scale, enable_gqa=True,
        ).to(dtype)  # fmt: skip
        in_dtype = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal, scale=config.scale,
            enable_gqa=True,
        )  # fmt: skip
        assert out.dtype == dtype
        assert torch.equal(out, as_float32 if queries <= FEW_QUERIES else in_dtype), queries
