"""The real SmolLM2-135M-Instruct (the default model) against transformers on the same GGUF."""

from __future__ import annotations

import pytest
import torch

import llamakin
from llamakin.generate import GenerationRun, SamplingParams
from assets import smollm2_gguf
from conftest import run_cli

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors: red,",
]


@pytest.fixture(scope="module")
def models():
    path = smollm2_gguf()
    ours = llamakin.load(path)
    tok = llamakin.load_tokenizer(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return ours, tok, theirs


@torch.no_grad()
def test_logits_match_transformers(models):
    ours, tok, theirs = models
    ids = torch.tensor([tok.encode(PROMPTS[2])])
    expected = theirs(ids).logits
    got = ours(ids)
    # float32 rounding only: 0.0 where both run MKL (AVX2); 1.5e-4 on logits up to ~16 on AVX-512
    # CPUs, where llamakin's products of 8+ rows are oneDNN's (another summation order): 1e-5 relative
    assert (got - expected).abs().max().item() < 5e-4


@torch.no_grad()
def test_greedy_continuations_identical_token_for_token(models):
    ours, tok, theirs = models
    new = 24
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        run = GenerationRun(ours, tok, [ids], SamplingParams(max_new_tokens=new, ignore_eos=True))
        for _ in run:
            pass
        reference = theirs.generate(
            torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
        assert run.results[0].token_ids == reference[0, len(ids) :].tolist(), prompt


def test_known_good_chat_answer(models):
    ours, tok, _ = models
    answer = llamakin.generate(
        ours,
        tok,
        [{"role": "user", "content": "What is the capital of France?"}],
        max_new_tokens=32,
    )
    assert answer == "The capital of France is Paris."


def test_batched_equals_unbatched_on_the_real_model(models):
    ours, tok, _ = models
    alone = [llamakin.generate(ours, tok, p, max_new_tokens=12) for p in PROMPTS]
    assert llamakin.generate_batch(ours, tok, PROMPTS, max_new_tokens=12) == alone


def test_cli_generate_with_the_default_model():
    result = run_cli("generate", "The capital of France is", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is") and "Paris" in result.stdout
    assert "tok/s" in result.stderr


def test_cli_chat_over_piped_stdin():
    result = run_cli(
        "chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        stdin="What is the capital of France?\n/reset\nWhat is the capital of Germany?\n",
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0] == "The capital of France is Paris." and "Berlin" in lines[1]


def test_gguf_export_of_the_catalog_model_keeps_its_tokenizer(models, tmp_path):
    """``convert smollm2-135m-instruct out.gguf``: the catalog name resolves to its file, whose
    tokenizer and chat template go along (llama.cpp refuses a GGUF without a tokenizer)."""
    from llamakin.cli import main
    from llamakin.io.gguf import GGUFFile

    ours, tok, _ = models
    assert (
        main(["convert", "smollm2-135m-instruct", str(tmp_path / "m.gguf"), "--gguf-type", "Q8_0"])
        == 0
    )
    meta, original = GGUFFile(tmp_path / "m.gguf").metadata, GGUFFile(smollm2_gguf()).metadata
    for key in (
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
    ):
        assert meta[key] == original[key], key
    exported = llamakin.load_tokenizer(tmp_path / "m.gguf")
    assert [exported.encode(p) for p in PROMPTS] == [tok.encode(p) for p in PROMPTS]
