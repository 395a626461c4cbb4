"""The vocabularies llama.cpp embeds in GGUF metadata, as tokenizers (byte-level BPE with merges, SentencePiece-style with scores)."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, LlamakinError
from .backends import _add_specials, _byte_level_tokenizer, _bytes_to_unicode, _spm_tokenizer
from .base import Tokenizer
from .pretokenizers import GGUF_PRE_TOKENIZERS

# -- GGUF ------------------------------------------------------------------------------------------
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def _built(build, source: str):
    """A ``tokenizers`` backend, its construction errors (bare ``Exception``s) as one sentence."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise CheckpointError(
            f"{source}: the GGUF tokenizer cannot be built ({str(e).splitlines()[0] if str(e) else e!r}); "
            "the file is corrupt."
        ) from None


def gguf_merges(merges: Any, tokens: list[str], source: str) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` ("left right" strings) as pairs, each side and the merged token
    in the vocabulary (the ``tokenizers`` BPE refuses anything else with a bare exception)."""
    if not isinstance(merges, list):
        raise CheckpointError(
            f"{source}: tokenizer.ggml.merges must be a list of strings; the file is corrupt."
        )
    vocab = set(tokens)
    pairs = []
    for n, merge in enumerate(merges):
        left, sep, right = merge.partition(" ") if isinstance(merge, str) else ("", "", "")
        if not sep or not left or not right:
            raise CheckpointError(
                f"{source}: merge {n} ({merge!r}) is not two tokens separated by a space; "
                "the GGUF tokenizer is corrupt."
            )
        missing = next((t for t in (left, right) if t not in vocab), None)
        if missing is not None:
            raise CheckpointError(
                f"{source}: merge {n} ({merge!r}) uses {missing!r}, which is not in the "
                "vocabulary; the GGUF tokenizer is corrupt."
            )
        pairs.append((left, right))
    return pairs


def from_gguf_metadata(meta: dict[str, Any], source: str = "") -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(
            f"{source} has no tokenizer in its GGUF metadata; give a tokenizer path explicitly."
        )
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(
            f"{source}: tokenizer.ggml.tokens must be a list of strings; the file is corrupt."
        )
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    for key, values in (("token_type", types), ("scores", scores)):
        if (
            not isinstance(values, list)
            or len(values) != len(tokens)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise CheckpointError(
                f"{source}: tokenizer.ggml.{key} must hold one number per token "
                f"({len(tokens)}); the file is corrupt."
            )
    control = [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
    user = [t for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    if kind == "gpt2":
        merges = gguf_merges(meta.get("tokenizer.ggml.merges", []), tokens, source)
        name = meta.get("tokenizer.ggml.pre", "default")
        if name not in GGUF_PRE_TOKENIZERS:
            raise LlamakinError(
                f"{source} uses the pre-tokenizer {name!r}, which llamakin does not know; "
                f"known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}."
            )
        pre = GGUF_PRE_TOKENIZERS[name]
        backend = _built(
            lambda: _byte_level_tokenizer({t: i for i, t in enumerate(tokens)}, merges, pre), source
        )
        byte_alphabet = set(_bytes_to_unicode().values())
        # llama.cpp mislabels some; keep whole ones
        control = [t for t in control if set(t) <= byte_alphabet]
        add_bos_default = bool(pre.add_bos)
    elif kind == "llama":
        backend = _built(
            lambda: _spm_tokenizer(
                tokens, scores, bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            ),
            source,
        )
        add_bos_default = True
    else:
        raise LlamakinError(
            f"{source} has a {kind!r} tokenizer; llamakin reads GGUF 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece) vocabularies."
        )
    _add_specials(backend, control, [t for t in user if backend.token_to_id(t) is not None])

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos = [
        t for t in (token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.eot_token_id")) if t
    ]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default)
    if kind == "gpt2" and pre.add_bos is not None:
        add_bos = pre.add_bos
    return Tokenizer(
        backend,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_tokens=eos,
        add_bos=bool(add_bos),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        source=source,
    )
