"""Weight-only int8/int4 quantization: kernels vs dequantized weights, GGUF blocks kept exactly,
quantized files read back bit for bit, the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llamakin
from llamakin.cli import main
from llamakin.model.linear import Linear
from llamakin.quant import kernels
from llamakin.quant.files import load_quantized_checkpoint
from llamakin.quant.gguf_blocks import decode_q4, decode_q8_0, q4_to_int4
from llamakin.quant.linear import (
    ExactInt8Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantizedLinear,
)
from llamakin.quant.model import load_quantized, quantize_model
from llamakin.quant.tensors import pack_nibbles, quantize_int4, quantize_int8, unpack_nibbles

# partial qkv bias too
BIASED = dict(q_bias=True, k_bias=True, v_bias=False, o_bias=True, mlp_bias=True)


def tiny(tied: bool = True, seed: int = 0, vocab: int = 128, **knobs) -> llamakin.Transformer:
    torch.manual_seed(seed)
    config = llamakin.ModelConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        tie_word_embeddings=tied,
        **knobs,
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():  # non-zero biases and norms, so that their handling shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def dequantized_twin(
    model: llamakin.Transformer, quantized: llamakin.Transformer
) -> llamakin.Transformer:
    """``model`` with every quantized projection's dequantized weight and bias put back in float."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear):
                linear = Linear(
                    module.in_features, module.out_features, bias=module.bias is not None
                )
                linear.weight.copy_(module.dequantize())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
                parent, _, leaf = name.rpartition(".")
                setattr(twin.get_submodule(parent) if parent else twin, leaf, linear)
            elif isinstance(module, Int8Embedding):
                twin.embed.weight.copy_(module.dequantize())
        for module in twin.modules():
            if hasattr(module, "partial_bias"):
                module.qkv_bias_zeroed = None  # the twin took the quantized module's (masked) bias
    return twin


# -- the quantizers and layouts -----------------------------------------------------------------
def test_quantizers_round_to_the_nearest_level():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    q8 = quantize_int8(w)
    assert q8.qweight.dtype == torch.int8 and q8.qweight.abs().max() == 127
    assert (q8.dequantize() - w).abs().max() <= q8.scales.max() / 2 + 1e-6
    for g in (32, 64, 128):
        q4 = quantize_int4(w, g)
        assert q4.q.max() <= 15 and q4.scales.shape == (48, 128 // g)
        step = q4.scales.repeat_interleave(g, 1)
        assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-5).all()
    assert torch.equal(unpack_nibbles(pack_nibbles(q4.q)), q4.q)
    with pytest.raises(llamakin.LlamakinError, match="group size 48"):
        quantize_int4(w, 48)
    with pytest.raises(llamakin.LlamakinError, match="cannot be split"):
        quantize_int4(torch.randn(16, 96), 64)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("out_features", [64, 72])  # 72: padded to the packing's 16-row unit
@torch.no_grad()
def test_quantized_modules_compute_the_product_of_their_dequantized_weights(rows, out_features):
    torch.manual_seed(0)
    w, b, x = (
        torch.randn(out_features, 96) * 0.1,
        torch.randn(out_features),
        torch.randn(2, rows, 96),
    )
    for module in (
        Int8Linear(quantize_int8(w), b, torch.float32),
        Int4Linear(quantize_int4(w, 32), b, torch.float32),
    ):
        exact = F.linear(x, module.dequantize(), b)
        assert torch.allclose(module(x), exact, atol=1e-5, rtol=0), module
    for module in (
        Int8Linear(quantize_int8(w), b, torch.bfloat16),
        Int4Linear(quantize_int4(w, 32), b, torch.bfloat16),
    ):
        got = module(x)
        assert got.dtype == torch.float32 and got.shape == (2, rows, out_features)
        # bf16 activations and scales: within bf16 rounding of the result (|y| up to ~6 here)
        assert (got - F.linear(x, module.dequantize(), b)).abs().max() < 0.06, module


# 96: 32-row blocks only; 72: padded to 80, no fast path
@pytest.mark.parametrize("out_features", [64, 96, 72])
@torch.no_grad()
def test_int4_many_rows_take_the_float32_gemm_on_the_exact_weight(out_features, monkeypatch):
    """From ``INT4_DEQUANT_ROWS`` rows the weight is unpacked from the kernel's layout (reshapes
    checked against a probe) and multiplied in float32: exact to the dequantized weight, whatever
    the activation dtype the kernel path uses; fewer rows keep the kernel."""
    from llamakin.quant import kernels

    torch.manual_seed(2)
    w, b = torch.randn(out_features, 128) * 0.1, torch.randn(out_features)
    module = Int4Linear(quantize_int4(w, 32), b, torch.bfloat16)
    x = torch.randn(3, 16, 128)
    exact = F.linear(x, module.dequantize(), b)
    q = kernels.unpack_int4_cpu(module.packed, module.packed.shape[0], 128)
    if q is not None:  # a layout this build packs as documented: the values are the quantized ones
        assert torch.equal(q[:out_features], module.quantized_weight().q)
    monkeypatch.setattr(kernels, "INT4_DEQUANT_ROWS", 48)  # 48 rows here: the many-rows path
    fast = module(x)
    assert fast.dtype == torch.float32
    if q is not None:
        assert torch.allclose(fast, exact, atol=1e-5, rtol=0)
    else:
        assert (fast - exact).abs().max() < 0.06  # the kernel path in bf16
    monkeypatch.setattr(kernels, "INT4_DEQUANT_ROWS", 49)
    assert (module(x) - exact).abs().max() > 1e-4  # the kernel, bf16 activations


@torch.no_grad()
def test_int8_many_rows_take_the_float32_gemm_on_the_exact_weight(monkeypatch):
    """From ``INT8_DEQUANT_ROWS`` rows the int8 weight is widened to float32 slice by slice and
    multiplied in float32: exact to the dequantized weight (up to summation order), whatever the
    kernel path's activation dtype; fewer rows keep the kernel."""
    from llamakin.quant import kernels
    from llamakin.speed import cpu_linear

    torch.manual_seed(3)
    w, b = torch.randn(200, 128) * 0.1, torch.randn(200)
    module = Int8Linear(quantize_int8(w), b, torch.bfloat16)
    x = torch.randn(3, 16, 128)
    exact = F.linear(x, module.dequantize(), b)
    monkeypatch.setattr(kernels, "INT8_DEQUANT_ROWS", 48)  # 48 rows here: the many-rows path
    monkeypatch.setattr(cpu_linear, "UPCAST_SLICE_ELEMENTS", 70 * 128)  # 3 slices, the last short
    fast = module(x)
    assert fast.dtype == torch.float32 and fast.shape == (3, 16, 200)
    assert torch.allclose(fast, exact, atol=1e-5, rtol=0)
    assert module(x.to(torch.bfloat16)).dtype == torch.bfloat16
    monkeypatch.setattr(kernels, "INT8_DEQUANT_ROWS", 49)
    assert (module(x) - exact).abs().max() > 1e-4  # the kernel, bf16 activations


def test_int4_cpu_layout_is_recognised_on_this_build():
    """The reshape-only unpacking matches torch 2.13's CPU packing (AVX2 and, if its blocks are 64
    rows, AVX-512) for the shapes of real models; a shape it does not know returns None."""
    from llamakin.quant import kernels

    assert kernels._cpu_block(576, 1536) in (32, 64) and kernels._cpu_block(1536, 576) in (32, 64)
    assert kernels._cpu_block(48, 64) is None  # 16-row multiple: neither block size divides it


@torch.no_grad()
def test_int4_module_gives_back_its_exact_values():
    torch.manual_seed(1)
    w = quantize_int4(torch.randn(80, 128), 64)
    w.scales[3, 1] = 0.0  # a constant group: q is irrelevant there and comes back as 0
    w.q[3, 64:] = 0
    back = Int4Linear(w, None, torch.float32).quantized_weight()
    assert (
        torch.equal(back.q, w.q)
        and torch.equal(back.scales, w.scales)
        and torch.equal(back.zeros, w.zeros)
    )


def test_activation_dtype_follows_the_cpu(monkeypatch):
    from llamakin import hardware

    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_native", lambda dtype: True)
    assert kernels.activation_dtype(cpu, "int4") == torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_has_native", lambda dtype: dtype == torch.float32)
    assert kernels.activation_dtype(cpu, "int4") == kernels.ACTIVATION_CHOICE["int4"]
    assert kernels.activation_dtype(torch.device("cuda"), "int8") == torch.bfloat16


# -- whole models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
@torch.no_grad()
def test_quantized_model_matches_its_dequantized_twin(mode, tied):
    """Biases (partial q/k/v too) in float, fused qkv and gate/up, tied or separate heads: the
    quantized model computes exactly what a float model holding the dequantized weights does."""
    model = tiny(tied=tied, **BIASED)
    ids = torch.randint(0, 128, (2, 9))
    for act, tol in ((torch.float32, 2e-5), (torch.bfloat16, 0.05)):
        quantized = quantize_model(copy.deepcopy(model), mode, 32, activation_dtype=act)
        assert isinstance(
            quantized.layers[0].attn.qkv, Int4Linear if mode == "int4" else Int8Linear
        )
        assert isinstance(
            quantized.layers[1].mlp.gate_up, Int4Linear if mode == "int4" else Int8Linear
        )
        assert isinstance(quantized.lm_head, Int8Linear) and isinstance(
            quantized.embed, Int8Embedding
        )
        assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
        # the partial bias as the float model applies it: q and k parts as stored, v part zero
        bias, stored = quantized.layers[0].attn.qkv.bias, model.layers[0].attn.qkv.bias
        assert (
            torch.equal(bias[:96], stored[:96])
            and stored[96:].abs().sum() > 0
            and not bias[96:].any()
        )
        twin = dequantized_twin(model, quantized)
        diff = (quantized(ids) - twin(ids)).abs().max().item()
        assert diff < tol, (act, diff)
        # and close to the float model itself (quantization error only)
        assert (quantized(ids) - model(ids)).abs().max() < 0.1


@torch.no_grad()
def test_tied_head_left_in_float_keeps_the_float_table():
    """head="none" on a tied model: the head reads the embedding's float table, so the embedding
    stays float (it used to become int8, and the float head then had no table to read)."""
    model = tiny(tied=True)
    quantized = quantize_model(copy.deepcopy(model), "int8", head="none")
    assert quantized.lm_head is None and quantized.embed.weight is not None
    ids = torch.randint(0, 128, (1, 7))
    assert (quantized(ids) - model(ids)).abs().max() < 0.1


@torch.no_grad()
def test_quantized_model_decodes_through_the_traced_step(monkeypatch):
    """Greedy generation with quantized modules: the traced decode step and eager decoding agree."""
    model = quantize_model(tiny(**BIASED), "int4", 32)
    tok = _Ids()
    traced = llamakin.generate(model, tok, [5, 7, 9], max_new_tokens=12, temperature=0.0)
    monkeypatch.setenv("LLAMAKIN_TRACE", "0")
    eager = llamakin.generate(model, tok, [5, 7, 9], max_new_tokens=12, temperature=0.0)
    assert traced == eager and len(traced) > 0


class _Ids:
    """A tokenizer stand-in: text is space-separated ids."""

    eos_token_ids = ()
    bos_token_id = None
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


# -- GGUF blocks --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_bit_exactly_like_the_gguf_package(kind):
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 160)).astype(np.float32) * 0.05
    qtype = gguf.GGMLQuantizationType[kind]
    raw = quantize(w, qtype)
    reference = torch.from_numpy(np.asarray(dequantize(raw, qtype), dtype=np.float32))
    if kind == "Q8_0":
        q, d = decode_q8_0(raw)
        assert torch.equal(q.float() * d.repeat_interleave(32, 1), reference)
        return
    q, d, m = decode_q4(raw, kind)
    assert q.max() <= 15
    # the block formula itself is bit-exact ...
    assert torch.equal(
        q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1), reference
    ) or torch.equal((q.float() - 8) * d.repeat_interleave(32, 1), reference)
    # ... and its int4 mapping (scale = d, zero = m + 8d) equals it to float32 rounding
    mapped = q4_to_int4(q, d, m)
    assert (mapped.dequantize() - reference).abs().max() <= 2e-7 * reference.abs().max() * 8
    if kind == "Q4_0":
        assert torch.equal(mapped.zeros, torch.zeros_like(mapped.zeros))
    # and the kernel computes with it (float32 activations: float32 rounding)
    x = torch.randn(3, 160)
    module = Int4Linear(mapped, None, torch.float32)
    assert torch.allclose(module(x), x @ reference.T, atol=1e-5, rtol=0)


def _gguf_model(tmp_path, quant: str, tied: bool, arch_knobs: dict | None = None):
    from llamakin.gguf_export import save_gguf

    model = tiny(tied=tied, **(arch_knobs or {}))
    path = tmp_path / f"m-{quant}.gguf"
    save_gguf(model, path, quant=quant)
    return path


@pytest.mark.parametrize(
    "quant,kind", [("Q4_1", Int4Linear), ("Q4_0", Int4Linear), ("Q8_0", Int8Linear)]
)
@pytest.mark.parametrize("tied", [True, False])
@torch.no_grad()
def test_gguf_file_kept_quantized_matches_the_dequantized_file(tmp_path, quant, kind, tied):
    path = _gguf_model(tmp_path, quant, tied)
    ids = torch.randint(0, 128, (1, 11))
    float_model = llamakin.load(path)  # gguf's dequantization, float32
    kept = llamakin.load(path, quantize="auto")
    assert isinstance(kept.layers[0].attn.qkv, kind) and isinstance(kept.layers[1].mlp.down, kind)
    # an int8 head is multiplied by exact integer products where the CPU has VNNI (quant/vnni.py)
    assert isinstance(kept.embed, Int8Embedding) and isinstance(
        kept.lm_head, (Int4Linear, Int8Linear, ExactInt8Linear)
    )
    # float32 activations and scales: Q4_0/Q4_1 values exactly as the gguf package dequantizes them
    exact_kept = load_quantized(path, torch.float32, "cpu", "auto", activation_dtype=torch.float32)
    for name, module in exact_kept.named_modules():
        if isinstance(module, Int4Linear):
            reference = (
                float_model.get_submodule(name).weight
                if name != "lm_head"
                else float_model.output_weight
            )
            assert (module.dequantize() - reference).abs().max() <= 1e-7
        if isinstance(module, Int4Linear) and name == "layers.0.attn.qkv":  # bf16 scales: rounded
            rounded, exact = kept.get_submodule(name).scale_zero.float(), module.scale_zero
            assert 0 < (rounded - exact).abs().max() <= exact.abs().max() * 2**-8
            # what files keep
            assert torch.equal(kept.get_submodule(name).dequantize(), module.dequantize())
    twin = dequantized_twin(float_model, exact_kept)
    assert (exact_kept(ids) - twin(ids)).abs().max() < 2e-5
    if quant != "Q8_0":  # Q4 matrices are kept exactly; only the head (Q8_0 -> int8 rows) differs
        assert (exact_kept(ids) - float_model(ids)).abs().max() < 0.05
    assert (kept(ids) - float_model(ids)).abs().max() < 0.1  # bf16 activations


@torch.no_grad()
def test_gguf_qwen2_biases_kept_in_float(tmp_path):
    from llamakin.gguf_export import save_gguf

    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        q_bias=True,
        k_bias=True,
        v_bias=True,
        tie_word_embeddings=False,
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    path = tmp_path / "qwen2.gguf"
    save_gguf(model, path, quant="Q4_1")
    float_model, kept = llamakin.load(path), llamakin.load(path, quantize="auto")
    assert kept.layers[0].attn.qkv.bias is not None
    assert torch.equal(kept.layers[0].attn.qkv.bias, float_model.layers[0].attn.qkv.bias)
    ids = torch.randint(0, 128, (1, 7))
    assert (kept(ids) - float_model(ids)).abs().max() < 0.1


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_requantizing_a_gguf_and_a_float_checkpoint(tmp_path, mode):
    model = tiny(tied=False, **BIASED)
    model.save_pretrained(tmp_path / "hf", family="llamakin")
    loaded = llamakin.load(tmp_path / "hf", quantize=mode, group_size=64)
    if mode == "int4":
        assert loaded.layers[0].attn.qkv.group_size == 64
    assert loaded.lm_head.kind == "int8"  # Int8Linear, or ExactInt8Linear on a VNNI CPU
    ids = torch.randint(0, 128, (1, 7))
    assert (loaded(ids) - model(ids)).abs().max() < 0.15
    # float stays float
    assert llamakin.load(tmp_path / "hf", quantize="auto").layers[0].attn.qkv.__class__ is Linear


# -- quantized files ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,group", [("int8", 32), ("int4", 32), ("int4", 64)])
@torch.no_grad()
def test_quantized_checkpoint_reads_back_bit_identically(tmp_path, mode, group):
    from safetensors.torch import load_file

    from llamakin.quant.convert import quantize_checkpoint

    model = tiny(tied=True, **BIASED)
    model.save_pretrained(tmp_path / "src", family="llamakin")
    quantize_checkpoint(tmp_path / "src", tmp_path / "q", mode, group)
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    info = json.loads((tmp_path / "q" / "config.json").read_text())["llamakin_quantization"]
    assert info["modules"]["layers.0.attn.qkv"] == ("int8" if mode == "int8" else f"int4-g{group}")
    assert info["modules"]["lm_head"] == "int8" and info["modules"]["embed"] == "embedding-int8-g32"
    loaded = llamakin.load(tmp_path / "q", quantize="auto")
    for name, module in loaded.named_modules():
        if isinstance(module, Int4Linear):
            back = module.quantized_weight()
            assert torch.equal(pack_nibbles(back.q), stored[f"{name}.qweight"])
            assert torch.equal(back.scales, stored[f"{name}.scales"]) and torch.equal(
                back.zeros, stored[f"{name}.zeros"]
            )
        elif isinstance(module, Int8Linear):
            assert torch.equal(module.qweight, stored[f"{name}.qweight"]) and torch.equal(
                module.scales, stored[f"{name}.scales"]
            )
        if isinstance(module, QuantizedLinear) and module.bias is not None:
            assert torch.equal(module.bias, stored[f"{name}.bias"])
    # written again from the loaded model: the same bytes
    from llamakin.quant.files import save_quantized

    save_quantized(loaded, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert stored.keys() == again.keys() and all(torch.equal(stored[k], again[k]) for k in stored)
    # dequantized on request: the same logits as the quantized model with float32 activations
    ids = torch.randint(0, 128, (1, 8))
    plain = llamakin.load(tmp_path / "q")
    exact = load_quantized_checkpoint(
        tmp_path / "q", torch.float32, "cpu", activation_dtype=torch.float32
    )
    assert not any(isinstance(m, QuantizedLinear) for m in plain.modules())
    assert (plain(ids) - exact(ids)).abs().max() < 2e-5
    assert (exact(ids) - model(ids)).abs().max() < 0.1


def test_bad_quantization_options(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m", family="llamakin")
    with pytest.raises(llamakin.LlamakinError, match="unknown quantization"):
        llamakin.load(tmp_path / "m", quantize="int3")
    with pytest.raises(llamakin.LlamakinError, match="group size 48"):
        llamakin.load(tmp_path / "m", quantize="int4", group_size=48)
    with pytest.raises(llamakin.LlamakinError, match="cannot be split"):
        llamakin.load(tmp_path / "m", quantize="int4", group_size=128)  # hidden size 64


def test_cli_quantize_generate_and_errors(tmp_path, capsys):
    model = tiny()
    model.save_pretrained(tmp_path / "m", family="llamakin")
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--to", "int4"]) == 0
    assert "int4" in capsys.readouterr().out
    assert (
        main(
            [
                "quantize",
                str(tmp_path / "m"),
                str(tmp_path / "q2"),
                "--to",
                "int4",
                "--group-size",
                "48",
            ]
        )
        == 2
    )
    assert "group size 48" in capsys.readouterr().err
    assert isinstance(llamakin.load(tmp_path / "q", quantize="auto").layers[0].mlp.down, Int4Linear)
