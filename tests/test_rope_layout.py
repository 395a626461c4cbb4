"""The seed articles' question, answered: is switching the RoPE implementation between Meta's
interleaved (complex) form and HF's rotate_half form a matter of re-training?

No. Interleaved RoPE on Meta-ordered q/k weights equals rotate_half RoPE on permuted weights, to
float rounding, with and without q/k biases (docs/variants.md §2.3). No calibration fine-tune is needed;
what *is* needed is permuting the biases too (the Granite Code converter bug).
"""

from __future__ import annotations

import pytest
import torch

import llamakin
from llamakin.cli import main
from llamakin.convert import convert_rope_layout
from llamakin.model.rope import RotaryEmbedding, apply_rotary
from llamakin.transforms import interleaved_to_half
from hf_cases import CASES, hf_positions, ragged_batch, save_case

THETA = 10000.0


def meta_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Meta llama/model.py: complex multiplication on adjacent pairs, x [B, T, H, hd]."""
    hd = x.shape[-1]
    freqs = 1.0 / THETA ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd)
    freqs_cis = torch.polar(
        torch.ones(len(positions), hd // 2), torch.outer(positions.float(), freqs)
    )
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], hd // 2, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def hf_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb with rotate_half, x [B, T, H, hd]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / THETA ** (torch.arange(0, hd, 2).float() / hd)
    emb = torch.cat([torch.outer(positions.float(), inv_freq)] * 2, -1)
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]
    rotated = torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), -1)
    return x * cos + rotated * sin


def our_rope(x, positions, layout):
    config = llamakin.ModelConfig(
        vocab_size=8,
        hidden_size=x.shape[-1] * x.shape[2],
        num_layers=1,
        num_heads=x.shape[2],
        intermediate_size=8,
        rope_theta=THETA,
        rope_layout=layout,
    )
    cos, signed_sin = RotaryEmbedding(config)(positions[None], x.dtype)
    return apply_rotary(x.transpose(1, 2), cos, signed_sin, layout).transpose(1, 2)


def test_both_layouts_match_their_reference_implementations():
    x, pos = torch.randn(2, 7, 3, 16), torch.arange(7)
    assert (our_rope(x, pos, "interleaved") - meta_rope(x, pos)).abs().max() < 1e-5
    assert (our_rope(x, pos, "half") - hf_rope(x, pos)).abs().max() < 1e-6


@pytest.mark.parametrize("with_bias", [False, True])
def test_meta_rope_on_meta_weights_equals_hf_rope_on_permuted_weights(with_bias):
    torch.manual_seed(0)
    heads, hd, d, T = 4, 16, 32, 11
    x, pos = torch.randn(1, T, d), torch.arange(T)
    wq, wk = torch.randn(heads * hd, d), torch.randn(heads * hd, d)
    bq, bk = (
        (torch.randn(heads * hd), torch.randn(heads * hd))
        if with_bias
        else (torch.zeros(heads * hd),) * 2
    )

    def scores(q, k):
        return torch.einsum("bthd,bshd->bhts", q, k)

    def heads_of(t):
        return t.view(1, T, heads, hd)

    meta = scores(meta_rope(heads_of(x @ wq.T + bq), pos), meta_rope(heads_of(x @ wk.T + bk), pos))
    p = lambda w: interleaved_to_half(w, heads)  # noqa: E731
    hf = scores(
        hf_rope(heads_of(x @ p(wq).T + p(bq)), pos), hf_rope(heads_of(x @ p(wk).T + p(bk)), pos)
    )
    assert (
        meta - hf
    ).abs().max() < 1e-3 * meta.abs().max()  # float rounding only (scores are O(100))
    if with_bias:  # the converter bug of docs/variants.md §2.3: weights permuted, biases forgotten
        wrong = scores(
            hf_rope(heads_of(x @ p(wq).T + bq), pos), hf_rope(heads_of(x @ p(wk).T + bk), pos)
        )
        assert (meta - wrong).abs().max() > 0.1 * meta.abs().max()


@pytest.mark.parametrize("with_bias", [False, True])
def test_whole_model_layout_conversion_is_exact(with_bias):
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=100,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        rope_layout="interleaved",
        q_bias=with_bias,
        k_bias=with_bias,
        v_bias=with_bias,
        o_bias=with_bias,
    )
    meta_model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        for name, p in meta_model.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.1 if p.dim() == 1 else p.shape[-1] ** -0.5)
                + (1 if "norm" in name else 0)
            )
    ids = torch.randint(0, 100, (2, 12))
    hf_model = convert_rope_layout(meta_model, "half")
    assert hf_model.config.rope_layout == "half"
    with torch.no_grad():
        expected, got = meta_model(ids), hf_model(ids)
        assert (expected - got).abs().max() < 1e-5
        # Control: the same weights without the permutation are a different model.
        naive = llamakin.Transformer(config.replace(rope_layout="half")).eval()
        naive.load_state_dict(meta_model.state_dict())
        assert (expected - naive(ids)).abs().max() > 0.1
        back = convert_rope_layout(hf_model, "interleaved")
    for (name, a), (_, b) in zip(meta_model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_qk_norm_weights_follow_the_permutation():
    torch.manual_seed(1)
    config = llamakin.ModelConfig(
        vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48, qk_norm=True
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        ids = torch.randint(0, 50, (1, 9))
        assert (model(ids) - convert_rope_layout(model, "interleaved")(ids)).abs().max() < 1e-5


@torch.no_grad()
def test_cli_converts_hf_to_meta_layout_and_back_exactly(tmp_path):
    case = next(c for c in CASES if c.name == "llama")
    hf = save_case(case, tmp_path / "hf")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "hf"),
                str(tmp_path / "meta"),
                "--rope-layout",
                "interleaved",
            ]
        )
        == 0
    )
    assert (tmp_path / "meta" / "params.json").is_file() and (
        tmp_path / "meta" / "consolidated.00.pth"
    ).is_file()
    meta = llamakin.load(tmp_path / "meta")
    assert meta.config.rope_layout == "interleaved" and meta.config.family == "meta"
    ids, mask = ragged_batch(128, [10, 6])
    expected = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert (meta(ids, attention_mask=mask) - expected)[mask.bool()].abs().max() < 1e-5

    assert (
        main(
            [
                "convert",
                str(tmp_path / "meta"),
                str(tmp_path / "back"),
                "--rope-layout",
                "half",
                "--to",
                "llama",
            ]
        )
        == 0
    )
    transformers = pytest.importorskip("transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


@torch.no_grad()
def test_cli_keeps_biases_in_llamakin_format(tmp_path, capsys):
    case = next(c for c in CASES if c.name == "granite-code-bias-llama3")
    hf = save_case(case, tmp_path / "hf")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "hf"),
                str(tmp_path / "inter"),
                "--rope-layout",
                "interleaved",
            ]
        )
        == 0
    )
    assert "llamakin checkpoint" in capsys.readouterr().out  # Meta's format has no biases
    inter = llamakin.load(tmp_path / "inter")
    assert inter.config.q_bias and inter.config.rope_layout == "interleaved"
    ids = torch.randint(3, 128, (1, 14))
    assert (inter(ids) - hf(ids).logits).abs().max() < 1e-5
    assert (
        main(
            [
                "convert",
                str(tmp_path / "inter"),
                str(tmp_path / "hf2"),
                "--rope-layout",
                "half",
                "--to",
                "llama",
            ]
        )
        == 0
    )
    back = llamakin.load(tmp_path / "hf2")
    assert (back(ids) - hf(ids).logits).abs().max() < 1e-5
