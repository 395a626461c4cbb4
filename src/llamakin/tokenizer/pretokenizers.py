"""How llama.cpp splits text before BPE, per ``tokenizer.ggml.pre`` value (its llama-vocab.cpp)."""

from __future__ import annotations

from dataclasses import dataclass

# Pre-tokenizer split patterns (as llama.cpp's llama-vocab.cpp applies them, in sequence).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """How a byte-level BPE vocabulary splits text before merging (llama.cpp's pre-tokenizer types).

    ``ignore_merges``: a piece that is itself a vocabulary entry is taken whole (Llama 3, and
    every tiktoken vocabulary); ``add_bos``: llama.cpp forces BOS on for this type.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool | None = None


_GPT2 = PreTokenizer((GPT2_SPLIT,))
# llama.cpp's fallback for a missing or "default" tokenizer.ggml.pre: punctuation runs split off
# first ("summer's" -> "summer", "'", "s"), then GPT-2's regex, then digit runs in threes
_LLAMA_CPP_DEFAULT = PreTokenizer(
    (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")
)
_DIGITS_GPT2 = PreTokenizer((r"\p{N}", GPT2_SPLIT))  # every digit its own piece
_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((QWEN2_SPLIT,))
GGUF_PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _LLAMA_CPP_DEFAULT,
    **dict.fromkeys(("gpt-2", "gpt2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
        _DIGITS_GPT2,
    ),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3_SPLIT,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2),
    "chatglm-bpe": PreTokenizer((LLAMA3_SPLIT,)),
    "glm4": PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]")),
}
