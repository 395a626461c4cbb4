"""The projection layer's CPU fast paths compute ``F.linear``: decoding rows, half-precision upcasting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llamakin
from llamakin import hardware
from llamakin.speed import cpu_linear as linear_module
from llamakin.speed.cpu_linear import decode_linear, linear, upcast_linear


@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("out_features", [96, 97])
@torch.no_grad()
def test_decode_linear_equals_f_linear(rows, out_features):
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 40), torch.randn(out_features, 40), torch.randn(out_features)
    for bias in (None, b):
        assert torch.allclose(decode_linear(x, w, bias), F.linear(x, w, bias), atol=1e-5, rtol=0)
    assert decode_linear(x.view(1, rows, 40), w, b).shape == (1, rows, out_features)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [4, 9, 40])
@torch.no_grad()
def test_upcast_linear_is_the_float32_product_rounded_once(monkeypatch, dtype, rows):
    # several slices, the last one short
    monkeypatch.setattr(linear_module, "UPCAST_SLICE_ELEMENTS", 7 * 40)
    torch.manual_seed(0)
    x, w, b = (
        torch.randn(2, rows, 40).to(dtype),
        torch.randn(45, 40).to(dtype),
        torch.randn(45).to(dtype),
    )
    for bias in (None, b):
        got = upcast_linear(x, w, bias)
        exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert got.dtype == dtype and got.shape == (2, rows, 45)
        # float32 accumulation of exact half-precision products, then one rounding to ``dtype``:
        # within one rounding step of the exact result (the emulated kernel gives the same bound)
        ulp = exact.abs() * torch.finfo(dtype).eps + 1e-6
        assert ((got.double() - exact).abs() <= ulp).all()


@torch.no_grad()
def test_linear_dispatches_half_weights_by_rows_and_cpu(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(32, 16).bfloat16()
    calls = []
    monkeypatch.setattr(
        linear_module, "upcast_linear", lambda *a: calls.append(a[0].shape) or F.linear(*a)
    )
    for native in (False, True):
        monkeypatch.setattr(hardware, "cpu_has_native", lambda dtype, native=native: native)
        for rows in (1, 3, 4, 64):
            linear(torch.randn(rows, 16).bfloat16(), w)
    assert calls == [(4, 16), (64, 16)]  # a CPU with bf16 instructions keeps PyTorch's kernel


@pytest.mark.parametrize("rows", [8, 40])
@torch.no_grad()
def test_onednn_linear_equals_f_linear(rows):
    """oneDNN's GEMM (AVX-512 CPUs' path from 8 rows) computes F.linear: same products, another
    summation order."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(0)
    x, w, b = torch.randn(2, rows, 576), torch.randn(97, 576), torch.randn(97)
    for bias in (None, b):
        got = linear_module.onednn_linear(x, w, bias)
        assert got.shape == (2, rows, 97)
        assert torch.allclose(got, F.linear(x, w, bias), atol=1e-4, rtol=1e-5)


def test_linear_dispatches_float32_by_rows_cpu_grad_and_tracing(monkeypatch):
    """float32 from 8 rows goes to oneDNN on AVX-512 only, never where autograd records or inside
    a TorchScript trace (which cannot record the op); fewer rows take the decode forms."""
    chosen = linear_module._onednn_preferred.__wrapped__()
    assert chosen == (hardware.has_avx512() and torch.backends.mkldnn.is_available())
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    calls = []
    monkeypatch.setattr(
        linear_module, "onednn_linear", lambda *a: calls.append(a[0].shape[0]) or F.linear(*a)
    )
    for avx512 in (False, True):
        monkeypatch.setattr(linear_module, "_onednn_preferred", lambda avx512=avx512: avx512)
        with torch.no_grad():
            for rows in (1, 7, 8, 64):
                linear(torch.randn(rows, 16), w)
            torch.jit.trace(lambda x: linear(x, w), torch.randn(64, 16), check_trace=False)
        linear(torch.randn(64, 16), w.requires_grad_())  # training: F.linear
        w.requires_grad_(False)
    assert calls == [8, 64]


def test_frozen_weight_products_in_training_take_onednn_with_f_linears_gradients(monkeypatch):
    """A weight and bias that take no gradient (LoRA's frozen base) multiply by oneDNN in training
    too, and the input's gradient ``dy @ W`` as well: the same gradients as F.linear's (another
    summation order); a trainable weight or bias, or autocast, keeps F.linear."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(linear_module, "_onednn_preferred", lambda: True)
    torch.manual_seed(0)
    w, b = torch.randn(97, 64), torch.randn(97)
    for bias in (None, b):
        x = torch.randn(2, 9, 64, requires_grad=True)
        upstream = torch.randn(2, 9, 97)
        y = linear(x, w, bias)
        assert type(y.grad_fn).__name__ == "FrozenWeightProductBackward"
        (y * upstream).sum().backward()
        reference = x.detach().requires_grad_()
        expected = F.linear(reference, w, bias)
        (expected * upstream).sum().backward()
        assert torch.allclose(y, expected, atol=1e-4, rtol=1e-5)
        assert torch.allclose(x.grad, reference.grad, atol=1e-4, rtol=1e-5)
    x = torch.randn(9, 64, requires_grad=True)
    assert "FrozenWeight" not in type(linear(x, w.clone().requires_grad_()).grad_fn).__name__
    trained_bias = b.clone().requires_grad_()
    linear(x, w, trained_bias).sum().backward()
    assert torch.equal(trained_bias.grad, torch.full((97,), 9.0))  # the bias still learns
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w).dtype == torch.bfloat16  # autocast's product, not oneDNN's float32


@torch.no_grad()
def test_bfloat16_model_decodes_like_the_float32_model(monkeypatch):
    """A bf16 model whose products are upcast agrees with PyTorch's bf16 kernels and with float32."""
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=101,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
    )
    model = llamakin.Transformer(config).eval()
    ids = torch.randint(0, 101, (8, 12))
    reference = model(ids)
    model = model.to(torch.bfloat16)
    logits = {}
    for native in (False, True):
        monkeypatch.setattr(hardware, "cpu_has_native", lambda dtype, native=native: native)
        cache = model.new_cache(8, 16)
        steps = [model(ids[:, :9], cache=cache)] + [
            model(ids[:, t : t + 1], cache=cache) for t in range(9, 12)
        ]
        logits[native] = torch.cat(steps, 1).float()
    # bf16 keeps 8 significant bits: ~0.4% per rounding, a few roundings deep
    scale = reference.abs().max()
    assert (logits[False] - reference).abs().max() < 0.02 * scale
    assert (logits[False] - logits[True]).abs().max() < 0.01 * scale
