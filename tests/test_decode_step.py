"""The one-token decode step's cheaper forms against the forms they replaced, for every attention
feature: additive decode masks built once per step (SDPA otherwise converts a boolean mask in
every layer), one-row cache writes by ``index_copy_`` (instead of ``index_put_``), and RMSNorm's
explicit float32 form without autograd (instead of ``F.rms_norm``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llamakin
from llamakin.config import RopeScaling
from llamakin.model import cache as cache_module, transformer as transformer_module
from llamakin.model.masks import AttentionMask, decode_masks

BASE = dict(
    vocab_size=101, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, intermediate_size=64
)

FEATURES = {
    "plain": {},
    "window on some layers": dict(sliding_window=3, sliding_window_layers=(0, 2)),
    "differential": dict(attention_kind="differential"),
    "qk-norm, interleaved partial rotary": dict(
        rope_layout="interleaved", rotary_dim=4, qk_norm=True
    ),
    "logn scale": dict(logn_attention_length=4),
    "keys cached before RoPE": dict(
        rope_cached_keys=True, rope_scaling=RopeScaling(type="dynamic", factor=2.0)
    ),
    "ChatGLM-6B (2-D RoPE, LayerNorm, GELU)": dict(
        rope_layout="glm2d",
        norm_type="layernorm",
        mlp_type="gelu_tanh",
        normed_residual_alpha=1.5,
        q_bias=True,
        k_bias=True,
        v_bias=True,
    ),
}


def boolean_decode_masks(key_valid, slots, windows, dtype=None):
    """The masks as they were: boolean, key visible iff not in the future, inside the window and
    not padding (written here from that rule, not from the module)."""
    k_pos = torch.arange(key_valid.shape[1])[None]
    s = slots[:, None]
    masks = {}
    for window in windows:
        allowed = (k_pos <= s) & key_valid
        if window is not None:
            allowed = allowed & (k_pos > s - window)
        masks[window] = AttentionMask(allowed[:, None, None, :], False)
    return masks


def index_put_write(self, layer, k, v):
    """The cache write as it was: advanced indexing, row b at slot ``slots[b]``."""
    keys, values = self.cache.keys[layer], self.cache.values[layer]
    rows = torch.arange(k.shape[0])
    keys[rows, :, self.slots] = k[:, :, 0]
    values[rows, :, self.slots] = v[:, :, 0]
    return keys, values


def randomized(config, dtype):
    torch.manual_seed(0)
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def run_steps(model, batch, padded):
    """Prefill 6 tokens (row 0 left-padded by 2 when ``padded``), then 5 decode steps; the logits
    of every step and the cache."""
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (batch, 6))
    mask = torch.ones(batch, 6, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    cache = model.new_cache(batch, 16)
    model(ids, attention_mask=mask if padded else None, cache=cache)
    logits = []
    for t in range(5):
        slot = 6 + t
        real = mask.sum(-1, keepdim=True) + t  # positions count real tokens only
        positions = (
            torch.stack((real, torch.zeros_like(real)), 1)
            if model.config.rope_layout == "glm2d"
            else real
        )
        slots = torch.full((batch,), slot)
        logits.append(
            model.decode_step(
                torch.randint(0, 101, (batch, 1)), positions, slots, cache.valid, cache
            )
        )
    return torch.stack(logits), cache


# every feature in float32; bfloat16 (its mask upcast with float32 attention on CPUs that emulate
# it) on two of them, to keep the fast suite fast
CASES = [(f, torch.float32) for f in FEATURES] + [
    ("plain", torch.bfloat16),
    ("differential", torch.bfloat16),
]


@pytest.mark.parametrize("feature,dtype", CASES)
@pytest.mark.parametrize("batch,padded", [(1, False), (3, True)])
@torch.no_grad()
def test_decode_step_equals_the_boolean_mask_index_put_step(
    monkeypatch, feature, dtype, batch, padded
):
    model = randomized(llamakin.ModelConfig(**BASE, **FEATURES[feature]), dtype)
    new_logits, new_cache = run_steps(model, batch, padded)
    monkeypatch.setattr(transformer_module, "decode_masks", boolean_decode_masks)
    monkeypatch.setattr(cache_module.SlotWriter, "write", index_put_write)
    old_logits, old_cache = run_steps(model, batch, padded)
    assert new_logits.dtype == dtype and torch.isfinite(new_logits).all()
    assert torch.equal(new_logits, old_logits)
    for a, b in zip(new_cache.keys + new_cache.values, old_cache.keys + old_cache.values):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "feature", ["plain", "window on some layers", "differential", "logn scale"]
)
@torch.no_grad()
def test_decode_step_equals_the_full_forward(feature):
    """Independent of the old forms: each step's logits are the full forward's at that position."""
    model = randomized(llamakin.ModelConfig(**BASE, **FEATURES[feature]), torch.float32)
    torch.manual_seed(2)
    ids = torch.randint(0, 101, (1, 10))
    full = model(ids)
    cache = model.new_cache(1, 16)
    model(ids[:, :6], cache=cache)
    for t in range(6, 10):
        step = model.decode_step(
            ids[:, t : t + 1], torch.tensor([[t]]), torch.tensor([t]), cache.valid, cache
        )
        assert (step[0] - full[0, t]).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3])
def test_additive_decode_masks_give_what_boolean_masks_give_to_sdpa(dtype, window):
    torch.manual_seed(0)
    key_valid = torch.rand(4, 12) > 0.3
    slots = torch.tensor([3, 7, 11, 0])
    key_valid[torch.arange(4), slots] = True
    additive = decode_masks(key_valid, slots, {window}, dtype)[window].mask
    boolean = boolean_decode_masks(key_valid, slots, {window})[window].mask
    assert additive.dtype == dtype and additive.shape == boolean.shape
    assert torch.equal(additive == 0, boolean) and bool((additive[~boolean] == float("-inf")).all())
    q, k, v = (torch.randn(4, h, n, 8, dtype=dtype) for h, n in ((6, 1), (2, 12), (2, 12)))
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=boolean, enable_gqa=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("tokens", [1, 7])
def test_rmsnorm_without_autograd_is_torch_rms_norm_bit_for_bit(affine, tokens):
    """Without autograd (decoding, the traced step) float32 RMSNorm takes the explicit form;
    with autograd ``F.rms_norm``. Both must be the same numbers, and gradients must still flow."""
    from llamakin.model.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.add_(torch.randn(96) * 0.3)
    x = torch.randn(3, tokens, 96) * 4
    want = F.rms_norm(x, (96,), norm.weight, 1e-6)
    with torch.no_grad():
        assert torch.equal(norm(x), want)
    x.requires_grad_(True)
    out = norm(x)
    assert torch.equal(out.detach(), want) and out.requires_grad
