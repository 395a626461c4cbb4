"""Every weight transform against its inverse and against the explicit formulas of docs/variants.md §2.3."""

from __future__ import annotations

import pytest
import torch

from llamakin.families.base import fused_rows, fused_rows_partial
from llamakin.transforms import (
    concat_rows,
    half_to_interleaved,
    interleaved_to_half,
    rope_reorder,
    split_rows,
)


def hf_convert_permute(w, n_heads, dim1, dim2):
    """transformers' convert_llama_weights_to_hf.permute (Meta -> HF), verbatim math."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def torchchat_unpermute(w, n_heads, hd):
    """torchchat's permute (HF -> Meta), for weights and 1-D biases."""
    return w.view(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads,hd,d", [(4, 8, 16), (2, 16, 5), (1, 64, 3)])
def test_interleaved_to_half_matches_transformers_converter(heads, hd, d):
    w = torch.randn(heads * hd, d)
    assert torch.equal(interleaved_to_half(w, heads), hf_convert_permute(w, heads, heads * hd, d))
    assert torch.equal(half_to_interleaved(w, heads), torchchat_unpermute(w, heads, hd))


@pytest.mark.parametrize("heads,hd", [(4, 8), (3, 16)])
def test_row_mapping_is_the_spec_formula(heads, hd):
    # HF row h*hd + j*(hd/2) + i  <-  Meta row h*hd + 2i + j
    meta_rows = torch.arange(heads * hd)
    hf_rows = interleaved_to_half(meta_rows, heads)
    for h in range(heads):
        for i in range(hd // 2):
            for j in range(2):
                assert hf_rows[h * hd + j * (hd // 2) + i] == h * hd + 2 * i + j


@pytest.mark.parametrize("shape", [(4 * 8, 6), (4 * 8,)])
@pytest.mark.parametrize("rotary_dim", [None, 4, 8])
def test_rope_permutation_round_trips_weights_and_biases(shape, rotary_dim):
    w = torch.randn(shape)
    there = interleaved_to_half(w, 4, rotary_dim)
    assert torch.equal(half_to_interleaved(there, 4, rotary_dim), w)
    assert torch.equal(
        rope_reorder(
            rope_reorder(w, 4, rotary_dim or 8, "half", "interleaved"),
            4,
            rotary_dim or 8,
            "interleaved",
            "half",
        ),
        w,
    )
    if rotary_dim not in (None, 8):  # partial rotary: the pass-through rows never move
        heads = w.reshape(4, 8, *shape[1:])
        assert torch.equal(there.reshape(4, 8, *shape[1:])[:, rotary_dim:], heads[:, rotary_dim:])
    assert not torch.equal(there, w)


def test_bias_permutation_matches_spec_formula():
    heads, hd = 3, 8
    b = torch.randn(heads * hd)
    assert torch.equal(
        interleaved_to_half(b, heads), b.view(heads, hd // 2, 2).transpose(1, 2).reshape(-1)
    )
    assert torch.equal(
        half_to_interleaved(b, heads), b.view(heads, 2, hd // 2).transpose(1, 2).reshape(-1)
    )


def test_concat_split_round_trip():
    parts = [torch.randn(4, 3), torch.randn(2, 3), torch.randn(2, 3)]
    fused = concat_rows(parts)
    assert all(torch.equal(a, b) for a, b in zip(split_rows(fused, (4, 2, 2)), parts))


def test_rules_work_on_meta_tensors():
    rule = fused_rows("x", ("a", "b"), (3, 5))
    shapes = [tuple(t.shape) for t in rule.from_canonical(torch.empty(8, 2, device="meta"))]
    assert shapes == [(3, 2), (5, 2)]


def test_partial_fused_bias_round_trip():
    rule = fused_rows_partial("qkv.bias", (("q", 4), (None, 2), ("v", 2)))
    q, v = torch.randn(4), torch.randn(2)
    fused = rule.to_canonical([q, v])
    assert torch.equal(fused, torch.cat([q, torch.zeros(2), v]))
    back = rule.from_canonical(fused)
    assert rule.sources == ("q", "v") and torch.equal(back[0], q) and torch.equal(back[1], v)
