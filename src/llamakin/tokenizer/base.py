"""The one tokenizer interface every source is adapted to (``tokenizers`` or ``sentencepiece`` underneath)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import CheckpointError, LlamakinError

SPIECE_UNDERLINE = "\u2581"


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


class Tokenizer:
    """``encode``/``decode``/``apply_chat_template`` over a ``tokenizers`` or ``sentencepiece`` backend.

    ``add_bos``: whether ``encode(add_special_tokens=True)`` prepends BOS itself (backends whose
    own post-processor already adds it, like a Llama ``tokenizer.json``, leave this False).
    ``eos_token_ids``: every id that ends generation (EOS, end-of-turn, generation_config's list).
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_tokens: Sequence[str] = (),
        extra_eos_ids: Iterable[int] = (),
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        source: str = "",
    ):
        self.backend = backend
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        ids = [self.token_to_id(t) for t in eos_tokens] + list(extra_eos_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.add_bos = add_bos and self.bos_token_id is not None
        self.add_eos = add_eos and bool(self.eos_token_ids)
        self.chat_template = chat_template

    # -- backend-neutral operations ---------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if isinstance(self.backend, _SentencePiece):
            return self.backend.vocab_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_special_tokens:
            if self.add_bos and (not ids or ids[0] != self.bos_token_id):
                ids.insert(0, self.bos_token_id)
            if self.add_eos:
                ids.append(self.eos_token_ids[0])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the model's chat template (sandboxed, transformers' semantics)."""
        from ..chat_template import render

        if not self.chat_template:
            raise LlamakinError(
                f"the tokenizer from {self.source or 'this model'} has no chat template; "
                "use plain generation or supply a template."
            )
        return render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            name=f"the chat template of {self.source or 'this tokenizer'}",
            **kwargs,
        )

    def save(self, directory: str | Path) -> None:
        """Write this tokenizer as a Hugging Face tokenizer directory (``tokenizer.json`` or
        ``tokenizer.model``, plus ``tokenizer_config.json``) that :func:`load_tokenizer` and
        transformers read back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.backend, _SentencePiece):
            (directory / "tokenizer.model").write_bytes(self.backend.sp.serialized_model_proto())
        else:
            self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        if len(self.eos_token_ids) > 1:
            (directory / "generation_config.json").write_text(
                json.dumps({"eos_token_id": list(self.eos_token_ids)}) + "\n"
            )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={list(self.eos_token_ids)}, add_bos={self.add_bos})"
        )


class _Encoding:
    def __init__(self, ids: list[int]):
        self.ids = ids


class _SentencePiece:
    """Adapts ``sentencepiece.SentencePieceProcessor`` to the ``tokenizers`` calls used above."""

    def __init__(self, path: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable SentencePiece model ({e}).") from None

    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i

    def id_to_token(self, i: int) -> str | None:
        return self.sp.IdToPiece(i) if 0 <= i < self.vocab_size() else None

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        return _Encoding(self.sp.EncodeAsIds(text))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if not skip_special_tokens:
            # SentencePiece drops control tokens when decoding; spell them out like transformers does.
            pieces, out = [], []
            for i in ids:
                if self.sp.IsControl(i):
                    if pieces:
                        out.append(self.sp.DecodeIds(pieces))
                        pieces = []
                    out.append(self.sp.IdToPiece(i))
                else:
                    pieces.append(i)
            if pieces:
                out.append(self.sp.DecodeIds(pieces))
            return "".join(out)
        return self.sp.DecodeIds([i for i in ids if not self.sp.IsControl(i)])
