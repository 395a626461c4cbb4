"""One row of a batch: what it generates and where it stands.

A :class:`Row` is the unit every user of the core works with: :class:`~llamakin.generate.GenerationRun`
makes one per prompt, the server one per request and sample (``n``). Hooks that differ per row
live here, so a batch can mix them: ``sampler.processors`` (per-row logits processors, e.g. an
allowed-token mask for constrained decoding) and ``adapter`` (an id for per-row LoRA adapters:
the prefix cache keeps separate entries per adapter, since keys/values depend on the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .params import SamplingParams
from .sampling import RowSampler
from .text import TextStream


@dataclass
class RowResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


class LinearPosition:
    """The next position id of a row that counts its real tokens."""

    def __init__(self, next_position: int):
        self.next_position = next_position

    def take(self) -> list:
        """This step's position (``[p]``, one row of a ``[B, 1]`` tensor), and move on."""
        self.next_position += 1
        return [self.next_position - 1]


class PrefixLMPosition:
    """ChatGLM-6B's 2-D decode position (docs/variants.md §6.1): the mask token's position, and a
    block position counting from 1 at ``<sop>``."""

    def __init__(self, mask_position: int, ctx: int, length: int):
        self.mask_position, self.ctx, self.length = mask_position, ctx, length

    def take(self) -> list:
        """``[[position], [block position]]``, one row of a ``[B, 2, 1]`` tensor."""
        block = self.length - self.ctx + 1  # the token at index ctx (<sop>) has block position 1
        self.length += 1
        return [[self.mask_position], [block]]


@dataclass
class Row:
    """A prompt being continued. The batch fills in the cache fields when the row is admitted."""

    prompt: list[int]
    params: SamplingParams
    sampler: RowSampler
    stream: TextStream
    result: RowResult = field(default_factory=RowResult)
    on_text: Callable[[str], None] | None = None  # every text piece, as soon as it is safe to show
    on_token: Callable[[int, bool], None] | None = (
        None  # every sampled token, and whether it was kept
    )
    cancelled: Callable[[], bool] = lambda: False  # polled between steps: a True frees the row
    adapter: Any = None  # per-row adapter id (None: the model's own weights); keys the prefix cache
    owner: Any = None  # the caller's object for this row (the server's Request)
    # -- cache state, kept by the batch
    length: int = 0  # cache slots filled (left padding included)
    pad: int = 0  # slots of left padding before the prompt
    # generated tokens whose keys/values are in the cache
    fed: list[int] = field(default_factory=list)
    position: LinearPosition | PrefixLMPosition | None = None
    last_token: int = -1
    reused: int = 0  # prompt tokens whose keys/values came from the prefix cache
    error: BaseException | None = None  # this row failed; it is retired, the others go on

    @property
    def done(self) -> bool:
        return self.result.finish_reason is not None or self.error is not None

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys/values fill slots ``pad .. length - 1``."""
        return self.prompt + self.fed

    def accept(self, token: int, eos: set[int]) -> None:
        """Take the sampled ``token``: end the row on EOS, else add it to the text (streaming what
        is safe to show) and end it on a stop string or ``max_new_tokens``."""
        self.last_token = token
        result = self.result
        kept = token not in eos
        if self.on_token is not None:
            self.on_token(token, kept)
        if not kept:
            result.finish_reason = "stop"
            return
        result.token_ids.append(token)
        self._emit(self.stream.push(token))
        if self.stream.stopped:
            result.finish_reason = "stop"
        elif len(result.token_ids) >= self.params.max_new_tokens:
            result.finish_reason = "length"

    def finish(self) -> None:
        """Hand out the text held back at the end (stop-string candidates, an incomplete character)."""
        self._emit(self.stream.finish())

    def _emit(self, piece: str) -> None:
        if piece:
            self.result.text += piece
            if self.on_text is not None:
                self.on_text(piece)
