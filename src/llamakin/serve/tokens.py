"""``POST /tokenize`` and ``POST /detokenize`` in the shapes of llama.cpp's and vLLM's servers.

One endpoint takes either server's request, told apart by the field holding the text:

* llama.cpp (``tools/server/README.md``): ``{"content": TEXT, "add_special": false,
  "with_pieces": false}`` answers ``{"tokens": [...]}`` (with ``with_pieces``, each token is
  ``{"id", "piece"}``); ``{"tokens": [...]}`` to ``/detokenize`` answers ``{"content": TEXT}``.
* vLLM (``vllm/entrypoints/openai/protocol.py``): ``{"prompt": TEXT, "add_special_tokens": true,
  "return_token_strs": false}`` or ``{"messages": [...], "add_generation_prompt": true}`` (the
  chat template applied, as ``/v1/chat/completions`` would) answers ``{"count", "max_model_len",
  "tokens"}`` (and ``token_strs``); ``/detokenize`` answers ``{"prompt": TEXT}``.

Every answer carries both servers' fields (``tokens``, ``count``, ``max_model_len``; ``content`` and
``prompt``), so a client of either works unchanged. ``model`` is optional; when sent it must be the
served one. Bad input gets the same OpenAI-shaped 400 as the rest of the API.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Request as HTTPRequest
from pydantic import Field, model_validator

from ..chat_template import TemplateError
from ..errors import LlamakinError
from .schema import APIError, Message, StrictBool, StrictInt, StrictStr, _Strict, validated

MAX_DETOKENIZE_IDS = 1 << 20


class TokenizeRequest(_Strict):
    model: StrictStr | None = None
    content: StrictStr | None = None  # llama.cpp
    prompt: StrictStr | None = None  # vLLM, plain text
    messages: Annotated[list[Message], Field(min_length=1)] | None = None  # vLLM, a chat
    add_special: StrictBool | None = None  # llama.cpp's name (default false)
    add_special_tokens: StrictBool | None = (
        None  # vLLM's name (default true for a prompt, false for messages)
    )
    add_generation_prompt: StrictBool = True
    with_pieces: StrictBool = False
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_text(self):
        given = [
            name for name in ("content", "prompt", "messages") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "send exactly one of 'content' (llama.cpp), 'prompt' or 'messages' (vLLM), got "
                + (", ".join(repr(g) for g in given) or "none")
            )
        if (
            self.add_special is not None
            and self.add_special_tokens is not None
            and self.add_special != self.add_special_tokens
        ):
            raise ValueError("'add_special' and 'add_special_tokens' disagree; send one of them")
        return self

    def special_tokens(self) -> bool:
        if self.add_special is not None:
            return self.add_special
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        # llama.cpp: false; vLLM: true for a prompt, false for messages
        return self.prompt is not None


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: Annotated[list[StrictInt], Field(max_length=MAX_DETOKENIZE_IDS)]


def add_token_routes(app, engine, check_model) -> None:
    """Register ``/tokenize`` and ``/detokenize`` on ``app`` (``check_model`` refuses another model id)."""
    tokenizer = engine.tokenizer

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest):
        body = validated(await http.body(), TokenizeRequest)
        if body.model is not None:
            check_model(body.model)
        if body.messages is not None:
            messages = [m.for_template() for m in body.messages]
            try:
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=body.add_generation_prompt
                )
            except (TemplateError, LlamakinError) as e:
                raise APIError(400, str(e), param="messages") from None
        else:
            text = body.content if body.content is not None else body.prompt
        ids = tokenizer.encode(text, add_special_tokens=body.special_tokens())
        answer = {
            "tokens": [{"id": i, "piece": tokenizer.decode([i])} for i in ids]
            if body.with_pieces
            else ids,
            "count": len(ids),
            "max_model_len": engine.context,
        }
        if body.return_token_strs:
            answer["token_strs"] = [tokenizer.id_to_token(i) for i in ids]
        return answer

    @app.post("/detokenize")
    async def detokenize(http: HTTPRequest):
        body = validated(await http.body(), DetokenizeRequest)
        if body.model is not None:
            check_model(body.model)
        vocab = tokenizer.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"token id {bad} is not in this tokenizer's vocabulary [0, {vocab}); send ids that "
                "/tokenize produced.",
                param="tokens",
                code="invalid_value",
            )
        text = tokenizer.decode(body.tokens)
        return {"content": text, "prompt": text}


__all__ = ["DetokenizeRequest", "TokenizeRequest", "add_token_routes"]
