"""Generation: sampling processors against plain references, stopping, batching, streaming."""

from __future__ import annotations

import copy

import pytest
import torch

import llamakin
from llamakin import LlamakinError
from llamakin.generate import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    generate_batch,
)
from assets import smollm2_gguf
from conftest import tiny_model


# -- processors ---------------------------------------------------------------------------------
def reference_top_k(logits, k):
    out = logits.clone()
    for row in range(out.shape[0]):
        kth = sorted(out[row].tolist(), reverse=True)[k - 1]
        out[row][out[row] < kth] = float("-inf")
    return out


def reference_top_p(logits, p):
    out = logits.clone()
    for row in range(out.shape[0]):
        probs = logits[row].softmax(-1).tolist()
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        kept, total = set(), 0.0
        for i in order:
            kept.add(i)
            total += probs[i]
            if total >= p:
                break
        for i in range(len(probs)):
            if i not in kept:
                out[row, i] = float("-inf")
    return out


def reference_min_p(logits, min_p):
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))


def reference_repetition(logits, history, penalty):
    out = logits.clone()
    for row, tokens in enumerate(history):
        for t in set(tokens):
            out[row, t] = out[row, t] / penalty if out[row, t] > 0 else out[row, t] * penalty
    return out


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 50) * 3


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k(logits, k):
    assert torch.equal(apply_top_k(logits, k), reference_top_k(logits, k))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p(logits, p):
    assert torch.equal(apply_top_p(logits, p), reference_top_p(logits, p))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p(logits, min_p):
    assert torch.equal(apply_min_p(logits, min_p), reference_min_p(logits, min_p))


@pytest.mark.parametrize("penalty", [0.8, 1.3])
def test_repetition_penalty(logits, penalty):
    history = [[1, 2, 2, 7], [0], [49, 3]]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for row, tokens in enumerate(history):
        seen[row, tokens] = True
    assert torch.equal(
        apply_repetition_penalty(logits, seen, penalty),
        reference_repetition(logits, history, penalty),
    )


def test_processors_agree_with_transformers(logits):
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[1, 2, 2, 7]] * 3)
    cases = [
        (apply_top_k(logits, 7), transformers.TopKLogitsWarper(7)(ids, logits.clone())),
        (apply_top_p(logits, 0.8), transformers.TopPLogitsWarper(0.8)(ids, logits.clone())),
        (apply_min_p(logits, 0.1), transformers.MinPLogitsWarper(0.1)(ids, logits.clone())),
    ]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, [1, 2, 7]] = True
    cases.append(
        (
            apply_repetition_penalty(logits, seen, 1.3),
            transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()),
        )
    )
    for ours, theirs in cases:
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        finite = torch.isfinite(ours)
        assert torch.allclose(ours[finite], theirs[finite])


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=1.0),
        dict(repetition_penalty=0),
        dict(max_new_tokens=0),
    ],
)
def test_invalid_sampling_parameters(bad):
    with pytest.raises(LlamakinError):
        SamplingParams(**bad)


# -- generation on a tiny random model with a real tokenizer --------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    tok = llamakin.load_tokenizer(smollm2_gguf())
    return tiny_model(tok, max_position_embeddings=64), tok


PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3"]


def test_greedy_is_deterministic_and_streaming_equals_plain(tiny):
    model, tok = tiny
    text = generate(model, tok, PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    assert text == generate(model, tok, PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    stream = generate(model, tok, PROMPTS[0], max_new_tokens=12, ignore_eos=True, stream=True)
    assert "".join(stream) == text
    assert stream.stats.generated_tokens == 12 and stream.finish_reason == "length"


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    # the tiny model is peaked
    kwargs = dict(max_new_tokens=16, temperature=5.0, top_p=0.95, ignore_eos=True)
    a = generate(model, tok, PROMPTS[1], seed=7, **kwargs)
    assert a == generate(model, tok, PROMPTS[1], seed=7, **kwargs)
    assert any(generate(model, tok, PROMPTS[1], seed=s, **kwargs) != a for s in range(8, 12))


def test_batched_equals_unbatched(tiny):
    model, tok = tiny
    alone = [generate(model, tok, p, max_new_tokens=10, ignore_eos=True) for p in PROMPTS]
    assert generate_batch(model, tok, PROMPTS, max_new_tokens=10, ignore_eos=True) == alone


def test_stop_strings_end_generation(tiny):
    model, tok = tiny
    full = generate(model, tok, PROMPTS[0], max_new_tokens=20, ignore_eos=True)
    cut = len(full) // 2
    stop = full[cut : cut + 3]
    expected = full[: full.index(stop)]
    stream = generate(
        model, tok, PROMPTS[0], max_new_tokens=20, ignore_eos=True, stop=[stop], stream=True
    )
    assert "".join(stream) == expected and stream.finish_reason == "stop"


def test_eos_ends_generation_unless_ignored(tiny):
    model, tok = tiny
    first = llamakin.generate(model, tok, PROMPTS[2], max_new_tokens=1, ignore_eos=True)
    first_id = tok.encode(first, add_special_tokens=False)[0]
    eos_tok = copy.copy(tok)
    eos_tok.eos_token_ids = (first_id,)
    stream = generate(model, eos_tok, PROMPTS[2], max_new_tokens=8, stream=True)
    assert "".join(stream) == "" and stream.finish_reason == "stop"
    assert generate(model, eos_tok, PROMPTS[2], max_new_tokens=8, ignore_eos=True) != ""


def test_prompt_plus_new_tokens_beyond_context(tiny):
    model, tok = tiny
    with pytest.raises(LlamakinError, match="more than the model's context of 64"):
        generate(model, tok, "word " * 40, max_new_tokens=40)
    with pytest.raises(LlamakinError, match="at least one token"):
        generate(model, tok, [], max_new_tokens=4)


def test_chat_messages_use_the_template(tiny):
    model, tok = tiny
    messages = [{"role": "user", "content": "hi"}]
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert generate(model, tok, messages, max_new_tokens=5, ignore_eos=True) == generate(
        model, tok, ids, max_new_tokens=5, ignore_eos=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
@torch.no_grad()
def test_traced_decode_step_equals_the_eager_step(monkeypatch, dtype, batch):
    """The TorchScript replay computes exactly what ``decode_step`` computes (both CPU paths of
    the projection included: 1 row and 4 rows; in bf16 the widened-weight path)."""
    from llamakin.speed import decode_trace as decode
    from llamakin.speed.decode_trace import Decoder

    # a fresh trace cache: the process-wide recording budget may be spent by earlier tests
    monkeypatch.setattr(decode, "TRACES", decode.TraceCache(4))
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=97,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    model = llamakin.Transformer(config).eval().to(dtype)
    prompt = torch.randint(0, 97, (batch, 5))
    steps = torch.randint(0, 97, (batch, 6))
    logits = {}
    for trace in ("1", "0"):
        monkeypatch.setenv("LLAMAKIN_TRACE", trace)
        cache = model.new_cache(batch, 16)
        model(prompt, cache=cache)
        decoder = Decoder(model, cache)
        assert (decoder._graph is not None) == (trace == "1")
        logits[trace] = torch.stack(
            [
                decoder.step(steps[:, t : t + 1], torch.full((batch, 1), 5 + t))
                for t in range(steps.shape[1])
            ]
        )
    assert logits["1"].dtype == dtype and torch.equal(logits["1"], logits["0"])


@torch.no_grad()
def test_frozen_traces_follow_weight_changes_and_keep_the_training_flag(monkeypatch):
    """Frozen traces hold the weights as constants: replacing a weight or changing one in place
    between generations (a training step, a load) must retrace, never replay stale weights."""
    from llamakin.speed.decode_trace import Decoder

    monkeypatch.setenv("LLAMAKIN_TRACE", "1")
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        q_bias=True,
        k_bias=True,
    )
    model = llamakin.Transformer(config).train()

    def decode_logits(traced: bool):
        monkeypatch.setenv("LLAMAKIN_TRACE", "1" if traced else "0")
        cache = model.new_cache(2, 16)
        model(torch.arange(10).view(2, 5), cache=cache)
        return Decoder(model, cache).step(torch.tensor([[7], [8]]), torch.tensor([[5], [5]]))

    first = decode_logits(True)
    assert model.training  # tracing/freezing left the model's mode alone
    model.layers[0].attn.qkv.bias.mul_(1.5)  # in place
    model.embed.weight = torch.nn.Parameter(model.embed.weight * 1.5)  # replaced
    changed = decode_logits(True)
    assert not torch.equal(changed, first)
    assert torch.equal(changed, decode_logits(False))
    # a submodule replaced by one with other weights, and a parameter swapped in its module's dict
    replacement = copy.deepcopy(model.layers[1].mlp)
    for weight in replacement.parameters():
        weight.mul_(0.5)
    model.layers[1].mlp = replacement
    swapped = decode_logits(True)
    assert not torch.equal(swapped, changed)
    assert torch.equal(swapped, decode_logits(False))
    norm = model.layers[0].attn_norm
    norm._parameters["weight"] = torch.nn.Parameter(norm.weight * 2.0)
    assert not torch.equal(decode_logits(True), swapped)
    assert torch.equal(decode_logits(True), decode_logits(False))


def test_greedy_choice_is_torch_argmax_with_ties_nan_and_infinities():
    """The CPU greedy choice goes through numpy's argmax (faster): the same first index of each
    row's maximum as ``torch.argmax``, ties, NaN (counted as the maximum) and infinities included;
    a non-float32 row takes torch's own."""
    from llamakin.generation.sampling import greedy

    torch.manual_seed(0)
    rows = torch.randn(8, 1000)
    rows[1, [3, 500, 999]] = 50.0  # a tie: the first
    rows[2, 7] = float("nan")  # NaN wins
    rows[3, [4, 9]] = float("nan")  # the first NaN
    rows[4] = float("-inf")  # all -inf: index 0
    rows[5, 900] = float("inf")
    rows[6] = 0.0  # all equal: index 0
    for logits in (rows, rows[:, ::2], rows[0]):
        assert torch.equal(greedy(logits), logits.argmax(-1))
        assert greedy(logits).dtype == torch.int64
    half = rows.to(torch.bfloat16)
    assert torch.equal(greedy(half), half.argmax(-1))
