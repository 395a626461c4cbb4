"""Server throughput and time-to-first-token with 1, 4 and 16 concurrent streaming clients, and
multi-turn time to first token with and without prefix caching.

Starts ``llamakin serve`` (the default model unless --model) in a subprocess, then runs each
concurrency level from this process with asyncio + httpx: every client sends --requests
streaming chat completions back to back. Reported per level: total generated tokens/s (from the
``usage`` chunks), and time to first token, median and p95.

Multi-turn (``--turns 5``, 0 to skip): one client holds --conversations conversations of --turns
turns each (a system prompt, then user questions; every turn sends the whole conversation, as chat
clients do) against a server with ``--prefix-cache-mb 256`` and one with ``--prefix-cache-mb 0``,
and reports the median time to first token of the last turn for each: what the prefix cache saves
is the prefill of every earlier turn. Greedy, so both servers generate the same conversation.

    .venv/bin/python benchmarks/bench_server.py [--levels 1 4 16] [--max-tokens 64] [--max-batch 16] [--turns 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx

from llamakin.hardware import describe_cpu
from server_client import TOPICS, percentile, served_model, start_server, stream_chat

SYSTEM = (
    "You are a patient and knowledgeable assistant. Answer every question in a few clear sentences, "
    "give an example where one helps, and keep to the facts you are sure of."
)
QUESTIONS = [
    "What is {topic}?",
    "Why does it matter?",
    "Give me an example.",
    "What could go wrong?",
    "Summarise what we said.",
    "What should I read next?",
    "Any last advice?",
]


async def one_request(client: httpx.AsyncClient, url: str, model: str, topic: str, max_tokens: int):
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": hash(topic) % 1000,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
    }
    result = await stream_chat(client, url, body)
    return result.completion_tokens, result.ttft


async def level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker(i):
            results = []
            for r in range(requests):
                results.append(
                    await one_request(client, url, model, TOPICS[(i + r) % len(TOPICS)], max_tokens)
                )
            return results

        start = time.perf_counter()
        done = await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - start
    flat = [x for results in done for x in results]
    ttft = [t for _, t in flat]
    return {
        "clients": clients,
        "requests": len(flat),
        "tokens": sum(n for n, _ in flat),
        "tokens_per_s": round(sum(n for n, _ in flat) / wall, 1),
        "ttft_median_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(percentile(ttft, 0.95), 3),
    }


async def conversation(url: str, model: str, topic: str, turns: int, max_tokens: int) -> float:
    """Hold one conversation of ``turns`` turns; the time to first token of the last one."""
    messages = [{"role": "system", "content": SYSTEM}]
    last = 0.0
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in range(turns):
            messages.append(
                {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)].format(topic=topic)}
            )
            body = {
                "model": model,
                "stream": True,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": messages,
            }
            result = await stream_chat(client, url, body)
            last = result.ttft
            messages.append({"role": "assistant", "content": result.text})
    return last


def start(args, extra: list[str]):
    return start_server(["--max-batch", str(args.max_batch), *extra], args.model)


def multi_turn(args) -> None:
    results = {}
    for label, megabytes in (("with prefix cache", 256), ("without", 0)):
        server, url = start(args, ["--prefix-cache-mb", str(megabytes)])
        try:
            model = served_model(url)
            asyncio.run(level(url, model, 1, 1, 8))  # warm-up (traces the decode step)
            times = [
                asyncio.run(
                    conversation(url, model, TOPICS[i % len(TOPICS)], args.turns, args.turn_tokens)
                )
                for i in range(args.conversations)
            ]
            health = httpx.get(url + "/health").json()
        finally:
            server.terminate()
            server.wait(timeout=30)
        results[label] = statistics.median(times)
        print(
            json.dumps(
                {
                    "server": label,
                    f"ttft_turn_{args.turns}_s": [round(t, 3) for t in times],
                    "median_s": round(results[label], 3),
                    "prefix_cache": health.get("prefix_cache"),
                }
            ),
            flush=True,
        )
    cached, plain = results["with prefix cache"], results["without"]
    print(
        f"\n| time to first token of turn {args.turns} (median of {args.conversations}) | seconds |\n|---|---|"
    )
    print(
        f"| with prefix cache | {cached:.3f} |\n| without | {plain:.3f} |\n| speed-up | {plain / cached:.1f}x |"
    )
    print(f"(load average after: {os.getloadavg()})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint or catalog name (default: the default model)")
    parser.add_argument(
        "--levels", type=int, nargs="*", default=[1, 4, 16], help="client counts (none: skip)"
    )
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--turns", type=int, default=5, help="multi-turn: turns per conversation (0: skip)"
    )
    parser.add_argument(
        "--conversations", type=int, default=5, help="multi-turn: conversations per server"
    )
    parser.add_argument(
        "--turn-tokens", type=int, default=48, help="multi-turn: max_tokens of each answer"
    )
    args = parser.parse_args()
    print("CPU:", describe_cpu(), flush=True)
    if args.levels:
        throughput(args)
    if args.turns:
        multi_turn(args)


def throughput(args) -> None:
    server, url = start(args, [])
    try:
        model = served_model(url)
        asyncio.run(level(url, model, 1, 1, 8))  # warm-up (traces the decode step)
        rows = []
        for clients in args.levels:
            rows.append(asyncio.run(level(url, model, clients, args.requests, args.max_tokens)))
            print(json.dumps(rows[-1]), flush=True)
        base = rows[0]["tokens_per_s"]
        print(
            "\n| concurrent clients | generated tok/s | vs 1 client | TTFT median (s) | TTFT p95 (s) |\n|---|---|---|---|---|"
        )
        for r in rows:
            print(
                f"| {r['clients']} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.1f}x | {r['ttft_median_s']} | {r['ttft_p95_s']} |"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
