"""Streaming detokenization with stop strings, one row at a time."""

from __future__ import annotations

from typing import Sequence

from ..tokenizer import Tokenizer


class TextStream:
    """Turns one row's token ids into text pieces that are safe to show.

    * Incremental detokenization: a piece is emitted only once it no longer ends in an
      incomplete UTF-8 sequence (the tokenizer shows those as U+FFFD); decoding always includes a
      few previous tokens so tokenizers that strip a leading space get spacing right.
    * Stop strings: text that could still become the start of a stop string is held back, and
      when one completes, everything from it on is dropped.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded so far (before stop handling)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode_new(self) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) < len(prefix):
            return ""  # an incomplete multi-byte character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text += self._decode_new()
        return self._release(final=False)

    def finish(self) -> str:
        """Everything still held back (at the end of generation)."""
        if not self.stopped and self.read_offset < len(self.ids):
            tail = self.tokenizer.decode(self.ids[self.prefix_offset :])
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += tail[len(prefix) :]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            window_start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
        end = len(self.text)
        if self.stop and not self.stopped and not final:
            end -= self._held_back()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
