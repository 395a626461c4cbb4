"""The fused, chunked output-head + cross-entropy loss (llamakin.train.loss) against the plain
``F.cross_entropy(model(x))``: the loss and every gradient (full training with tied and untied
heads, LoRA, masks, Granite's logits scaling, gradient accumulation, ignore_index), the
fallback for heads that are not a plain weight, and that no ``[tokens, vocab]`` tensor is kept
for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llamakin
from llamakin.lora import LoraSettings, apply_lora, lora_layers
from llamakin.train.loss import fused_head_weight, token_loss_sum

VOCAB = 96
# 5 rows per chunk: the 2 x 7 = 14 positions of a batch span three chunks, the last one partial
CHUNK = VOCAB * 5


def tiny(dtype=torch.float64, **knobs):
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        **knobs,
    )
    model = llamakin.Transformer(config).to(dtype).train()
    with torch.no_grad():  # logits spread well beyond uniform: a real softmax, not ~1/V each
        model.output_weight.normal_(0, 1.0)
    return model


def batch(seed=1, rows=2, length=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (rows, length), generator=g)
    y = torch.randint(0, VOCAB, (rows, length), generator=g)
    return x, y


def plain_loss_sum(model, x, y, mask=None):
    losses = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
    return losses.sum() if mask is None else (losses * mask.flatten()).sum()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, fn, micro_batches):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for x, y, mask, scale in micro_batches:
        loss = fn(model, x, y, mask)
        (loss * scale).backward()
        total += loss.item()
    return total, grads(model)


def fused(model, x, y, mask):
    return token_loss_sum(model, x, y, mask, chunk_elements=CHUNK)


def assert_same(model, micro_batches, rtol=1e-10, atol=1e-12):
    expected_loss, expected = loss_and_grads(model, plain_loss_sum, micro_batches)
    loss, got = loss_and_grads(model, fused, micro_batches)
    assert loss == pytest.approx(expected_loss, rel=rtol)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)
    return expected


def lora_model(**knobs):
    model = tiny(**knobs)
    apply_lora(model, LoraSettings(rank=4, alpha=8, targets="q,k,v,o,gate,up,down"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B, so that the adapters' gradients are not trivially equal
        for layer in lora_layers(model).values():
            for part in layer.adapted:
                layer.lora_B[part].copy_(torch.randn(layer.lora_B[part].shape, generator=g) * 0.1)
    return model


# weights as the loop's mask (0 or 1), and two others: any weight is honoured
MASK = torch.tensor([[0, 0, 1, 2.5, 1, 0, 1], [1, 0.5, 1, 1, 1, 1, 0]], dtype=torch.float64)

MODELS = {
    "tied, full training": lambda: tiny(tie_word_embeddings=True),
    "untied, full training": lambda: tiny(tie_word_embeddings=False),
    "untied, logits scaling": lambda: tiny(tie_word_embeddings=False, logits_scaling=4.0),
    "tied, logits scaling": lambda: tiny(tie_word_embeddings=True, logits_scaling=0.5),
    "lora": lora_model,
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("masked", [False, True])
def test_loss_and_every_gradient_equal_plain_cross_entropy(name, masked):
    model = MODELS[name]()
    assert fused_head_weight(model) is not None  # the fused path is taken
    x, y = batch()
    expected = assert_same(model, [(x, y, MASK if masked else None, 1.0)])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert expected.keys() == trained  # every trained tensor got a gradient, the head's included
    if name == "lora":
        assert all(".lora_" in n for n in expected)


@pytest.mark.parametrize("name", ["tied, full training", "untied, logits scaling", "lora"])
def test_gradient_accumulation_over_micro_batches_equals_plain(name):
    """The loop's accumulation: summed token losses scaled by the step's token count, backward
    per micro-batch, gradients summed in ``.grad``."""
    model = MODELS[name]()
    (x1, y1), (x2, y2) = batch(1), batch(2)
    tokens = MASK.sum() + x2.numel()
    assert_same(model, [(x1, y1, MASK, 1 / tokens), (x2, y2, None, 1 / tokens)])


def test_float32_agrees_within_float32_rounding():
    model = tiny(torch.float32, tie_word_embeddings=True, logits_scaling=2.0)
    x, y = batch()
    assert_same(model, [(x, y, MASK.float(), 0.1)], rtol=2e-5, atol=1e-6)


def test_ignore_index_targets_count_as_masked():
    model = tiny(tie_word_embeddings=False)
    x, y = batch()
    y[0, :3] = -100
    assert_same(model, [(x, y, None, 1.0)])


def test_evaluation_without_grad_gives_the_same_loss():
    model = tiny(tie_word_embeddings=True, logits_scaling=3.0).eval()
    x, y = batch()
    with torch.no_grad():
        expected = plain_loss_sum(model, x, y, MASK)
        got = fused(model, x, y, MASK)
    assert not got.requires_grad
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_no_tokens_by_vocab_tensor_is_kept_for_backward():
    """What autograd saves for backward: the plain path keeps the log-softmax ``[tokens, vocab]``;
    the fused one only ``[tokens, hidden]`` and ``[vocab, hidden]`` sized tensors."""
    model = tiny(tie_word_embeddings=True)
    x, y = batch(length=20)
    tokens = x.numel()

    def saved_big(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(model, x, y, None)
        return [s for s in sizes if s >= tokens * VOCAB]

    assert saved_big(plain_loss_sum)  # the check sees the plain path's logits
    assert not saved_big(fused)


def test_heads_that_are_not_a_plain_weight_take_the_plain_path():
    model = tiny(tie_word_embeddings=False)
    apply_lora(model, LoraSettings(rank=4, alpha=8, targets="q,v,lm_head"))
    assert fused_head_weight(model) is None
    with torch.no_grad():
        lora_layers(model)["lm_head"].lora_B["lm_head"].normal_()
    x, y = batch()
    assert_same(model, [(x, y, MASK, 1.0)])


def test_the_training_loop_computes_its_loss_with_token_loss_sum(monkeypatch):
    """Trainer._loss_sum (training and evaluation) goes through the fused loss."""
    from llamakin.train import loop

    calls = []

    def spy(model, x, y, mask=None, fused=True, **kw):
        calls.append(fused)
        return plain_loss_sum(model, x, y, mask)

    monkeypatch.setattr(loop, "token_loss_sum", spy)
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.precision, trainer.device = "float32", torch.device("cpu")
    trainer.cfg = type("Cfg", (), {"parallel": "ddp"})()
    model = tiny(tie_word_embeddings=True)
    x, y = batch()
    assert trainer._loss_sum(model, x, y, MASK).item() == pytest.approx(
        plain_loss_sum(model, x, y, MASK).item()
    )
    assert calls == [True]


@pytest.mark.parametrize("name", ["tied, full training", "lora"])
def test_bfloat16_autocast_agrees_within_bfloat16_rounding(name):
    """Under autocast (GPU training's bf16) the head's products run in bfloat16 as the plain
    head's would; the loss and gradients agree within bfloat16 rounding."""
    model = MODELS[name]().float()
    x, y = batch()

    def under_autocast(fn):
        def run(model, x, y, mask):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(model, x, y, mask)

        return run

    expected_loss, expected = loss_and_grads(
        model, under_autocast(plain_loss_sum), [(x, y, MASK.float(), 0.1)]
    )
    loss, got = loss_and_grads(model, under_autocast(fused), [(x, y, MASK.float(), 0.1)])
    assert loss == pytest.approx(expected_loss, rel=1e-2)
    assert got.keys() == expected.keys()
    for n in expected:
        assert got[n].dtype == expected[n].dtype == torch.float32
        scale = expected[n].abs().max().item()
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=2e-2 * scale, msg=n)
