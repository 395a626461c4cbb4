"""The int8 head by exact integer products on VNNI CPUs (``quant/vnni.py``): its error bound, its
place in loading and traced decoding, and its refusals."""

from __future__ import annotations

import pytest
import torch

import llamakin
from llamakin.errors import LlamakinError
from llamakin.quant import kernels, vnni
from llamakin.quant.linear import ExactInt8Linear, Int8Linear
from llamakin.quant.tensors import Int8Weight
from llamakin.speed import decode_trace
from llamakin.speed.decode_trace import Decoder
from test_quant import _gguf_model

needs_vnni = pytest.mark.skipif(
    not vnni.exact_int8_available(), reason="exact int8 products need a CPU with VNNI"
)


def _weight(rows: int = 200, cols: int = 96, seed: int = 0) -> Int8Weight:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=generator)
    return Int8Weight(q, torch.rand(rows, generator=generator) / 50 + 1e-3)


@needs_vnni
@torch.no_grad()
def test_two_passes_are_within_the_split_error_and_beat_bf16_activations():
    """The error is what the second grid leaves, |e| <= max|x| / 8192 per activation, so
    |y - exact| <= sum_k |w_nk| * max|x| / 8192; and it is smaller than the bf16 kernel's."""
    weight = _weight()
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    x[:, 7] *= 30  # an outlier channel, as final hidden states have
    exact = x.double() @ weight.dequantize(torch.float64).T
    got = ExactInt8Linear(weight)(x).double()
    bound = weight.dequantize(torch.float64).abs().sum(1) * x.abs().max().double() / 8192
    assert ((got - exact).abs() <= bound + 1e-5).all()
    bf16 = Int8Linear(weight, activation_dtype=torch.bfloat16)(x).double()
    assert (got - exact).abs().mean() < (bf16 - exact).abs().mean() / 4


@needs_vnni
@torch.no_grad()
def test_one_pass_is_exact_for_activations_on_its_grid():
    weight = _weight(64, 64)
    x = torch.randint(-127, 128, (3, 64)).float() / 32  # on the grid of 2^2 / 128
    x[:, 0] = 127 / 32  # the top of that grid: max |x| sets 2^2
    got = vnni.exact_int8_mm(x, kernels.pack_fbgemm(weight), passes=1).double()
    assert torch.allclose(
        got, x.double() @ weight.dequantize(torch.float64).T, rtol=1e-6, atol=1e-6
    )


@needs_vnni
@torch.no_grad()
def test_packing_in_pieces_gives_the_whole_packing_bit_for_bit():
    """The head is packed a piece of rows at a time (a smaller load peak); the products, the
    unpacked int8 values and the module's output are those of one packing of the whole matrix,
    an uneven last piece included."""
    weight = _weight(200, 96)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
    pieces = vnni.pack_in_pieces(weight, rows=64)  # 64 + 64 + 64 + 8 rows
    assert len(pieces) == 4
    whole = kernels.pack_fbgemm(weight)
    assert torch.equal(vnni.exact_int8_mm(x, pieces), vnni.exact_int8_mm(x, whole))
    assert torch.equal(vnni.unpack(pieces), weight.qweight)
    module = ExactInt8Linear(weight)
    assert len(module.packed) == -(-200 // vnni.PACK_ROWS)
    assert torch.equal(module(x), vnni.exact_int8_mm(x, whole))


@needs_vnni
@torch.no_grad()
def test_many_rows_take_the_float32_product_of_the_exact_weight():
    weight = _weight()
    x = torch.randn(400, 96)  # from INT8_DEQUANT_ROWS rows on
    assert torch.allclose(ExactInt8Linear(weight)(x), Int8Linear(weight)(x), atol=1e-5)


@needs_vnni
@torch.no_grad()
def test_loaded_int8_head_is_exact_keeps_its_values_and_decodes_like_eager(tmp_path, monkeypatch):
    """``load`` gives an int8 head on a VNNI CPU the exact products; its values read back bit for
    bit (files), and the traced step, which stops before such a head, gives eager's logits."""
    path = _gguf_model(tmp_path, "Q8_0", tied=True)
    model = llamakin.load(path, quantize="auto")
    assert isinstance(model.lm_head, ExactInt8Linear)
    monkeypatch.setenv("LLAMAKIN_EXACT_INT8_HEAD", "0")
    vnni.exact_int8_available.cache_clear()
    plain = llamakin.load(path, quantize="auto")
    vnni.exact_int8_available.cache_clear()
    assert isinstance(plain.lm_head, Int8Linear)
    ours, theirs = model.lm_head.quantized_weight(), plain.lm_head.quantized_weight()
    assert torch.equal(ours.qweight, theirs.qweight) and torch.equal(ours.scales, theirs.scales)
    assert model.lm_head.dequantize().equal(plain.lm_head.dequantize())

    monkeypatch.setenv("LLAMAKIN_TRACE", "1")
    monkeypatch.setattr(decode_trace, "TRACES", decode_trace.TraceCache(2, budget=4))
    caches = [model.new_cache(1, 16) for _ in range(2)]
    for cache in caches:
        model(torch.tensor([[3, 1, 4, 1, 5]]), cache=cache)
    decoder = Decoder(model, caches[0])
    assert decoder._graph is not None
    kinds = {node.kind() for node in decoder._graph.graph.nodes()}
    assert not any("quantized::" in kind for kind in kinds)  # the head runs outside the trace
    tokens = torch.tensor([[9]])
    for step in range(3):
        positions = torch.tensor([[5 + step]])
        traced = decoder.step(tokens, positions)
        slots = torch.tensor([5 + step])
        key_valid = caches[1].valid[:, : 6 + step]
        eager = model.decode_step(tokens, positions, slots, key_valid, caches[1])
        assert torch.equal(traced, eager)
        tokens = traced.argmax(-1, keepdim=True)


def test_without_vnni_or_when_turned_off_the_head_stays_int8linear(tmp_path, monkeypatch):
    path = _gguf_model(tmp_path, "Q8_0", tied=True)
    monkeypatch.setattr(llamakin.hardware, "has_vnni", lambda: False)
    vnni.exact_int8_available.cache_clear()
    try:
        assert not vnni.exact_int8_available()
        assert isinstance(llamakin.load(path, quantize="auto").lm_head, Int8Linear)
    finally:
        vnni.exact_int8_available.cache_clear()


@needs_vnni
def test_the_probe_refuses_a_kernel_that_is_not_exact(monkeypatch):
    """An int16-pairing kernel saturates at the grid's ends; the once-per-process probe multiplies
    exactly those values and turns the path off when the result is not exact."""
    real = vnni.exact_int8_mm
    monkeypatch.setattr(vnni, "exact_int8_mm", lambda *a, **k: real(*a, **k) * (1 + 1e-4))
    vnni.exact_int8_available.cache_clear()
    try:
        assert not vnni.exact_int8_available()
    finally:
        monkeypatch.undo()
        vnni.exact_int8_available.cache_clear()
    assert vnni.exact_int8_available()


@needs_vnni
def test_the_packed_head_refuses_another_device():
    module = ExactInt8Linear(_weight())
    with pytest.raises(LlamakinError, match="cannot move to another device"):
        module.to("meta")
    module.to(torch.float32)  # a dtype change on the CPU is fine
