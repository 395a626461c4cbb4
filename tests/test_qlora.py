"""QLoRA: float LoRA adapters on a frozen int4/int8 base (``--set lora.quantize=int4|int8``).

The quantized product and its input gradient equal a float layer holding the dequantized weight;
a QLoRA run trains the adapters only and its loss goes down; its exported PEFT adapter, applied by
peft onto the dequantized base, gives llamakin's QLoRA logits (float32, 1e-5), and onto the
original float base logits that differ from them only by what quantizing the base changes;
a killed QLoRA run resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import llamakin
from llamakin import ConfigError
from llamakin.cli import main
from llamakin.lora import LoraSettings, apply_lora, quantized as qlora, save_adapter
from llamakin.lora.quantized import FrozenQuantizedLinear, quantize_base
from llamakin.lora.train import run_model
from llamakin.quant.linear import Int8Embedding
from llamakin.quant.tensors import quantize_int4, quantize_int8
from llamakin.train import train
from test_lora import LORA_RUN, hf_model, lora_cfg, peft_logits, randomize_adapters, tiny_base  # noqa: F401
from conftest import crash_and_resume, metrics_losses
from test_train import corpus  # noqa: F401


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("slice_elements", [1 << 22, 200])  # one slice; many row slices
def test_quantized_product_and_its_input_gradient_are_the_dequantized_layers(
    kind, slice_elements, monkeypatch
):
    monkeypatch.setattr(qlora, "SLICE_ELEMENTS", slice_elements)
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48)
    weight = quantize_int4(w, 32) if kind == "int4" else quantize_int8(w)
    layer = FrozenQuantizedLinear(weight, b)
    dense = weight.dequantize()
    assert torch.equal(layer.dequantize(), dense)
    assert (dense - w).abs().max() > 1e-3  # it is quantized
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, dense, b)
    assert (y - y_ref).abs().max() < 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert (x.grad - x_ref.grad).abs().max() < 1e-5
    assert not any(t.requires_grad for t in layer.buffers())
    # gradcheck in float64 against finite differences (the Function's backward itself)
    if slice_elements > 1000:
        x64 = torch.randn(1, 64, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda t: qlora.QuantizedProduct.apply(t, layer, None), (x64,)
        )


def test_quantized_base_keeps_biases_masked_and_the_embedding_int8():
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        q_bias=True,
        k_bias=True,
        v_bias=False,
        tie_word_embeddings=True,
    )
    model = llamakin.Transformer(config)
    with torch.no_grad():
        model.layers[0].attn.qkv.bias.normal_()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        float_logits = model(ids)
    quantize_base(model, "int8")
    assert isinstance(model.embed, Int8Embedding) and isinstance(
        model.lm_head, FrozenQuantizedLinear
    )
    bias = model.layers[0].attn.qkv.bias
    assert torch.equal(bias[-8:], torch.zeros(8)) and bias[:-8].abs().sum() > 0  # v's part zeroed
    with torch.no_grad():
        assert (model(ids) - float_logits).abs().max() < 0.05  # int8 weights: close, not equal


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="lora.quantize must be int4, int8 or none"):
        LoraSettings(quantize="int3")
    with pytest.raises(ConfigError, match="lora.group_size must be one of 32, 64, 128, 256"):
        LoraSettings(quantize="int4", group_size=48)
    assert LoraSettings(quantize="none").quantize is None


def dequantized_float_model(qlora_model, float_dir):
    """The float model a QLoRA base computes: ``float_dir``'s model with every weight replaced by the
    quantized base's dequantized one (the head untied if it was tied)."""
    model = llamakin.load(float_dir)
    with torch.no_grad():
        for name, module in qlora_model.named_modules():
            base = getattr(module, "quantized", None) or (
                module if isinstance(module, FrozenQuantizedLinear) else None
            )
            if base is None or name.endswith(".quantized"):
                continue
            model.get_submodule(name).weight.copy_(base.dequantize())
        model.embed.weight.copy_(qlora_model.embed.dequantize())
    return model


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_qlora_run_trains_adapters_only_and_its_adapter_works_in_peft(
    kind,
    corpus,  # noqa: F811
    tiny_base,  # noqa: F811
    tmp_path,
):
    run = tmp_path / "run"
    last = train(
        lora_cfg(corpus, tiny_base, "max_steps=6", f"lora.quantize={kind}", "lora.dropout=0"),
        run,
        progress=False,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert last["loss"] < rows[0]["loss"] and math.isfinite(last["val_loss"])
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert len(state["model"]) == 2 * 2 * 7 and all(".lora_" in n for n in state["model"])
    model, _, _ = run_model(run)
    quantized = [m for m in model.modules() if isinstance(m, FrozenQuantizedLinear)]
    assert len(quantized) == 2 * 4 + 1 and {m.kind for m in quantized} == {kind, "int8"}
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        ours = model(ids)
    # peft on the dequantized base: the same function, so float32 rounding only
    dequantized = dequantized_float_model(model, tiny_base)
    dequantized.save_pretrained(tmp_path / "dequantized", family="llama")
    assert (peft_logits(tmp_path / "dequantized", run / "adapter", ids) - ours).abs().max() < 1e-5
    # peft on the original float base: off by what quantizing the base changes, of the order of the
    # bare bases' own gap (the trained adapter moves the activations the weight error acts on, so
    # not exactly that gap: within 4x here; int4 ~0.04 against a base gap of ~0.02)
    theirs = peft_logits(tiny_base, run / "adapter", ids)
    with torch.no_grad():
        base_gap = (dequantized(ids) - llamakin.load(tiny_base)(ids)).abs().max()
    gap = (theirs - ours).abs().max()
    assert 1e-4 < gap < 4 * base_gap, (gap, base_gap)
    # --merge folds the adapter into the float base (a quantized base cannot take it)
    assert main(["export-adapter", str(run), str(tmp_path / "merged"), "--merge"]) == 0
    assert (hf_model(tmp_path / "merged")(ids).logits.detach() - theirs).abs().max() < 1e-5


def test_qlora_resume_after_a_crash_is_exact(corpus, tiny_base, tmp_path):  # noqa: F811
    settings = [
        *LORA_RUN,
        f"init_from={json.dumps(str(tiny_base))}",
        f"data={json.dumps(str(corpus[0]))}",
        "max_steps=6",
        "lora.quantize=int4",
    ]
    train(
        lora_cfg(corpus, tiny_base, "max_steps=6", "lora.quantize=int4"),
        tmp_path / "whole",
        progress=False,
    )
    assert crash_and_resume("lora-sft", tmp_path / "cut", settings) == metrics_losses(
        tmp_path / "whole"
    )


def test_a_quantized_base_cannot_take_a_merge(tiny_base, tmp_path):  # noqa: F811
    model = quantize_base(llamakin.load(tiny_base), "int4")
    apply_lora(model, LoraSettings(rank=2, alpha=4, targets="q,v"))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")  # the adapter exports as from a float base
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(llamakin.LlamakinError, match="merge into the float base instead"):
        from llamakin.lora import merge

        merge(model)
