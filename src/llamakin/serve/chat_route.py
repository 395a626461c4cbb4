"""``POST /v1/chat/completions``: messages through the chat template (with tools and a response
format planned by :mod:`.structured`), streamed or whole, ``n`` choices, ``logprobs``."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from ..chat_template import TemplateError
from ..errors import LlamakinError
from ..lora.multi import with_adapter
from .gateway import Gateway, total_usage
from .logprobs import chat_logprobs, token_logprobs
from .schema import APIError, ChatRequest, parse_body, sampling_params
from .structured import plan_chat_output


def add_chat_route(app, gateway: Gateway) -> None:
    engine = gateway.engine

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        body = parse_body(await http.body(), ChatRequest)
        adapter = gateway.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
        if body.logprobs and body.stream:
            raise APIError(
                400,
                "logprobs are not streamed by this server; send the request without stream.",
                param="logprobs",
                code="unsupported_parameter",
            )
        messages = [m.for_template() for m in body.messages]
        output = await asyncio.to_thread(
            plan_chat_output, body, engine.tokenizer, engine.model.config.vocab_size
        )
        try:
            prompt = engine.tokenizer.apply_chat_template(messages, **output.template_kwargs)
        except (TemplateError, LlamakinError) as e:
            raise APIError(400, str(e), param="messages") from None
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise APIError(
                400,
                "the chat renders to no tokens at all; send a message with some text.",
                param="messages",
            )
        params = sampling_params(body, len(ids), engine.context, "messages")
        requests = gateway.submit(ids, params, body.n, output.logits_processor, adapter)
        base = {
            "id": f"chatcmpl-{requests[0].id}",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            return _stream(gateway, body, output, requests, base, len(ids))
        results = await gateway.collect_all(requests, http)
        choices = []
        for index, result in enumerate(results):
            logprobs = None
            if body.logprobs:
                scored = await asyncio.to_thread(
                    with_adapter,
                    engine.model,
                    adapter,
                    token_logprobs,
                    engine.model,
                    ids + result.token_ids,
                    len(ids),
                    body.top_logprobs or 0,
                )
                logprobs = chat_logprobs(engine.tokenizer, scored)
            message = output.message(result.text)
            finish = output.finish_reason(result.finish_reason, "tool_calls" in message)
            choices.append(
                {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
            )
        return {
            **base,
            "object": "chat.completion",
            "choices": choices,
            "usage": total_usage(len(ids), results),
        }


def _stream(gateway: Gateway, body, output, requests, base: dict, prompt_len: int):
    """The chunks of a streamed chat: per choice, content as it comes and tool calls whole."""
    deltas = [output.stream() for _ in requests]

    def event(index, delta, finish_reason=None):
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**base, "object": "chat.completion.chunk", "choices": [choice]}

    def chunk(text, index, role=False):
        if role:
            return event(index, {"role": "assistant", "content": ""})
        return [event(index, d) for d in deltas[index].feed(text)]

    def final(result, index, usage=None):
        if usage is not None:
            return {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        calls = deltas[index]
        return [event(index, d) for d in calls.finish()] + [
            event(index, {}, output.finish_reason(result.finish_reason, calls.calls > 0))
        ]

    include = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        gateway.sse(requests, chunk, final, include, prompt_len), media_type="text/event-stream"
    )
