"""Prefix caching (llamakin.generation.prefix_cache): reused keys/values give the logits a full
prefill gives, on tiny random float32 models of several families, alone and in a padded batch;
where reuse cannot be exact (Qwen v1's dynamic NTK, ChatGLM-6B's prefix LM) it is off."""

from __future__ import annotations

import pytest
import torch

import llamakin
from llamakin.chat import ChatSession
from llamakin.config import RopeScaling
from llamakin.generate import GenerationRun, SamplingParams
from llamakin.generation import PrefixCache
from llamakin.generation.prefix_cache import prefix_reuse_supported

V = 97
TOL = 1e-5  # of the largest logit: float32 rounding (a suffix prefill multiplies differently shaped
# matrices than a full one; measured <= 3e-6 here, where one stale key slot gives ~1)


class _Letters:
    eos_token_ids: tuple = ()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)


def model_of(**knobs):
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        **(
            {
                "vocab_size": V,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 128,
            }
            | knobs
        )
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():  # weights of unit gain, so attention is sharp and a wrong key shows
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 2.0 / weight.shape[-1] ** 0.5)
        model.embed.weight.normal_(0, 1.0)
    return model


FAMILIES = {
    "llama": {},
    "sliding window 5": {"sliding_window": 5},
    "keys cached before RoPE": {"rope_cached_keys": True},
    "logn attention past 8": {"logn_attention_length": 8},
}


def run(model, prompts, cache, new=6):
    """Token ids and the logits each row sampled from at every step (recorded by a per-row processor)."""
    seen = [[] for _ in prompts]

    def recorder(row):
        def record(generated, logits):
            seen[row].append(logits.clone())
            return logits

        return record

    generation = GenerationRun(
        model,
        _Letters(),
        prompts,
        SamplingParams(max_new_tokens=new, ignore_eos=True),
        prefix_cache=cache,
        processors=[[recorder(i)] for i in range(len(prompts))],
    )
    list(generation)
    return [r.token_ids for r in generation.results], seen, generation.reused_tokens


def max_diff(a, b):
    """The largest difference of two runs' logits, relative to the largest logit."""
    return max(
        ((x - y).abs().max() / y.abs().max()).item()
        for rows_a, rows_b in zip(a, b)
        for x, y in zip(rows_a, rows_b)
    )


def ids(n, seed):
    return torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_reused_prefix_gives_the_logits_of_a_full_prefill(family):
    model = model_of(**FAMILIES[family])
    cache = PrefixCache(1 << 24)
    first = ids(11, 1)
    tokens, _, reused = run(model, [first], cache)
    assert reused == 0 and len(cache) == 1
    # the next turn: the whole first sequence (prompt + what was generated) and more
    follow = first + tokens[0] + ids(4, 2)
    got_tokens, got, reused = run(model, [follow], cache)
    want_tokens, want, _ = run(model, [follow], None)
    # every computed slot (the last token was never fed)
    assert reused == len(first) + len(tokens[0]) - 1
    assert max_diff(got, want) < TOL and got_tokens == want_tokens
    # a prompt that shares only part of a stored sequence reuses that part
    branch = first[:7] + ids(5, 3)
    got_tokens, got, reused = run(model, [branch], cache)
    want_tokens, want, _ = run(model, [branch], None)
    assert reused == 7 and max_diff(got, want) < TOL and got_tokens == want_tokens


def test_padded_batch_stores_and_reuses_exactly():
    """A left-padded batch stores each row without its padding; the next batch mixes rows that
    reuse (different amounts) and a row that does not, still padded together."""
    model = model_of()
    cache = PrefixCache(1 << 24)
    prompts = [ids(3, 4), ids(12, 5), ids(7, 6)]
    tokens, _, _ = run(model, prompts, cache)
    assert len(cache) == 3
    follow = [
        prompts[0] + tokens[0] + ids(2, 7),
        prompts[1][:9] + ids(6, 8),
        ids(9, 9),
        prompts[2] + ids(1, 10),
    ]
    got_tokens, got, reused = run(model, follow, cache)
    want_tokens, want, _ = run(model, follow, None)
    assert reused == (3 + 6 - 1) + 9 + 0 + 7
    assert max_diff(got, want) < TOL and got_tokens == want_tokens


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling(type="qwen_dynamic", original_max_position_embeddings=8),
        RopeScaling(type="dynamic", factor=2.0),
    ],
)
def test_where_reuse_is_not_exact_it_is_off(scaling):
    """Qwen v1's NTK alpha comes from the whole prompt's length; dynamic NTK's base from the length
    at the time each key was computed (past the context, earlier hidden states change with it)."""
    model = model_of(
        rope_scaling=scaling, max_position_embeddings=16, rope_cached_keys=scaling.type == "dynamic"
    )
    assert not prefix_reuse_supported(model.config)
    cache = PrefixCache(1 << 24)
    first = ids(12, 11)
    tokens, _, _ = run(model, [first], cache)
    follow = first + tokens[0] + ids(3, 12)
    got_tokens, got, reused = run(model, [follow], cache)
    want_tokens, want, _ = run(model, [follow], None)
    assert reused == 0 and len(cache) == 0 and got_tokens == want_tokens
    chatglm = llamakin.ModelConfig(
        vocab_size=V,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=64,
        prefix_lm=True,
        mask_token_ids=(90,),
        sop_token_id=92,
        rope_layout="glm2d",
    )
    assert not prefix_reuse_supported(chatglm)


def test_budget_lru_and_dominated_entries():
    def kv(n):
        return [torch.zeros(1, n, 2)], [torch.zeros(1, n, 2)]  # 16 bytes per token

    cache = PrefixCache(16 * 9)
    assert cache.store((1, 2, 3), *kv(3)) and cache.store((5, 6), *kv(2))
    assert cache.store((1, 2, 3, 4), *kv(4))  # (1, 2, 3) is a prefix of it: dropped
    assert len(cache) == 2 and cache.bytes == 16 * 6
    assert cache.lookup([5, 6, 7])[0] == 2  # (5, 6) is now the most recently used
    assert cache.store((8, 9, 10, 11), *kv(4))  # 16 * 10 > budget: the least recently used goes
    assert cache.lookup([1, 2])[0] == 0 and cache.lookup([5, 6])[0] == 2 and cache.evictions == 1
    assert cache.bytes <= cache.budget_bytes
    assert not cache.store(tuple(range(20)), *kv(20))  # larger than the whole budget: not kept
    assert cache.lookup([1, 2, 3], adapter="other")[0] == 0  # keyed by adapter too
    assert cache.lookup([9, 9, 9], limit=2)[0] == 0
    assert cache.lookup([8, 9, 10, 11], limit=2)[0] == 2


def test_weights_changing_forgets_the_cache():
    model = model_of()
    cache = PrefixCache(1 << 24)
    first = ids(8, 13)
    run(model, [first], cache)
    with torch.no_grad():
        model.final_norm.weight.mul_(1.5)
    _, got, reused = run(model, [first + ids(3, 14)], cache)
    _, want, _ = run(model, [first + ids(3, 14)], None)
    assert reused == 0 and max_diff(got, want) < TOL


def test_chat_turns_reuse_the_previous_turns(tiny_chat):
    model, tok = tiny_chat
    params = SamplingParams(max_new_tokens=8)
    cached, plain = (
        ChatSession(model, tok, params, system="Be brief."),
        ChatSession(model, tok, params, system="Be brief.", prefix_cache_bytes=0),
    )
    for question in ("Hello there", "And then?", "Tell me more"):
        cached.reply(question)
        plain.reply(question)
    assert cached.messages == plain.messages
    assert cached.prefix_cache.hits >= 2 and cached.prefix_cache.reused_tokens > 20
    assert plain.prefix_cache is None


@pytest.fixture(scope="module")
def tiny_chat():
    from assets import smollm2_gguf
    from conftest import tiny_model

    tok = llamakin.load_tokenizer(smollm2_gguf())
    return tiny_model(tok, max_position_embeddings=512), tok
