"""Tokenizers from every place a model's vocabulary lives, behind one small interface.

Sources: Hugging Face ``tokenizer.json`` (with ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json`` for BOS/EOS rules and the chat
template), SentencePiece ``tokenizer.model``, tiktoken rank files (Qwen, Llama 3), and the
vocabularies llama.cpp embeds in GGUF metadata (byte-level BPE with merges, SentencePiece-style
with scores). The BPE itself always runs in the ``tokenizers`` or ``sentencepiece`` library;
this module only assembles their inputs.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .base import SPIECE_UNDERLINE, Tokenizer
from .gguf import from_gguf_metadata, gguf_merges
from .huggingface import from_directory, from_model_file
from .pretokenizers import GGUF_PRE_TOKENIZERS, PreTokenizer
from .tiktoken_files import TIKTOKEN_PRESETS, from_tiktoken, read_tiktoken_ranks


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model directory, a tokenizer file, a ``.gguf`` file or a catalog name."""
    from ..source import resolve_model

    source = resolve_model(path)
    if source.is_gguf:
        from ..io.gguf import GGUFFile

        return from_gguf_metadata(GGUFFile(source.path).metadata, source=str(source.path))
    if source.named is None:
        return from_directory(source.path)
    path = source.named
    name = path.name.lower()
    if name == "tokenizer.json" or name.endswith("config.json"):
        return from_directory(path.parent)
    if name.endswith(".tiktoken"):
        return from_tiktoken(path)
    if name.endswith(".model") or ".model." in name:
        return from_model_file(path)
    raise CheckpointError(
        f"{path} is not a tokenizer file llamakin knows (tokenizer.json, tokenizer.model, "
        "*.tiktoken, .gguf)."
    )


__all__ = [
    "GGUF_PRE_TOKENIZERS",
    "SPIECE_UNDERLINE",
    "TIKTOKEN_PRESETS",
    "PreTokenizer",
    "Tokenizer",
    "from_directory",
    "from_gguf_metadata",
    "from_model_file",
    "from_tiktoken",
    "gguf_merges",
    "load_tokenizer",
    "read_tiktoken_ranks",
]
