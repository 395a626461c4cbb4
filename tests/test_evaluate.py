"""Perplexity: both protocols against independent re-implementations on transformers' logits, the
window arithmetic, batching, the CLI, and the corpora."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import llamakin
from eval_assets import TEXT, tiny_llama_dir
from llamakin.errors import LlamakinError
from llamakin.evaluate import Window, encode_prefix, perplexity, score_windows, sliding_windows

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tiny(request, tmp_path_factory):
    path = tiny_llama_dir(tmp_path_factory.mktemp("eval"), bos=request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, llamakin.load(path), llamakin.load_tokenizer(path)


def hf_token_nll(hf, ids: list[int]) -> torch.Tensor:
    """-log p(ids[t] | ids[:t]) for t >= 1, from transformers, in float64."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return -logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_sliding_windows_score_every_token_exactly_once():
    for n, context, stride in [
        (1000, 64, 32),
        (1000, 64, 64),
        (1000, 64, 1),
        (10, 64, 32),
        (65, 64, 63),
        (200, 7, 3),
    ]:
        ids = list(range(n))
        scored = []
        for w in sliding_windows(ids, context, stride):
            assert len(w.ids) <= context
            scored += w.ids[w.score_from + 1 :]
            if w.ids[0] != 0:  # a later window: its first context - stride tokens are history only
                assert w.score_from + 1 == max(context - stride, 1)
        if stride < context:
            assert scored == ids[1:]
        else:  # disjoint windows (as Hugging Face's recipe): a window's first token has no history to score it
            assert scored == [i for i in ids if i % context]


def test_sliding_protocol_matches_hugging_face_recipe(tiny):
    """The strided-window recipe of https://huggingface.co/docs/transformers/perplexity, written out
    on transformers' model: each window's new tokens scored with the window's history."""
    path, hf, model, tok = tiny
    ids = tok.encode(TEXT * 2)
    context, stride = 64, 24
    nll, previous_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = ids[begin:end]
        new = end - previous_end  # tokens this window scores (the last `new` positions)
        nll.append(hf_token_nll(hf, window)[-min(new, len(window) - 1) :])
        previous_end = end
        if end == len(ids):
            break
    nll = torch.cat(nll)
    result = perplexity(model, tok, TEXT * 2, context=context, stride=stride, batch_size=3)
    assert result.tokens == len(ids) - 1 == nll.numel()
    assert result.perplexity == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    expected_stderr = math.exp(nll.mean()) * math.sqrt(
        nll.var(unbiased=False).item() / (nll.numel() - 1)
    )
    assert result.stderr == pytest.approx(expected_stderr, rel=1e-4)


def test_llama_cpp_protocol_matches_perplexity_cpp(tiny):
    """llama-perplexity's loop, re-implemented from tools/perplexity/perplexity.cpp: disjoint chunks of
    n_ctx tokens, BOS over the first token of each chunk when the vocabulary adds BOS, tokens
    n_ctx/2+1 .. n_ctx-1 scored, stderr = ppl * sqrt((<x^2> - <x>^2) / (n - 1))."""
    path, hf, model, tok = tiny
    n_ctx = 32
    text = TEXT * 3 + "\n"
    tokens = tok.encode(text[:-1])  # -f drops one trailing newline
    add_bos = tok.bos_token_id is not None and tokens[0] == tok.bos_token_id
    nll = nll2 = 0.0
    count = 0
    first = n_ctx // 2
    for i in range(len(tokens) // n_ctx):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        if add_bos:
            chunk = [tok.bos_token_id] + chunk[1:]
        # logits at first..n_ctx-2 predict tokens first+1..n_ctx-1
        x = hf_token_nll(hf, chunk)[first:]
        nll += x.sum().item()
        nll2 += (x * x).sum().item()
        count += n_ctx - first - 1
    nll, nll2 = nll / count, nll2 / count
    ppl = math.exp(nll)
    stderr = math.sqrt((nll2 - nll * nll) / (count - 1)) * ppl
    result = perplexity(model, tok, text, context=n_ctx, protocol="llama.cpp", batch_size=4)
    assert (result.tokens, result.windows) == (count, len(tokens) // n_ctx)
    assert result.perplexity == pytest.approx(ppl, rel=1e-5)
    assert result.stderr == pytest.approx(stderr, rel=1e-4)
    capped = perplexity(model, tok, text, context=n_ctx, protocol="llama.cpp", max_chunks=2)
    assert capped.windows == 2 and capped.tokens == 2 * (n_ctx - first - 1)


def test_batching_and_padding_change_nothing(tiny):
    _, _, model, tok = tiny
    one = perplexity(model, tok, [TEXT, TEXT[:300]], context=48, stride=20, batch_size=1)
    many = perplexity(model, tok, [TEXT, TEXT[:300]], context=48, stride=20, batch_size=5)
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-6) and many.tokens == one.tokens


def test_scores_are_transformers_log_softmax_and_argmax_only_when_asked(tiny):
    """score_windows' fused log-softmax equals transformers' log_softmax at each scored position;
    ``greedy=False`` (what perplexity uses) gives the same log-probabilities and no argmax."""
    _, hf, model, tok = tiny
    ids = tok.encode(TEXT)[:40]
    windows = [Window(ids, 5), Window(ids[:30], 0)]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
    for greedy in (True, False):
        scores = dict(score_windows(model, windows, batch_size=2, greedy=greedy))
        for index, w in enumerate(windows):
            n = len(w.ids) - 1
            expected = logits[w.score_from : n].gather(
                -1, torch.tensor(w.ids[w.score_from + 1 :])[:, None]
            )
            torch.testing.assert_close(
                scores[index].logprobs.double(), expected[:, 0], rtol=1e-5, atol=1e-5
            )
            if greedy:
                argmax = logits[w.score_from : n].argmax(-1) == torch.tensor(
                    w.ids[w.score_from + 1 :]
                )
                assert torch.equal(scores[index].greedy, argmax)
            else:
                assert scores[index].greedy is None


@pytest.mark.parametrize("protocol", ["sliding", "llama.cpp"])
def test_max_chunks_tokenizes_only_the_prefix_it_needs_with_the_same_result(
    tiny, protocol, monkeypatch
):
    """With --max-chunks only a prefix of the text is tokenized; the ids, and so the perplexity,
    are those of tokenizing the whole text."""
    _, _, model, tok = tiny
    lines = TEXT.splitlines()
    text = "\n".join(f"{i}. {lines[i % len(lines)]}" for i in range(3000)) + "\n"
    full = tok.encode(text)
    calls = []

    def counting(t):
        calls.append(len(t))
        return tok.encode(t)

    for needed in (1, 100, 1000, 5000, len(full) - 10, len(full) + 10):
        calls.clear()
        assert encode_prefix(counting, text, needed) == full[:needed]
        # never the whole text when a prefix does
        assert needed >= len(full) - 100 or max(calls) < len(text)
    kwargs = dict(context=64, protocol=protocol, max_chunks=3, batch_size=2)
    prefix = perplexity(model, tok, text, **kwargs)
    monkeypatch.setattr("llamakin.evaluate.encode_prefix", lambda encode, t, needed: encode(t))
    whole = perplexity(model, tok, text, **kwargs)
    assert (prefix.perplexity, prefix.tokens, prefix.windows) == (
        whole.perplexity,
        whole.tokens,
        whole.windows,
    )
    assert prefix.text_tokens < whole.text_tokens == len(full) - (protocol == "llama.cpp")


def test_bad_arguments_are_one_sentence(tiny):
    _, _, model, tok = tiny
    with pytest.raises(LlamakinError, match="at least 64 tokens"):
        perplexity(model, tok, "Shall I compare thee", context=32, protocol="llama.cpp")
    with pytest.raises(LlamakinError, match="context"):
        perplexity(model, tok, TEXT, context=4096)
    with pytest.raises(LlamakinError, match="protocol"):
        perplexity(model, tok, TEXT, protocol="lmstudio")
    with pytest.raises(LlamakinError, match="stride"):
        perplexity(model, tok, TEXT, context=32, stride=40)


def test_cli_json_and_errors(tmp_path_factory, capsys):
    from llamakin.cli import main

    root = tmp_path_factory.mktemp("cli")
    path = tiny_llama_dir(root)
    (root / "t.txt").write_text(TEXT * 2)
    base = ["eval", "perplexity", "--model", str(path), "--context", "32"]
    assert main(base + ["--file", str(root / "t.txt"), "--protocol", "llama.cpp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"perplexity", "stderr", "tokens", "tokens_per_second", "protocol"} <= set(out)
    model, tok = llamakin.load(path), llamakin.load_tokenizer(path)
    assert out["perplexity"] == pytest.approx(
        perplexity(model, tok, TEXT * 2, context=32, protocol="llama.cpp").perplexity, rel=1e-6
    )
    assert main(base + ["--file", str(root / "t.txt")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("perplexity ") and "tokens/s" in printed and "sliding" in printed
    assert main(base + ["--file", str(root / "missing.txt")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"llamakin: error: {root / 'missing.txt'} is not a file; give a text "
        "file to evaluate on."
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamakin.cli",
            "eval",
            "perplexity",
            "--model",
            str(path),
            "--file",
            str(root / "t.txt"),
            "--context",
            "9999",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "context" in done.stderr


def test_wiki_markup_is_stripped_to_prose():
    from llamakin.corpora import strip_wiki_markup

    wikitext = (
        "{{Infobox person|name=Ada {{nowrap|Lovelace}}}}\n'''Ada Lovelace''' was an [[England|English]] "
        "[[mathematician]].<ref>Source {{cite}}</ref>\n== Early life ==\n[[File:Ada.jpg|thumb|A [[portrait]]]]\n"
        "{| class=wikitable\n|-\n| cell\n|}\n* a list item\nShe wrote<!-- hidden --> notes."
    )
    assert (
        strip_wiki_markup(wikitext)
        == "Ada Lovelace was an English mathematician.\nEarly life\nShe wrote notes."
    )


@pytest.mark.slow
def test_wikipedia_corpus_from_the_gensim_wheel():
    from llamakin.corpora import corpus_file

    text = corpus_file("wikipedia").read_text()
    assert len(text) > 1_000_000
    # a few nested-caption leftovers at most
    assert text.count("{{") + text.count("[[") < 1e-4 * len(text)
    assert "Anarchism" in text[:2000]


@pytest.mark.parametrize("rope_scaling", [None, {"type": "dynamic", "factor": 2.0}])
def test_long_batches_are_padded_to_a_multiple_of_eight_with_the_same_scores(
    monkeypatch, rope_scaling
):
    """From 256 positions a batch is right-padded to a multiple of 8 (PyTorch's CPU kernels are
    slower on odd lengths), which changes no score of a causal model; a model whose RoPE depends
    on the sequence length (dynamic NTK) keeps the exact width."""
    import llamakin.evaluate as evaluate

    torch.manual_seed(0)
    config = dict(
        vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, max_position_embeddings=320,
    )  # fmt: skip
    if rope_scaling:
        config["rope_scaling"] = llamakin.config.RopeScaling(**rope_scaling)
    model = llamakin.Transformer(llamakin.ModelConfig(**config)).eval()
    windows = [Window(torch.randint(0, 97, (n,)).tolist(), s) for n, s in ((301, 150), (290, 0))]
    widths = []
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda ids, **k: widths.append(ids.shape[1]) or forward(ids, **k)
    )
    padded = dict(score_windows(model, windows, batch_size=2, greedy=True))
    monkeypatch.setattr(evaluate, "PAD_FROM", 10**9)
    exact = dict(score_windows(model, windows, batch_size=2, greedy=True))
    assert widths == ([300, 300] if rope_scaling else [304, 300])
    for i in exact:
        assert torch.allclose(padded[i].logprobs, exact[i].logprobs, atol=1e-5, rtol=0)
        assert torch.equal(padded[i].greedy, exact[i].greedy)
