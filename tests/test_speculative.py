"""Speculative decoding (llamakin.speculative): greedy output identical to plain decoding, exact KV
cache rollback, and the sampling distribution preserved by the acceptance rule (statistically).

Statistical checks use the Bretagnolle-Huber-Carol inequality: for ``N`` samples of a distribution
``p`` over ``m`` cells, ``P(||p_hat - p||_1 >= eps) <= 2^m exp(-N eps^2 / 2)``. Each test picks
``eps`` so that this false-failure probability is ``DELTA`` (1e-6) and seeds everything, so a run is
deterministic anyway; a wrong rule (the draft's distribution instead of the target's) lands far
outside the bound (each test also checks that the draft's own distribution is outside it)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import llamakin
from llamakin import LlamakinError
from llamakin.generate import SamplingParams, generate
from llamakin.speculative import (
    LookupDraft,
    SpeculativeRun,
    accept_or_resample,
    int4_draft,
)
from assets import smollm2_gguf
from conftest import tiny_model

DELTA = 1e-6


def l1_bound(cells: int, samples: int, delta: float = DELTA) -> float:
    """``eps`` with ``2^m exp(-N eps^2 / 2) = delta``."""
    return math.sqrt(2 * (cells * math.log(2) + math.log(1 / delta)) / samples)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is 20x faster than two on a loaded 2-core machine (thread handoffs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return llamakin.load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def tied(tok):
    return tiny_model(tok, max_position_embeddings=128)


@pytest.fixture(scope="module")
def untied_biased(tok):
    torch.manual_seed(1)
    config = llamakin.ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        q_bias=True,
        k_bias=True,
        v_bias=False,
        o_bias=True,
    )
    model = llamakin.Transformer(config).eval()
    model.init_weights(std=0.2)  # large enough that the context, not just the last token, decides
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


PROMPT = "The cat sat on the mat. The cat sat on the"


def run(model, tok, prompt, params, mode, k=4, draft=None, min_ngram=2):
    ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    r = SpeculativeRun(model, tok, ids, params, mode, k, draft=draft)
    if mode == "lookup":
        r._drafter = lambda length: LookupDraft(3, min_ngram)
    text = "".join(piece for _, piece in r)
    return text, r


# -- greedy: identical to plain decoding ----------------------------------------------------------
@pytest.mark.parametrize(
    "mode,which", [("lookup", "tied"), ("int4", "tied"), ("int4", "untied_biased")]
)
def test_greedy_equals_plain_decoding(request, tok, mode, which):
    """The prompt repeats the model's own continuation, so that prompt lookup finds drafts (the
    untied model never repeats itself: its lookup case is test_noisy_oracle_draft_is_verified)."""
    model = request.getfixturevalue(which)
    ids = tok.encode(PROMPT)
    ids = (
        ids
        + tok.encode(
            generate(model, tok, ids, max_new_tokens=12, ignore_eos=True), add_special_tokens=False
        )
        + ids
    )
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = generate(model, tok, ids, max_new_tokens=24, ignore_eos=True)
    for k in (1, 5):
        text, r = run(model, tok, ids, params, mode, k, min_ngram=1)  # 1-grams: more drafts
        assert text == plain, (mode, k)
        assert r.stats.generated_tokens == 24 and r.results[0].finish_reason == "length"
        assert r.stats.drafted_tokens > 0, "the test must exercise drafts"
    # and through the public API
    assert (
        llamakin.generate_speculative(
            model, tok, ids, max_new_tokens=24, ignore_eos=True, speculate=mode, draft_tokens=3
        )
        == plain
    )
    stream = llamakin.generate_speculative(
        model, tok, ids, max_new_tokens=24, ignore_eos=True, speculate=mode, stream=True
    )
    assert "".join(stream) == plain and stream.stats.generated_tokens == 24
    with pytest.raises(LlamakinError, match="unknown generation option"):
        llamakin.generate_speculative(model, tok, ids, max_tokens=3)


class NoisyOracleDraft(LookupDraft):
    """Drafts plain decoding's own next tokens, each replaced by a random one with probability 1/2."""

    def __init__(self, prompt_length: int, truth: list[int], vocab: int):
        super().__init__()
        self.prompt_length, self.truth, self.vocab = prompt_length, truth, vocab
        self.generator = torch.Generator().manual_seed(1)

    def propose(self, sequence, k, processor, generator):
        done = len(sequence) - self.prompt_length
        draft = [
            t
            if bool(torch.rand((), generator=self.generator) < 0.5)
            else int(torch.randint(0, self.vocab, (), generator=self.generator))
            for t in self.truth[done : done + k]
        ]
        return draft, [None] * len(draft)


@pytest.mark.parametrize("which", ["tied", "untied_biased"])
def test_noisy_oracle_draft_is_verified(request, tok, which):
    """A deterministic draft with right and wrong tokens: the output is still plain decoding's."""
    model = request.getfixturevalue(which)
    stream = generate(model, tok, PROMPT, max_new_tokens=30, ignore_eos=True, stream=True)
    text = "".join(stream)
    truth = stream.run.results[0].token_ids
    for k in (2, 5):
        r = SpeculativeRun(
            model,
            tok,
            tok.encode(PROMPT),
            SamplingParams(max_new_tokens=30, ignore_eos=True),
            "lookup",
            k,
        )
        r._drafter = lambda length: NoisyOracleDraft(
            len(tok.encode(PROMPT)), truth, model.config.vocab_size
        )
        assert "".join(p for _, p in r) == text
        assert 0 < r.stats.accepted_tokens < r.stats.drafted_tokens


def test_int4_draft_accepts_and_rejects(untied_biased, tok):
    """The int4 draft agrees with the model often but not always, so both branches run."""
    _, r = run(
        untied_biased, tok, PROMPT, SamplingParams(max_new_tokens=24, ignore_eos=True), "int4", 4
    )
    assert 0 < r.stats.accepted_tokens < r.stats.drafted_tokens


def test_int4_draft_quantizes_every_projection(tied, untied_biased):
    from torch import nn

    from llamakin.quant.linear import Int4Linear

    for model in (tied, untied_biased):
        draft = int4_draft(model)
        assert not any(isinstance(m, nn.Linear) for m in draft.modules())
        assert isinstance(draft.lm_head, Int4Linear)
        assert draft.embed.weight is model.embed.weight  # shared, not copied
        assert int4_draft(model) is draft  # made once per weights


def test_eos_inside_a_draft_ends_generation_there(tied, tok):
    """With the model as its own draft every draft token is kept, so an EOS at output position 2
    is in the middle of the first draft: generation stops there, as plain decoding does."""
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    _, full = run(tied, tok, PROMPT, params, "int4", 4, draft=tied)
    ids = full.results[0].token_ids
    for position in (2, 5):
        eos_tok = copy.copy(tok)
        eos_tok.eos_token_ids = (ids[position],)
        cut = ids.index(ids[position])
        plain = generate(tied, eos_tok, PROMPT, max_new_tokens=20, stream=True)
        plain_text = "".join(plain)
        text, r = run(
            tied, eos_tok, PROMPT, SamplingParams(max_new_tokens=20), "int4", 4, draft=tied
        )
        assert text == plain_text and r.results[0].token_ids == ids[:cut]
        assert r.results[0].finish_reason == "stop" == plain.finish_reason
        assert r.stats.accepted_tokens >= cut - 1


def test_max_new_tokens_is_exact(tied, tok):
    for n in (1, 2, 5, 7):
        text, r = run(
            tied,
            tok,
            PROMPT,
            SamplingParams(max_new_tokens=n, ignore_eos=True),
            "int4",
            4,
            draft=tied,
        )
        assert len(r.results[0].token_ids) == n
        assert text == generate(tied, tok, PROMPT, max_new_tokens=n, ignore_eos=True)


class PoisoningDraft(LookupDraft):
    """Proposes wrong tokens half of the time (so most drafts are rejected) and, before every
    proposal, fills every target cache slot past the kept length with large garbage: a rolled
    back slot that stayed visible would change the logits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.run = None
        self.generator = torch.Generator().manual_seed(0)
        self.vocab = vocab

    def propose(self, sequence, k, processor, generator):
        cache = self.run.cache
        assert cache.length == len(sequence) - 1  # every token but the last, nothing rejected
        for keys, values in zip(cache.keys, cache.values):
            keys[:, :, cache.length :] = 50.0
            values[:, :, cache.length :] = -50.0
        good, _ = LookupDraft.propose(self, sequence, k, processor, generator)
        noise = torch.randint(0, self.vocab, (k,), generator=self.generator).tolist()
        draft = [
            g if bool(torch.rand((), generator=self.generator) < 0.5) else n
            for g, n in zip(good, noise)
        ] or noise
        return draft, [None] * len(draft)


@pytest.mark.parametrize("which", ["tied", "untied_biased"])
def test_cache_rollback_is_exact(request, tok, which):
    tied = request.getfixturevalue(which)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain = generate(tied, tok, PROMPT, max_new_tokens=30, ignore_eos=True)
    r = SpeculativeRun(tied, tok, tok.encode(PROMPT), params, "lookup", 4)
    drafter = PoisoningDraft(tied.config.vocab_size)
    drafter.run = r
    r._drafter = lambda length: drafter
    assert "".join(p for _, p in r) == plain
    assert r.stats.accepted_tokens < r.stats.drafted_tokens  # rejections happened


def test_refusals(tied, tok):
    params = SamplingParams(max_new_tokens=4)
    for mode, k, match in [
        ("ngram", 4, "unknown speculation"),
        ("lookup", 0, "draft_tokens"),
        ("lookup", 33, "draft_tokens"),
    ]:
        with pytest.raises(LlamakinError, match=match):
            SpeculativeRun(tied, tok, [1, 2], params, mode, k)
    other = llamakin.Transformer(
        llamakin.ModelConfig(
            vocab_size=50,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(LlamakinError, match="share the model's vocabulary"):
        SpeculativeRun(tied, tok, [1, 2], params, "int4", 4, draft=other)
    with pytest.raises(LlamakinError, match="context"):
        SpeculativeRun(tied, tok, [1] * 100, SamplingParams(max_new_tokens=60), "lookup", 4)


# -- sampling: the acceptance rule preserves the target distribution ----------------------------------
def test_acceptance_rule_samples_the_target_distribution():
    """Draw d ~ q, apply the rule: the output is distributed as p (model draft, and one-hot draft)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.05, 0.02, 0.0])
    q = torch.tensor([0.05, 0.10, 0.40, 0.05, 0.10, 0.10, 0.10, 0.10])
    N = 6000
    for draft_q in (q, None):
        counts = torch.zeros(8)
        for _ in range(N):
            d = int(torch.multinomial(q, 1, generator=g))
            other = accept_or_resample(p, draft_q, d, g)
            counts[d if other is None else other] += 1
        assert (counts / N - p).abs().sum() < l1_bound(8, N)
    assert (q - p).abs().sum() > 3 * l1_bound(8, N)  # the bound separates p from the draft's q


class Ids:
    """A tokenizer for token ids alone: each id prints as ``<id>``."""

    eos_token_ids = ()

    def decode(self, ids, **_):
        return "".join(f"<{i}>" for i in ids)


def small(seed: int, vocab: int = 6) -> llamakin.Transformer:
    torch.manual_seed(seed)
    config = llamakin.ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        max_position_embeddings=64,
        tie_word_embeddings=seed % 2 == 0,
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0)
    return model


@torch.no_grad()
def exact_pairs(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """The exact distribution of plain sampling's first two tokens ``[V, V]`` (full forwards, no cache)."""
    from llamakin.speculative import Processor

    V = model.config.vocab_size
    first = Processor(params, prompt, V, torch.device("cpu")).probs(
        model(torch.tensor([prompt]))[0, -1]
    )
    table = torch.zeros(V, V)
    for a in range(V):
        proc = Processor(params, prompt, V, torch.device("cpu"))
        proc.append(a)
        table[a] = first[a] * proc.probs(model(torch.tensor([prompt + [a]]))[0, -1])
    return table


def sampled_pairs(target, draft, mode, prompt, params, n: int) -> torch.Tensor:
    V = target.config.vocab_size
    counts = torch.zeros(V, V)
    for seed in range(n):
        r = SpeculativeRun(
            target,
            Ids(),
            prompt,
            SamplingParams(**{**params.__dict__, "seed": seed}),
            mode,
            2,
            draft=draft,
        )
        for _ in r:
            pass
        a, b = r.results[0].token_ids
        counts[a, b] += 1
    return counts / n


CASES = {
    "model draft, temperature 1": ("int4", dict(temperature=1.0)),
    "model draft, temperature 0.7, top-k 4, repetition penalty": (
        "int4",
        dict(temperature=0.7, top_k=4, repetition_penalty=1.5),
    ),
    "lookup draft, temperature 1": ("lookup", dict(temperature=1.0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_speculative_sampling_matches_plain_sampling(case):
    """The empirical distribution of the first two tokens over many seeds equals plain sampling's
    exact one within the L1 bound (36 cells, 3000 samples: 0.24). The draft is another random
    model, far from the target (L1 distance of the first token's distributions printed)."""
    mode, knobs = CASES[case]
    target, draft = small(0), small(1) if mode == "int4" else None
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # repeats, so lookup drafts
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, **knobs)
    exact = exact_pairs(target, prompt, params)
    n = 3000
    empirical = sampled_pairs(target, draft, mode, prompt, params, n)
    assert abs(float(exact.sum()) - 1) < 1e-5
    assert (empirical - exact).abs().sum() < l1_bound(36, n)


def test_speculative_sampling_matches_plain_sampling_fast():
    """The same check at 600 samples (bound 0.53) on the case with a model draft at temperature 1,
    where the draft's two-token distribution is farther than 1.0 (L1) from the target's."""
    target, draft = small(0), small(1)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, temperature=1.0)
    exact = exact_pairs(target, prompt, params)
    assert (exact_pairs(draft, prompt, params) - exact).abs().sum() > 2 * l1_bound(36, 600)
    assert (
        sampled_pairs(target, draft, "int4", prompt, params, 600) - exact
    ).abs().sum() < l1_bound(36, 600)


# -- the CLI on the real model -------------------------------------------------------------------
@pytest.mark.slow
def test_cli_speculation_on_the_real_model():
    """float32 weights: an int8 model's logits come out of the kernel in bfloat16, where near-ties
    are common enough that a one-token step and a verification forward can pick differently."""
    from conftest import run_cli

    prompt = "List: apple, banana, cherry. Again: apple, banana,"
    options = ["--max-new-tokens", "16", "--ignore-eos", "--quantize", "none"]
    base = run_cli("generate", prompt, *options, timeout=900)
    assert base.returncode == 0, base.stderr
    for mode in ("lookup", "int4"):
        out = run_cli(
            "generate", prompt, *options, "--speculate", mode, "--draft-tokens", "4", timeout=900
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == base.stdout and "draft tokens accepted" in out.stderr
    bad = run_cli("generate", prompt, "--speculate", "lookup", "--draft-tokens", "0", timeout=900)
    assert bad.returncode == 2 and "draft_tokens" in bad.stderr and "Traceback" not in bad.stderr
