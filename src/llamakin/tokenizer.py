"""Tokenizers from every place a model's vocabulary lives, behind one small interface.

Sources: Hugging Face ``tokenizer.json`` (with ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json`` for BOS/EOS rules and the chat
template), SentencePiece ``tokenizer.model``, tiktoken rank files (Qwen, Llama 3), and the
vocabularies llama.cpp embeds in GGUF metadata (byte-level BPE with merges, SentencePiece-style
with scores). The BPE itself always runs in the ``tokenizers`` or ``sentencepiece`` library;
this module only assembles their inputs.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import eos_ids_from_json
from .errors import CheckpointError, LlamakinError

# Pre-tokenizer split patterns (as llama.cpp's llama-vocab.cpp applies them, in sequence).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


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
_LLAMA_CPP_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"))
_DIGITS_GPT2 = PreTokenizer((r"\p{N}", GPT2_SPLIT))  # every digit its own piece
_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((QWEN2_SPLIT,))
GGUF_PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _LLAMA_CPP_DEFAULT,
    **dict.fromkeys(("gpt-2", "gpt2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), _DIGITS_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3_SPLIT,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2),
    "chatglm-bpe": PreTokenizer((LLAMA3_SPLIT,)),
    "glm4": PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]")),
}

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

    def __init__(self, backend: Any, *, bos_token: str | None = None, eos_tokens: Sequence[str] = (),
                 extra_eos_ids: Iterable[int] = (), add_bos: bool = False, add_eos: bool = False,
                 chat_template: str | None = None, source: str = ""):
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

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the model's chat template (sandboxed, transformers' semantics)."""
        from .chat_template import render

        if not self.chat_template:
            raise LlamakinError(f"the tokenizer from {self.source or 'this model'} has no chat template; "
                                "use plain generation or supply a template.")
        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                      name=f"the chat template of {self.source or 'this tokenizer'}", **kwargs)

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
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "add_bos_token": self.add_bos,
                  "add_eos_token": self.add_eos, "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if len(self.eos_token_ids) > 1:
            (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_token_ids)}) + "\n")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={list(self.eos_token_ids)}, add_bos={self.add_bos})")


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


# -- building `tokenizers` backends ------------------------------------------------------------
def _byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pre: PreTokenizer):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
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
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores), unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_UNDERLINE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# -- GGUF ------------------------------------------------------------------------------------------
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def _built(build, source: str):
    """A ``tokenizers`` backend, its construction errors (bare ``Exception``s) as one sentence."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise CheckpointError(f"{source}: the GGUF tokenizer cannot be built ({str(e).splitlines()[0] if str(e) else e!r}); "
                              "the file is corrupt.") from None


def gguf_merges(merges: Any, tokens: list[str], source: str) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` ("left right" strings) as pairs, each side and the merged token
    in the vocabulary (the ``tokenizers`` BPE refuses anything else with a bare exception)."""
    if not isinstance(merges, list):
        raise CheckpointError(f"{source}: tokenizer.ggml.merges must be a list of strings; the file is corrupt.")
    vocab = set(tokens)
    pairs = []
    for n, merge in enumerate(merges):
        left, sep, right = merge.partition(" ") if isinstance(merge, str) else ("", "", "")
        if not sep or not left or not right:
            raise CheckpointError(f"{source}: merge {n} ({merge!r}) is not two tokens separated by a space; "
                                  "the GGUF tokenizer is corrupt.")
        missing = next((t for t in (left, right) if t not in vocab), None)
        if missing is not None:
            raise CheckpointError(f"{source}: merge {n} ({merge!r}) uses {missing!r}, which is not in the "
                                  "vocabulary; the GGUF tokenizer is corrupt.")
        pairs.append((left, right))
    return pairs


def from_gguf_metadata(meta: dict[str, Any], source: str = "") -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{source} has no tokenizer in its GGUF metadata; give a tokenizer path explicitly.")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens must be a list of strings; the file is corrupt.")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    for key, values in (("token_type", types), ("scores", scores)):
        if not isinstance(values, list) or len(values) != len(tokens) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{source}: tokenizer.ggml.{key} must hold one number per token "
                                  f"({len(tokens)}); the file is corrupt.")
    control = [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
    user = [t for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    if kind == "gpt2":
        merges = gguf_merges(meta.get("tokenizer.ggml.merges", []), tokens, source)
        name = meta.get("tokenizer.ggml.pre", "default")
        if name not in GGUF_PRE_TOKENIZERS:
            raise LlamakinError(f"{source} uses the pre-tokenizer {name!r}, which llamakin does not know; "
                                f"known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}.")
        pre = GGUF_PRE_TOKENIZERS[name]
        backend = _built(lambda: _byte_level_tokenizer({t: i for i, t in enumerate(tokens)}, merges, pre), source)
        byte_alphabet = set(_bytes_to_unicode().values())
        control = [t for t in control if set(t) <= byte_alphabet]  # llama.cpp mislabels some; keep whole ones
        add_bos_default = bool(pre.add_bos)
    elif kind == "llama":
        backend = _built(lambda: _spm_tokenizer(tokens, scores, bool(meta.get("tokenizer.ggml.add_space_prefix", True))),
                         source)
        add_bos_default = True
    else:
        raise LlamakinError(f"{source} has a {kind!r} tokenizer; llamakin reads GGUF 'gpt2' (byte-level BPE) "
                            "and 'llama' (SentencePiece) vocabularies.")
    _add_specials(backend, control, [t for t in user if backend.token_to_id(t) is not None])

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos = [t for t in (token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.eot_token_id")) if t]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default)
    if kind == "gpt2" and pre.add_bos is not None:
        add_bos = pre.add_bos
    return Tokenizer(backend, bos_token=token("tokenizer.ggml.bos_token_id"), eos_tokens=eos,
                     add_bos=bool(add_bos),
                     add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                     chat_template=meta.get("tokenizer.chat_template"), source=source)


# -- tiktoken rank files -------------------------------------------------------------------------
def _llama3_specials() -> list[str]:
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


# Known tiktoken vocabularies by rank count: (split pattern, special tokens after the ranks, BOS, EOS tokens).
TIKTOKEN_PRESETS = {
    151643: (QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)],
             None, ["<|endoftext|>", "<|im_end|>"]),
    128000: (LLAMA3_SPLIT, _llama3_specials(), "<|begin_of_text|>", ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]),
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
        raise LlamakinError(f"{path} has {len(ranks)} ranks, which matches no known tiktoken vocabulary "
                            "(Qwen: 151643, Llama 3: 128000).")
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
    backend = _byte_level_tokenizer(vocab, [(a, b) for *_, a, b in merges], PreTokenizer((split,), ignore_merges=True))
    _add_specials(backend, specials)
    return Tokenizer(backend, bos_token=bos, eos_tokens=eos, add_bos=bos is not None, source=source or str(path))


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
            raise CheckpointError(f"{directory / 'tokenizer.json'} is not a readable tokenizer ({e}).") from None
        # The tokenizer.json post-processor usually adds what the model expects (e.g. Llama's BOS);
        # add_bos_token asks llamakin to add it where it does not (never twice).
        return Tokenizer(backend, bos_token=special("bos_token"), eos_tokens=eos, extra_eos_ids=extra_eos,
                         add_bos=bool(config.get("add_bos_token", False)), chat_template=template,
                         source=str(directory))
    if (directory / "tokenizer.model").is_file():
        tok = from_model_file(directory / "tokenizer.model")
        if config or generation:
            tok = Tokenizer(tok.backend, bos_token=special("bos_token") or tok.bos_token,
                            eos_tokens=eos or ([tok.eos_token] if tok.eos_token else []),
                            extra_eos_ids=list(tok.eos_token_ids) + extra_eos,
                            add_bos=config.get("add_bos_token", True), add_eos=config.get("add_eos_token", False),
                            chat_template=template or tok.chat_template, source=str(directory))
        return tok
    rank_files = sorted(directory.glob("*.tiktoken"))
    if rank_files:
        return from_tiktoken(rank_files[0])
    ggufs = sorted(directory.glob("*.gguf"))
    if ggufs:
        return load_tokenizer(ggufs[0])
    raise CheckpointError(f"{directory} has no tokenizer.json, tokenizer.model, *.tiktoken or .gguf file; "
                          "give the tokenizer's path explicitly.")


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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model directory, a tokenizer file, a ``.gguf`` file or a catalog name."""
    from .source import resolve_model

    source = resolve_model(path)
    if source.is_gguf:
        from .io.gguf import GGUFFile

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
    raise CheckpointError(f"{path} is not a tokenizer file llamakin knows (tokenizer.json, tokenizer.model, "
                          "*.tiktoken, .gguf).")
