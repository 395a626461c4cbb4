"""Export to GGUF, so llama.cpp (and everything built on it) can run what llamakin loads or trains.

Tensor names, q/k row order (interleaved for the llama architecture) and metadata keys follow
llama.cpp's converter; matrices are written as F32, F16 or Q8_0, vectors always as F32. The
tokenizer goes along when the source has one (GGUF metadata copied as is; a byte-level BPE
``tokenizer.json``, tiktoken ranks or a SentencePiece model translated to llama.cpp's vocabulary
keys): llama.cpp refuses a GGUF without one. A byte-level BPE is written only under a
pre-tokenizer name that makes llama.cpp split text the way the source tokenizer does (``gpt-2``
for GPT-2's regex, not llama.cpp's ``default``, which also splits punctuation and digit runs);
one without such a name is refused rather than written to tokenize differently. Checked in
llama.cpp itself (README, "llama.cpp on the same machine"; ``benchmarks/bench_llama_cpp.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import UnsupportedError
from .families.gguf import GGUF_FAMILIES, TENSOR_NAMES, GGUFFamily
from .io.gguf import GGUFFile, write_gguf
from .model import Transformer

GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
# llama.cpp's general.file_type values (LLAMA_FTYPE_*)
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama_ftype


def gguf_family_for(model: Transformer) -> GGUFFamily:
    reasons = []
    for family in GGUF_FAMILIES.values():
        reason = family.unsupported(model.config)
        if reason is None:
            return family
        reasons.append(f"{family.arch}: {reason}")
    raise UnsupportedError(
        "no GGUF architecture llamakin writes expresses this model (" + "; ".join(reasons) + ")."
    )


def tokenizer_metadata(source: str | Path | None) -> dict[str, Any]:
    """llama.cpp tokenizer keys for the tokenizer stored with ``source`` (empty if there is none)."""
    from .errors import CheckpointError
    from .tokenizer import load_tokenizer
    from .tokenizer.base import _SentencePiece

    if source is None:
        return {}
    source = Path(source)
    if source.suffix.lower() == ".gguf":
        return {k: v for k, v in GGUFFile(source).metadata.items() if k.startswith("tokenizer.")}
    directory = source if source.is_dir() else source.parent
    try:
        tok = load_tokenizer(directory)
    except CheckpointError:
        return {}  # no tokenizer there
    if isinstance(tok.backend, _SentencePiece):
        return _from_sentencepiece(tok.backend.sp)
    # a tokenizers backend: the directory's tokenizer.json, or one built from tiktoken ranks
    spec = json.loads(tok.backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        return {}
    # SentencePiece-style BPE: its tokenizer.model translates
    if spec["model"].get("byte_fallback"):
        model_file = directory / "tokenizer.model"
        return _from_sentencepiece(_SentencePiece(model_file).sp) if model_file.is_file() else {}
    return _from_byte_level_bpe(spec, tok, directory)


def _from_byte_level_bpe(spec: dict[str, Any], tok, directory: Path) -> dict[str, Any]:
    model = spec["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab.setdefault(content, token["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, i in vocab.items():
        tokens[i] = token
    types = [1] * size
    for content, token in added.items():
        types[token["id"]] = 3 if token.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(spec, directory),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    if tok.bos_token_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = tok.bos_token_id
    if tok.eos_token_ids:
        meta["tokenizer.ggml.eos_token_id"] = tok.eos_token_ids[0]
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _split_patterns(node: Any) -> list[str]:
    """Every Split regex in a tokenizer.json pre-tokenizer, in order."""
    if isinstance(node, dict):
        found = (
            [node["pattern"]["Regex"]]
            if node.get("type") == "Split" and "Regex" in node.get("pattern", {})
            else []
        )
        return found + [
            p for child in node.get("pretokenizers", []) for p in _split_patterns(child)
        ]
    return []


# llama.cpp pre-tokenizer names in the order they are preferred when several split the same way
_PRE_TOKENIZER_NAMES = (
    "gpt-2",
    "smollm",
    "llama-bpe",
    "qwen2",
    "smaug-bpe",
    "glm4",
    "falcon",
    "default",
)


def _pre_tokenizer_name(spec: dict[str, Any], directory: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE (a ``tokenizers`` JSON spec)."""
    from .tokenizer import GGUF_PRE_TOKENIZERS

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [
        (step.get("type"), step.get("individual_digits"), step.get("use_regex")) for step in steps
    ]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"  # GPT-2's regex inside ByteLevel
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"  # each digit alone, then GPT-2's regex
    if kinds[-1] == ("ByteLevel", None, False) and all(kind[0] == "Split" for kind in kinds[:-1]):
        # the splits must agree; among names with those splits, one that also takes whole-word
        # vocabulary entries the same way is preferred (Qwen's tiktoken ranks, merge-derived, have
        # no such twin and tokenize the same as llama.cpp's "qwen2": checked on the test texts)
        splits, ignore_merges = (
            tuple(_split_patterns(pre)),
            bool(spec["model"].get("ignore_merges")),
        )
        same_splits = [
            name for name in _PRE_TOKENIZER_NAMES if GGUF_PRE_TOKENIZERS[name].splits == splits
        ]
        same_splits.sort(key=lambda name: GGUF_PRE_TOKENIZERS[name].ignore_merges != ignore_merges)
        if same_splits:
            return same_splits[0]
    raise UnsupportedError(
        f"the pre-tokenizer of the tokenizer in {directory} ({json.dumps(pre)[:120]}) has no llama.cpp "
        "equivalent that splits text the same way, so llama.cpp would produce other token ids; "
        "export to a Hugging Face directory instead."
    )


def _from_sentencepiece(sp) -> dict[str, Any]:
    n = sp.GetPieceSize()
    types = [
        3 if sp.IsControl(i) else 2 if sp.IsUnknown(i) else 6 if sp.IsByte(i) else 1
        for i in range(n)
    ]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.GetScore(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
    }
    for key, value in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id())):
        if value >= 0:
            meta[f"tokenizer.ggml.{key}_token_id"] = value
    return meta


def save_gguf(
    model: Transformer,
    path: str | Path,
    quant: str = "F16",
    tokenizer_source: str | Path | None = None,
    name: str = "llamakin export",
) -> Path:
    """Write ``model`` as a GGUF file llama.cpp loads; matrices in ``quant`` (F32, F16, Q8_0, Q4_0 or
    Q4_1, quantized by the ``gguf`` package's reference quantizers)."""
    if quant not in GGUF_TYPES:
        raise UnsupportedError(
            f"GGUF type {quant!r} is not written by llamakin; use one of {', '.join(GGUF_TYPES)}."
        )
    family = gguf_family_for(model)
    meta = family.config_to_checkpoint(model.config)
    meta.pop(TENSOR_NAMES)
    arch = meta.pop("general.architecture")
    tok_meta = tokenizer_metadata(tokenizer_source)
    # the tokenizer's special ids win over the model config's (as in llama.cpp's converter)
    meta = {
        **meta,
        **tok_meta,
    }
    meta.setdefault(f"{arch}.vocab_size", model.config.vocab_size)
    meta["general.name"] = name
    meta["general.file_type"] = _FILE_TYPE[quant]
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for rule in family.tensor_rules(model.config):
        tensors.update(zip(rule.sources, rule.from_canonical(state[rule.canonical].detach())))
    types = {}
    for tensor_name, t in tensors.items():
        kind = quant if t.dim() == 2 else "F32"
        if kind.startswith("Q") and t.shape[-1] % 32:
            kind = "F16"  # Q8_0/Q4_0/Q4_1 pack rows in blocks of 32
        types[tensor_name] = kind
    write_gguf(Path(path), arch, [(k, v, _kind(v)) for k, v in meta.items()], tensors, types)
    return Path(path)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "u32"
    if isinstance(value, float):
        return "f32"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        first = value[0] if value else ""
        return (
            "str_array"
            if isinstance(first, str)
            else ("f32_array" if isinstance(first, float) else "i32_array")
        )
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")
