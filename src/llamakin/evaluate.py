"""How good is a model: perplexity of text, and the token scoring the evaluation harness uses.

Two perplexity protocols (``llamakin eval perplexity --protocol ...``):

* ``sliding`` (default): Hugging Face's strided sliding window
  (https://huggingface.co/docs/transformers/perplexity). Windows of ``context`` tokens start
  every ``stride`` tokens; each window scores only the tokens the previous window did not reach,
  so every token after the first is scored exactly once, with up to ``context - 1`` tokens of
  history (at least ``context - stride``). With ``stride == context`` the windows are disjoint and,
  as in that recipe, each window's first token is not scored (it has no history in its window).
* ``llama.cpp``: ``llama-perplexity``'s method, re-implemented from ``tools/perplexity/perplexity.cpp``
  (function ``perplexity``, llama.cpp as vendored in llama-cpp-python 0.3.36): the whole text is
  tokenized once (less one trailing newline, as ``-f`` reads a file) with the model's own special-token rule (BOS if the vocabulary adds one;
  special-token text in the file is *not* parsed as special tokens); it is cut into
  ``len // context`` disjoint chunks (at least two are required); the first token of each chunk
  is replaced by BOS when the vocabulary adds BOS; only the second half of each chunk is scored
  (the logits at positions ``context/2 .. context-2`` predicting the next token, so
  ``context - 1 - context/2`` tokens per chunk). Its numbers compare directly with
  ``llama-perplexity -c CONTEXT``.

Both report llama.cpp's standard error: with ``x`` the per-token negative log-likelihoods,
``ppl * sqrt((mean(x^2) - mean(x)^2) / (n - 1))`` (the delta method on ``exp(mean(x))``).

Speed: windows are batched (``batch_size`` rows per forward pass, right-padded, which a causal
model never looks at), the model runs its ordinary prefill path (SDPA with ``is_causal``), and the
output projection, the largest single matrix of a small model, is applied only to the positions
that are scored (half of each chunk under the llama.cpp protocol), in slices of
:data:`HEAD_ROWS` positions so ``[positions, vocab]`` logits never all exist at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence

import torch

from .errors import LlamakinError
from .tokenizer import Tokenizer

PROTOCOLS = ("sliding", "llama.cpp")
HEAD_ROWS = 512  # positions whose logits are computed at once ([512, 49152] float32 = 96 MiB)


@dataclass(frozen=True)
class Window:
    """A token sequence; the tokens ``ids[score_from + 1:]`` are scored, each predicted from the logits
    one position earlier (so ``ids[:-1]`` is what runs through the model)."""

    ids: list[int]
    score_from: int


@dataclass
class Scores:
    """Per-token log-probabilities of one window's scored tokens, and whether each was the argmax."""

    logprobs: torch.Tensor  # float32 [n]
    greedy: torch.Tensor | None  # bool [n]; None unless asked for (``score_windows(greedy=True)``)


@torch.inference_mode()
def score_windows(
    model,
    windows: Sequence[Window],
    batch_size: int = 8,
    pad_id: int = 0,
    progress=None,
    greedy: bool = True,
) -> Iterator[tuple[int, Scores]]:
    """Log-probabilities of each window's scored tokens: ``(index into windows, Scores)``, and with
    ``greedy`` whether each token is the argmax (a perplexity does not need it: one pass less over
    the ``[positions, vocab]`` logits).

    Windows run ``batch_size`` at a time, longest first (less padding), right-padded with
    ``pad_id``: with causal attention the padding after a row's last token changes none of its
    logits. ``progress`` (a tqdm bar or None) advances by one per window.
    """
    if batch_size < 1:
        raise LlamakinError(f"the batch size must be at least 1, got {batch_size}.")
    if model.config.prefix_lm:
        raise LlamakinError(
            "scoring text needs a causal model; prefix-LM models (ChatGLM-6B) attend to the "
            "whole prompt in both directions, so their token probabilities are not a perplexity."
        )
    context = model.config.max_position_embeddings
    for w in windows:
        if not 0 <= w.score_from < len(w.ids) - 1:
            raise LlamakinError(
                f"a window of {len(w.ids)} tokens cannot score from position {w.score_from}."
            )
        if len(w.ids) - 1 > context:
            raise LlamakinError(
                f"a window of {len(w.ids) - 1} input tokens is longer than the model's context of "
                f"{context}; use a smaller context."
            )
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    device = model.device
    for start in range(0, len(order), batch_size):
        rows = [windows[i] for i in order[start : start + batch_size]]
        longest = len(rows[0].ids) - 1
        width = _padded_width(model, longest)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, w in enumerate(rows):
            ids[r, : len(w.ids) - 1] = torch.tensor(w.ids[:-1])
        hidden = model(ids.to(device), hidden_only=True)
        # the positions whose logits predict a scored token, all rows together
        picked = torch.cat([hidden[r, w.score_from : len(w.ids) - 1] for r, w in enumerate(rows)])
        targets = torch.tensor([t for w in rows for t in w.ids[w.score_from + 1 :]], device=device)
        logprobs, is_argmax = _target_logprobs(model, picked, targets, greedy)
        offset = 0
        for r, w in enumerate(rows):
            n = len(w.ids) - 1 - w.score_from
            yield (
                order[start + r],
                Scores(
                    logprobs[offset : offset + n],
                    None if is_argmax is None else is_argmax[offset : offset + n],
                ),
            )
            offset += n
            if progress is not None:
                progress.update(1)


PAD_MULTIPLE = 8  # long batches are right-padded to a multiple of this many positions
PAD_FROM = 256  # ... from this length (at most 2.7% more positions)


def _padded_width(model, longest: int) -> int:
    """The batch's width: ``longest`` positions, rounded up to a multiple of :data:`PAD_MULTIPLE`
    from :data:`PAD_FROM` positions when the model allows it. PyTorch's CPU kernels are slower
    on odd lengths: a forward pass of SmolLM2-135M over 4 x 512 positions took 2.708 s against
    2.786 s for 4 x 511, the width a 512-token perplexity chunk runs (float32, a 2-core AVX-512
    EPYC, medians of 10 alternating). Right-padding changes no logit of a causal model, unless
    its RoPE depends on the sequence's length (dynamic NTK), which keeps the exact width."""
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    if (
        longest < PAD_FROM
        or width > model.config.max_position_embeddings
        or model.config.rope_scaling.type == "dynamic"
    ):
        return longest
    return width


def _target_logprobs(
    model, hidden: torch.Tensor, targets: torch.Tensor, greedy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(head(hidden))[target]`` in float32, and (with ``greedy``) whether the target is
    the argmax.

    ``-cross_entropy(reduction="none")`` is that log-probability through torch's fused log-softmax
    kernel: the same value as ``logits[target] - logsumexp(logits)`` (within float32 rounding) in
    fewer passes over the logits (measured on this 2-core CPU, 1,022 positions x 49,152: 0.5 s of
    the 1.9 s spent beyond the head's product)."""
    logprobs, is_argmax = [], []
    for s in range(0, hidden.shape[0], HEAD_ROWS):
        logits = model.head(hidden[s : s + HEAD_ROWS]).float()
        target = targets[s : s + HEAD_ROWS]
        logprobs.append(-torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        if greedy:
            is_argmax.append(logits.argmax(-1) == target)
    return torch.cat(logprobs).cpu(), torch.cat(is_argmax).cpu() if greedy else None


# -- perplexity ------------------------------------------------------------------------------------
@dataclass
class PerplexityResult:
    """``perplexity`` ± ``stderr`` over ``tokens`` scored tokens; ``tokens_per_second`` counts every
    token run through the model (as llama.cpp's prompt-evaluation rate does)."""

    perplexity: float
    stderr: float
    nll: float  # mean negative log-likelihood, nats per scored token
    tokens: int  # tokens scored
    tokens_evaluated: int  # tokens run through the model (each window less its last token)
    windows: int
    seconds: float
    protocol: str
    context: int
    stride: int | None
    text_tokens: int  # tokens of the text(s) read: with max_chunks, the prefix the chunks need

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_evaluated / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 2)}


def llama_cpp_tokenize(tokenizer: Tokenizer, text: str) -> list[int]:
    """``common_tokenize(ctx, text, add_special=true, parse_special=false)``: the vocabulary's own BOS
    rule, and special-token text in ``text`` encoded as ordinary text."""
    backend = tokenizer.backend
    # `tokenizers`: added special tokens are not matched
    if hasattr(backend, "encode_special_tokens"):
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return tokenizer.encode(text)
        finally:
            backend.encode_special_tokens = before
    return tokenizer.encode(text)  # SentencePiece never parses control tokens out of text


def adds_bos(tokenizer: Tokenizer) -> bool:
    """Whether encoding text prepends BOS (llama.cpp's ``llama_vocab_get_add_bos``), whichever part of
    the tokenizer does it (llamakin's flag or a tokenizer.json post-processor)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


PREFIX_MARGIN = 64  # tokens beyond what is needed before a prefix's tokens are trusted


def encode_prefix(encode, text: str, needed: int | None) -> list[int]:
    """The first ``needed`` tokens of ``encode(text)`` (all of them when ``needed`` is None or the
    text is shorter), tokenizing only as much of the text as that takes.

    ``--max-chunks 4`` on a 5 MB corpus would otherwise spend most of its time tokenizing text it
    never scores. The text is cut at a line end (tokenizers do not merge across a newline) far
    enough out that ``PREFIX_MARGIN`` tokens more than needed come back, doubling until they do,
    so only tokens well before the cut are kept: the same ids as tokenizing the whole text.
    """
    chars = max(4096, 8 * (needed or 0))
    while needed is not None and chars < len(text):
        cut = text.rfind("\n", 0, chars) + 1
        if cut > 0:
            ids = encode(text[:cut])
            if len(ids) >= needed + PREFIX_MARGIN:
                return ids[:needed]
        chars *= 2
    ids = encode(text)
    return ids if needed is None else ids[:needed]


def sliding_windows(ids: list[int], context: int, stride: int) -> list[Window]:
    """Hugging Face's strided windows: each token after the first scored once, with the history the
    window gives it."""
    windows, previous_end, begin = [], 0, 0
    while True:
        end = min(begin + context, len(ids))
        # window-relative index of the first scored token
        first_target = max(previous_end - begin, 1)
        if end - begin >= 2 and first_target < end - begin:
            windows.append(Window(ids[begin:end], first_target - 1))
        previous_end = end
        if end == len(ids):
            return windows
        begin += stride


def llama_cpp_chunks(
    ids: list[int], context: int, bos_id: int | None, max_chunks: int | None
) -> list[Window]:
    """``llama-perplexity``'s chunks: disjoint, BOS over each chunk's first token when the vocabulary
    adds BOS, the second half scored."""
    count = len(ids) // context
    if max_chunks is not None:
        count = min(count, max_chunks)
    chunks = []
    for i in range(count):
        chunk = ids[i * context : (i + 1) * context]
        if bos_id is not None:
            chunk = [bos_id] + chunk[1:]
        chunks.append(Window(chunk, context // 2))
    return chunks


def perplexity(
    model,
    tokenizer: Tokenizer,
    text: str | Sequence[str],
    *,
    context: int = 512,
    stride: int | None = None,
    protocol: str = "sliding",
    max_chunks: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``text`` (one string, or several documents whose windows never mix).

    ``stride`` (sliding protocol): tokens between window starts, default ``context // 2``.
    ``max_chunks`` caps the windows per document (llama.cpp's ``--chunks``).
    """
    from tqdm.auto import tqdm

    if protocol not in PROTOCOLS:
        raise LlamakinError(
            f"unknown perplexity protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}."
        )
    limit = model.config.max_position_embeddings
    if not 2 <= context <= limit:
        raise LlamakinError(
            f"the context must be between 2 and the model's {limit} tokens, got {context}."
        )
    if protocol == "llama.cpp" and stride is not None:
        raise LlamakinError(
            "--stride applies to the sliding protocol; llama.cpp's chunks do not overlap."
        )
    stride = context // 2 if stride is None and protocol == "sliding" else stride
    if stride is not None and not 1 <= stride <= context:
        raise LlamakinError(
            f"the stride must be between 1 and the context ({context}), got {stride}."
        )
    if max_chunks is not None and max_chunks < 1:
        raise LlamakinError(f"--max-chunks must be at least 1, got {max_chunks}.")
    documents = [text] if isinstance(text, str) else list(text)
    windows: list[Window] = []
    text_tokens = 0
    for n, doc in enumerate(documents):
        if protocol == "llama.cpp":
            # `-f FILE` drops one trailing newline (common/arg.cpp)
            needed = None if max_chunks is None else max(max_chunks, 2) * context
            ids = encode_prefix(
                lambda t: llama_cpp_tokenize(tokenizer, t),
                doc[:-1] if doc.endswith("\n") else doc,
                needed,
            )
            if len(ids) < 2 * context:
                raise LlamakinError(
                    f"the llama.cpp protocol needs at least {2 * context} tokens for a context of "
                    f"{context}, but text {n + 1} has only {len(ids)}; give more text or a smaller "
                    "--context."
                )
            bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
            windows += llama_cpp_chunks(ids, context, bos, max_chunks)
        else:
            needed = None if max_chunks is None else (max_chunks - 1) * stride + context
            ids = encode_prefix(tokenizer.encode, doc, needed)
            if len(ids) < 2:
                raise LlamakinError(
                    f"text {n + 1} has {len(ids)} token(s); perplexity needs at least two."
                )
            doc_windows = sliding_windows(ids, context, stride)
            windows += doc_windows[:max_chunks] if max_chunks is not None else doc_windows
        text_tokens += len(ids)
    pad = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
    total = total_sq = 0.0
    count = 0
    bar = tqdm(
        total=len(windows), desc=f"perplexity ({protocol})", unit="window", disable=not progress
    )
    start = time.perf_counter()
    for _, scores in score_windows(model, windows, batch_size, pad, progress=bar, greedy=False):
        nll = -scores.logprobs.double()
        total += nll.sum().item()
        total_sq += (nll * nll).sum().item()
        count += nll.numel()
        bar.set_postfix(ppl=f"{math.exp(total / count):.4f}")
    seconds = time.perf_counter() - start
    bar.close()
    mean = total / count
    ppl = math.exp(mean)
    variance = total_sq / count - mean * mean
    stderr = ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else float("nan")
    return PerplexityResult(
        perplexity=ppl,
        stderr=stderr,
        nll=mean,
        tokens=count,
        tokens_evaluated=sum(len(w.ids) - 1 for w in windows),
        windows=len(windows),
        seconds=seconds,
        protocol=protocol,
        context=context,
        stride=stride,
        text_tokens=text_tokens,
    )


def read_texts(paths: Iterable[str]) -> list[str]:
    """The files' texts (UTF-8; undecodable bytes replaced), as ``llama-perplexity -f`` reads a file."""
    from pathlib import Path

    texts = []
    for spec in paths:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LlamakinError(f"{spec} is not a file; give a text file to evaluate on.")
        texts.append(path.read_bytes().decode("utf-8", errors="replace"))
    if not texts:
        raise LlamakinError("no text to evaluate; give one or more --file TEXT.")
    return texts
