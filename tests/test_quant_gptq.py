"""GPTQ (error-compensating rounding on calibration activations): the layer output error it
leaves is no worse than round to nearest's, and strictly smaller where activations are
correlated; a GPTQ-quantized model is an ordinary quantized model (same layouts, the file reads
back bit for bit); calibration from the API and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import llamakin
from llamakin.cli import main
from llamakin.quant.gptq import HessianAccumulator, gptq_model, gptq_quantize, output_error
from llamakin.quant.linear import Int4Linear, Int8Linear, QuantizedLinear
from llamakin.quant.model import quantize_model
from llamakin.quant.tensors import quantize_int4, quantize_int8
from test_quant import BIASED, tiny


def correlated_activations(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Activations as a transformer's look: correlated channels (a low-rank mix plus noise) and a
    few channels much larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, columns, generator=g)
    x = torch.randn(rows, 8, generator=g) @ mix + 0.1 * torch.randn(rows, columns, generator=g)
    x[:, :3] *= 8.0
    return x


def _rtn(kind: str, w: torch.Tensor, group: int):
    return quantize_int8(w) if kind == "int8" else quantize_int4(w, group)


@pytest.mark.parametrize("kind,group", [("int8", 32), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("act_order", [True, False])
@torch.no_grad()
def test_gptq_output_error_is_smaller_than_round_to_nearest(kind, group, act_order):
    torch.manual_seed(1)
    w = torch.randn(48, 128) * 0.05
    x = correlated_activations(512, 128)
    acc = HessianAccumulator(128, x.device)
    for part in x.split(100):  # the running mean over batches is the Hessian of all rows
        acc.add(part)
    assert torch.allclose(acc.H, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    gptq = gptq_quantize(w, acc.H, kind, group, damp=0.01, act_order=act_order)
    rtn = _rtn(kind, w, group)
    # the same layout and value ranges as round to nearest
    if kind == "int8":
        assert gptq.qweight.dtype == torch.int8 and gptq.qweight.abs().max() <= 127
        assert torch.equal(gptq.scales, rtn.scales)  # per-row scales fixed up front
    else:
        assert gptq.q.dtype == torch.uint8 and gptq.q.max() <= 15 and gptq.group_size == group
    ours = output_error(w, gptq.dequantize(), x)
    theirs = output_error(w, rtn.dequantize(), x)
    # strictly (and clearly) better on correlated activations
    assert ours < 0.7 * theirs, (ours, theirs)


@torch.no_grad()
def test_gptq_on_uncorrelated_activations_is_no_worse_and_dead_columns_are_zero():
    """White activations give GPTQ nothing to exploit: its error stays at round to nearest's (to
    the damping's effect); a column no activation reaches is set to 0."""
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    x = torch.randn(4096, 64)
    x[:, 5] = 0.0
    acc = HessianAccumulator(64, x.device)
    acc.add(x)
    for kind in ("int8", "int4"):
        gptq = gptq_quantize(w, acc.H, kind, 32)
        assert output_error(w, gptq.dequantize(), x) <= 1.02 * output_error(
            w, _rtn(kind, w, 32).dequantize(), x
        )
        deq = gptq.dequantize()
        if kind == "int8":
            assert not gptq.qweight[:, 5].any()
        else:
            assert deq[:, 5].abs().max() <= gptq.scales[:, 0].max() * 8  # within the group's grid


def _calibration(vocab: int = 128, rows: int = 4, window: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, window), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.no_grad()
def test_gptq_model_beats_round_to_nearest_on_its_calibration_text(mode):
    """A whole tiny model: every projection and the (tied) head get GPTQ weights; the quantized
    model built from them has the usual modules, and its logits on the calibration text are
    closer to the float model's than round to nearest's are."""
    float_model = tiny(tied=True, **BIASED)
    ids = _calibration()
    reference = float_model(ids)

    working = copy.deepcopy(float_model)
    weights = gptq_model(working, ids, mode, 32)
    assert set(weights) == {
        *(n for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear)),
        "lm_head",
    }
    # the embedding table (tied head) is untouched; projections hold their quantized values
    assert torch.equal(working.embed.weight, float_model.embed.weight)
    gptq = quantize_model(working, mode, 32, activation_dtype=torch.float32, weights=weights)
    rtn = quantize_model(copy.deepcopy(float_model), mode, 32, activation_dtype=torch.float32)
    assert isinstance(gptq.layers[0].attn.qkv, Int4Linear if mode == "int4" else Int8Linear)
    assert isinstance(gptq.lm_head, Int8Linear)
    assert torch.equal(gptq.lm_head.qweight, weights["lm_head"].qweight)
    ours = (gptq(ids) - reference).pow(2).mean().item()
    theirs = (rtn(ids) - reference).pow(2).mean().item()
    assert ours < theirs, (ours, theirs)


def _save_with_tokenizer(model, directory):
    """A tiny model with a word-level tokenizer whose words are the token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(directory, family="llamakin")
    vocab = {str(i): i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("mode,group", [("int8", 32), ("int4", 64)])
@torch.no_grad()
def test_calibrated_checkpoint_reads_back_bit_identically(tmp_path, mode, group):
    from safetensors.torch import load_file

    from llamakin.quant.files import save_quantized

    model = tiny(tied=True, **BIASED)
    _save_with_tokenizer(model, tmp_path / "src")
    text = " ".join(str(i) for i in _calibration(rows=8).flatten().tolist())
    (tmp_path / "calib.txt").write_text(text)
    args = ["quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--to", mode]
    args += ["--group-size", str(group), "--calibrate", str(tmp_path / "calib.txt")]
    assert main(args + ["--calibration-tokens", "256"]) == 0
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    info = json.loads((tmp_path / "q" / "config.json").read_text())["llamakin_quantization"]
    assert info["modules"]["layers.0.attn.qkv"] == (mode if mode == "int8" else f"int4-g{group}")
    # the API with the same text gives the same integers as the file
    api = llamakin.load(
        tmp_path / "src",
        quantize=mode,
        group_size=group,
        calibration=tmp_path / "calib.txt",
        calibration_tokens=256,
    )
    rtn = llamakin.load(tmp_path / "src", quantize=mode, group_size=group)
    loaded = llamakin.load(tmp_path / "q", quantize="auto")
    differs = False
    for name, module in loaded.named_modules():
        if isinstance(module, QuantizedLinear):
            mine = api.get_submodule(name).quantized_weight()
            back = module.quantized_weight()
            plain = rtn.get_submodule(name).quantized_weight()
            values = lambda w: w.qweight if hasattr(w, "qweight") else w.q  # noqa: E731
            assert torch.equal(values(back), values(mine))
            differs |= not torch.equal(values(back), values(plain))
    assert differs  # GPTQ chose other integers than round to nearest somewhere
    save_quantized(loaded, tmp_path / "again")
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert stored.keys() == again.keys() and all(torch.equal(stored[k], again[k]) for k in stored)


def test_calibration_errors(tmp_path, capsys):
    model = tiny()
    _save_with_tokenizer(model, tmp_path / "m")
    with pytest.raises(llamakin.LlamakinError, match="int8 or int4"):
        llamakin.load(tmp_path / "m", quantize="auto", calibration="1 2 3")
    with pytest.raises(llamakin.LlamakinError, match="fewer than one window"):
        llamakin.load(tmp_path / "m", quantize="int8", calibration="1 2 3")
    args = ["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--to", "int8"]
    assert main(args + ["--calibrate", str(tmp_path / "missing.txt")]) == 2
    assert "calibration text" in capsys.readouterr().err
