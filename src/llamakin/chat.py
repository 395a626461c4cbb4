"""A multi-turn chat over the model's own chat template, with history trimmed to the context."""

from __future__ import annotations

from typing import TextIO

from .errors import LlamakinError
from .generate import GenerationRun, GenerationStats, SamplingParams, encode_prompt
from .tokenizer import Tokenizer


class ChatSession:
    """The conversation so far and how to continue it.

    Before each reply the rendered conversation must leave ``max_new_tokens`` of room in the
    context; the oldest exchanges (never the system message) are dropped until it does.
    """

    def __init__(self, model, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def _fit(self) -> list[int]:
        budget = self.model.config.max_position_embeddings - self.params.max_new_tokens
        while True:
            ids = encode_prompt(self.tokenizer, self.system + self.turns)
            if len(ids) <= budget:
                return ids
            if len(self.turns) <= 1:
                self.turns = []
                raise LlamakinError(
                    f"this message needs {len(ids)} tokens but only {budget} fit in the context next to "
                    f"max_new_tokens={self.params.max_new_tokens}; shorten it or lower --max-new-tokens."
                )
            # drop the oldest exchange: a user message and the replies up to the next user message
            drop = 1
            while drop < len(self.turns) - 1 and self.turns[drop]["role"] != "user":
                drop += 1
            self.turns = self.turns[drop:]

    def reply(self, text: str, out: TextIO | None = None) -> GenerationStats:
        """Add a user message, stream the assistant's answer to ``out``, remember both."""
        self.turns.append({"role": "user", "content": text})
        ids = self._fit()
        run = GenerationRun(self.model, self.tokenizer, [ids], self.params)
        for _, piece in run:
            if out is not None:
                out.write(piece)
                out.flush()
        self.turns.append({"role": "assistant", "content": run.results[0].text})
        return run.stats
