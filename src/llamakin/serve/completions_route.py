"""``POST /v1/completions``: a text prompt, token ids, or a batch of token-id prompts; streamed or
whole, ``n`` choices, ``echo`` and ``logprobs`` (``max_tokens: 0`` with ``echo`` scores the prompt
itself, which is how lm-eval's ``local-completions`` model computes loglikelihoods)."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from ..generation import RowResult
from ..lora.multi import with_adapter
from .gateway import Gateway
from .logprobs import completions_logprobs, token_logprobs
from .schema import APIError, CompletionRequest, parse_body, sampling_params


def _check_token_ids(prompts: list[list[int]], vocab: int) -> None:
    if any(not 0 <= t < vocab for ids in prompts for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab}).", param="prompt")


def _check_max_tokens(body: CompletionRequest) -> None:
    if body.max_tokens == 0 and not body.echo:
        raise APIError(
            400,
            "max_tokens 0 generates nothing; it is only useful with echo (the prompt's logprobs).",
            param="max_tokens",
        )


def add_completion_route(app, gateway: Gateway) -> None:
    engine = gateway.engine

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse_body(await http.body(), CompletionRequest)
        adapter = gateway.check_model(body.model)
        prompt = (
            body.prompt[0]
            if isinstance(body.prompt, list) and isinstance(body.prompt[0], str)
            else body.prompt
        )
        if isinstance(prompt, list) and isinstance(prompt[0], list):  # a batch of token-id prompts
            if body.stream:
                raise APIError(
                    400,
                    "a batch of prompts cannot be streamed; send them one by one.",
                    param="prompt",
                )
            prompts = [list(p) for p in prompt]
            return await _whole(gateway, body, prompts, http, adapter=adapter)
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(
                    400, "the prompt is empty; send some text to continue.", param="prompt"
                )
            ids = engine.tokenizer.encode(prompt)
            if not ids:
                raise APIError(
                    400,
                    "the prompt encodes to no tokens; send some text to continue.",
                    param="prompt",
                )
        else:
            _check_token_ids([prompt], engine.model.config.vocab_size)
            ids = list(prompt)
        _check_max_tokens(body)
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(
                400,
                "echo and logprobs are not streamed by this server; send the request without stream.",
                param="echo" if body.echo else "logprobs",
                code="unsupported_parameter",
            )
        if not body.stream:
            text = prompt if isinstance(prompt, str) else None
            return await _whole(gateway, body, [ids], http, text=text, adapter=adapter)
        return _stream(gateway, body, ids, adapter)


def _stream(gateway: Gateway, body: CompletionRequest, ids: list[int], adapter: int):
    params = sampling_params(body, len(ids), gateway.engine.context, "prompt")
    requests = gateway.submit(ids, params, body.n, adapter=adapter)
    base = {
        "id": f"cmpl-{requests[0].id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }

    def choice(index, text, finish_reason=None):
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk(text, index, role=False):
        return None if role else {**base, "choices": [choice(index, text)]}

    def final(result, index, usage=None):
        if usage is not None:
            return {**base, "choices": [], "usage": usage}
        return {**base, "choices": [choice(index, "", result.finish_reason)]}

    include = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        gateway.sse(requests, chunk, final, include, len(ids)), media_type="text/event-stream"
    )


async def _whole(
    gateway: Gateway,
    body: CompletionRequest,
    prompts: list[list[int]],
    http: HTTPRequest,
    text: str | None = None,
    adapter: int = 0,
) -> dict:
    """Non-streamed completions of one or more prompts (one choice each, in order), with ``echo``
    and ``logprobs`` (``max_tokens: 0`` with ``echo``: the prompt's own token log-probabilities)."""
    engine = gateway.engine
    _check_token_ids(prompts, engine.model.config.vocab_size)
    _check_max_tokens(body)
    requests = []
    try:
        for ids in [] if body.max_tokens == 0 else prompts:
            params = sampling_params(body, len(ids), engine.context, "prompt")
            requests += gateway.submit(ids, params, body.n, adapter=adapter)
        results = [await gateway.collect(r, http) for r in requests] or [
            RowResult(finish_reason="length") for _ in prompts for _ in range(body.n)
        ]
    except BaseException:
        for r in requests:  # a rejected or abandoned batch frees the rows it already holds
            r.cancelled.set()
        raise
    rid = f"cmpl-{requests[0].id if requests else uuid.uuid4().hex[:24]}"
    choices, prompt_tokens, completion_tokens = [], 0, 0
    # choice p * n + j: sample j of prompt p (OpenAI's order)
    for index, result in enumerate(results):
        ids = prompts[index // body.n]
        prompt_text = text if text is not None else engine.tokenizer.decode(ids)
        logprobs = None
        if body.logprobs is not None:
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            generated = engine.tokenizer.decode(result.token_ids)
            by_eos = (
                requests
                and result.finish_reason == "stop"
                and not any(s in generated for s in stops)
            )
            scored = await asyncio.to_thread(
                with_adapter,
                engine.model,
                adapter,
                token_logprobs,
                engine.model,
                ids + result.token_ids,
                0 if body.echo else len(ids),
                body.logprobs,
                engine.tokenizer.eos_token_ids if by_eos else (),
            )
            logprobs = completions_logprobs(engine.tokenizer, scored)
        choices.append(
            {
                "index": index,
                "text": (prompt_text if body.echo else "") + result.text,
                "logprobs": logprobs,
                "finish_reason": result.finish_reason,
            }
        )
        prompt_tokens += len(ids) if index % body.n == 0 else 0
        completion_tokens += len(result.token_ids)
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
