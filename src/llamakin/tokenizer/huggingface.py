"""Hugging Face tokenizer directories (``tokenizer.json`` and its config files) and lone ``tokenizer.model`` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import eos_ids_from_json
from ..errors import CheckpointError
from ..io.gguf import GGUFFile
from .base import Tokenizer, _content, _SentencePiece
from .gguf import from_gguf_metadata
from .tiktoken_files import from_tiktoken


# -- Hugging Face directories ----------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None


def _chat_template_from(directory: Path, config: dict[str, Any]) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    return template


def from_directory(directory: Path) -> Tokenizer:
    config = _read_json(directory / "tokenizer_config.json")
    specials_map = _read_json(directory / "special_tokens_map.json")
    generation = _read_json(directory / "generation_config.json")

    def special(name: str) -> str | None:
        return _content(config.get(name)) or _content(specials_map.get(name))

    extra_eos = list(eos_ids_from_json(generation.get("eos_token_id")))
    template = _chat_template_from(directory, config)
    eos = [t for t in [special("eos_token")] if t]
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a generic Exception
            raise CheckpointError(
                f"{directory / 'tokenizer.json'} is not a readable tokenizer ({e})."
            ) from None
        # The tokenizer.json post-processor usually adds what the model expects (e.g. Llama's BOS);
        # add_bos_token asks llamakin to add it where it does not (never twice).
        return Tokenizer(
            backend,
            bos_token=special("bos_token"),
            eos_tokens=eos,
            extra_eos_ids=extra_eos,
            add_bos=bool(config.get("add_bos_token", False)),
            chat_template=template,
            source=str(directory),
        )
    if (directory / "tokenizer.model").is_file():
        tok = from_model_file(directory / "tokenizer.model")
        if config or generation:
            tok = Tokenizer(
                tok.backend,
                bos_token=special("bos_token") or tok.bos_token,
                eos_tokens=eos or ([tok.eos_token] if tok.eos_token else []),
                extra_eos_ids=list(tok.eos_token_ids) + extra_eos,
                add_bos=config.get("add_bos_token", True),
                add_eos=config.get("add_eos_token", False),
                chat_template=template or tok.chat_template,
                source=str(directory),
            )
        return tok
    rank_files = sorted(directory.glob("*.tiktoken"))
    if rank_files:
        return from_tiktoken(rank_files[0])
    ggufs = sorted(directory.glob("*.gguf"))
    if ggufs:
        return from_gguf_metadata(GGUFFile(ggufs[0]).metadata, source=str(ggufs[0]))
    raise CheckpointError(
        f"{directory} has no tokenizer.json, tokenizer.model, *.tiktoken or .gguf file; "
        "give the tokenizer's path explicitly."
    )


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(256)
    try:
        first = head.decode("ascii").splitlines()[0].split()
    except (UnicodeDecodeError, IndexError):
        return False
    return len(first) == 2 and first[1].isdigit()


def from_model_file(path: Path) -> Tokenizer:
    """``tokenizer.model``: SentencePiece (LLaMA 1/2, Mistral) or a tiktoken rank file (Llama 3)."""
    if _looks_like_tiktoken(path):
        return from_tiktoken(path)
    backend = _SentencePiece(path)
    sp = backend.sp
    bos = sp.IdToPiece(sp.bos_id()) if sp.bos_id() >= 0 else None
    eos = [sp.IdToPiece(sp.eos_id())] if sp.eos_id() >= 0 else []
    return Tokenizer(backend, bos_token=bos, eos_tokens=eos, add_bos=True, source=str(path))
