"""Building ``tokenizers`` backends from vocabularies, merges and scores (byte-level BPE, SentencePiece-style)."""

from __future__ import annotations

from typing import Iterable, Sequence

from .base import SPIECE_UNDERLINE
from .pretokenizers import PreTokenizer


# -- building `tokenizers` backends ------------------------------------------------------------
def _byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pre: PreTokenizer):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre.ignore_merges)
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_specials(tok, specials: Iterable[str], normal: Iterable[str] = ()) -> None:
    from tokenizers import AddedToken

    specials = [AddedToken(t, special=True, normalized=False) for t in specials]
    if specials:
        tok.add_special_tokens(specials)
    normal = [AddedToken(t, special=False, normalized=False) for t in normal]
    if normal:
        tok.add_tokens(normal)


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece-style vocabulary: every split of a token into two
    vocabulary entries, ranked by the merged token's score (best first). Running BPE with these
    merges reproduces SentencePiece/llama.cpp's greedy highest-score pair merging."""
    index = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                candidates.append((-score, index[left], index[right], left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _spm_tokenizer(tokens: list[str], scores: list[float], add_space_prefix: bool):
    """A SentencePiece-BPE vocabulary (LLaMA 1/2, Mistral) as a ``tokenizers`` BPE with byte fallback."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    unk = "<unk>" if "<unk>" in vocab else None
    tok = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges_from_scores(tokens, scores),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_UNDERLINE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
