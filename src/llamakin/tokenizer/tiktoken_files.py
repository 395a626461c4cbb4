"""tiktoken rank files (Qwen v1, Llama 3) as tokenizers."""

from __future__ import annotations

import base64
from pathlib import Path

from ..errors import CheckpointError, LlamakinError
from .backends import _add_specials, _byte_level_tokenizer, _bytes_to_unicode
from .base import Tokenizer
from .pretokenizers import LLAMA3_SPLIT, QWEN2_SPLIT, PreTokenizer


# -- tiktoken rank files -------------------------------------------------------------------------
def _llama3_specials() -> list[str]:
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


# Known tiktoken vocabularies by rank count: (split pattern, special tokens after the ranks, BOS, EOS tokens).
TIKTOKEN_PRESETS = {
    151643: (
        QWEN2_SPLIT,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)],
        None,
        ["<|endoftext|>", "<|im_end|>"],
    ),
    128000: (
        LLAMA3_SPLIT,
        _llama3_specials(),
        "<|begin_of_text|>",
        ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"],
    ),
}


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    try:
        for n, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a tiktoken rank file (line {n + 1}: {e}).") from None
    return ranks


def from_tiktoken(path: Path, source: str = "") -> Tokenizer:
    """A tiktoken vocabulary as byte-level BPE: the merge of a pair ranks as the token it makes,
    which is exactly tiktoken's lowest-rank-pair-first rule."""
    ranks = read_tiktoken_ranks(path)
    if len(ranks) not in TIKTOKEN_PRESETS:
        raise LlamakinError(
            f"{path} has {len(ranks)} ranks, which matches no known tiktoken vocabulary "
            "(Qwen: 151643, Llama 3: 128000)."
        )
    split, specials, bos, eos = TIKTOKEN_PRESETS[len(ranks)]
    table = _bytes_to_unicode()
    spell = {token: "".join(table[b] for b in token) for token in ranks}
    vocab = {spell[t]: r for t, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell[left], spell[right]))
    merges.sort()
    backend = _byte_level_tokenizer(
        vocab, [(a, b) for *_, a, b in merges], PreTokenizer((split,), ignore_merges=True)
    )
    _add_specials(backend, specials)
    return Tokenizer(
        backend, bos_token=bos, eos_tokens=eos, add_bos=bos is not None, source=source or str(path)
    )
