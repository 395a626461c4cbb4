"""A multi-turn chat over the model's own chat template, with history trimmed to the context.

A conversation is saved and loaded as JSON in the OpenAI messages shape, the system message (if
any) first: ``{"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, ...]}``
(a bare list of messages loads too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from .errors import LlamakinError
from .generate import GenerationRun, GenerationStats, SamplingParams, encode_prompt
from .generation import PrefixCache
from .tokenizer import Tokenizer

DEFAULT_PREFIX_CACHE_BYTES = 256 << 20


class ChatSession:
    """The conversation so far and how to continue it.

    Before each reply the rendered conversation must leave ``max_new_tokens`` of room in the
    context; the oldest exchanges (never the system message) are dropped until it does.

    Each turn sends the whole conversation again; the keys/values of the previous turns are kept
    in a :class:`~llamakin.generation.PrefixCache` (``prefix_cache_bytes``, 0: off), so a turn
    computes only what is new: the tokens after the longest start it shares with what was computed.
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        params: SamplingParams,
        system: str | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.system: list[dict[str, str]] = []
        self.set_system(system)
        self.turns: list[dict[str, str]] = []
        self.stopped = False  # whether the last reply was interrupted (Ctrl-C)

    def reset(self) -> None:
        self.turns = []

    def set_system(self, text: str | None) -> None:
        """Use ``text`` as the system message from the next reply on (none if empty)."""
        self.system = [{"role": "system", "content": text}] if text else []

    @property
    def messages(self) -> list[dict[str, str]]:
        """The whole conversation, the system message first."""
        return self.system + self.turns

    def save(self, path: str | Path) -> None:
        try:
            Path(path).write_text(
                json.dumps({"messages": self.messages}, ensure_ascii=False, indent=1) + "\n",
                encoding="utf-8",
            )
        except OSError as e:
            raise LlamakinError(f"cannot write the conversation to {path}: {e.strerror}.") from None

    def load(self, path: str | Path) -> None:
        """Replace the conversation (and system message) with the one saved in ``path``."""
        messages = read_conversation(path)
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        self.set_system(system)
        self.turns = messages[1:] if system is not None else messages

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
        """Add a user message, stream the assistant's answer to ``out``, remember both.

        Ctrl-C (``KeyboardInterrupt``) stops the answer, not the caller: what was shown stays in
        the conversation and :attr:`stopped` is set; when nothing was shown yet, the user message
        is taken back too.
        """
        question = {"role": "user", "content": text}
        self.turns.append(question)
        self.stopped = False
        pieces: list[str] = []
        run = None
        try:
            ids = self._fit()
            run = GenerationRun(
                self.model, self.tokenizer, [ids], self.params, prefix_cache=self.prefix_cache
            )
            for _, piece in run:
                pieces.append(piece)
                if out is not None:
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            self.stopped = True
        except BaseException:
            self._take_back(question)
            raise
        if self.stopped and not pieces:
            self._take_back(question)
        else:
            self.turns.append({"role": "assistant", "content": "".join(pieces)})
        return run.stats if run is not None else GenerationStats()

    def _take_back(self, question: dict[str, str]) -> None:
        if self.turns and self.turns[-1] is question:  # (_fit may have emptied the history)
            self.turns.pop()


ROLES = ("system", "user", "assistant")


def read_conversation(path: str | Path) -> list[dict[str, str]]:
    """The messages saved in ``path`` (see the module doc), checked; a :class:`LlamakinError` naming
    what is wrong otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LlamakinError(f"cannot read {path}: {e.strerror}.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LlamakinError(
            f"{path} is not JSON ({e}); /load reads a file written by /save."
        ) from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise LlamakinError(
            f'{path} holds no conversation: expected {{"messages": [...]}} or a list of messages.'
        )
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and message.get("role") in ROLES
            and isinstance(message.get("content"), str)
        ):
            raise LlamakinError(
                f'{path}: message {index} is not {{"role": one of {", ".join(ROLES)}, '
                '"content": text}.'
            )
        if message["role"] == "system" and index > 0:
            raise LlamakinError(
                f"{path}: message {index} is a system message; only the first message may be one."
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]
