"""Soak test of ``llamakin serve``: many concurrent streaming clients for a while, then a sweep of
every batch size and prompt length; errors, 429s, throughput, latency and the server's RSS.

1. Soak: --clients streaming chat completions (64 by default) for --seconds (60), each client
   sending requests back to back; a 429 waits its ``Retry-After`` and counts. Reported:
   completed requests, errors (anything but a finished stream or a 429), 429s, generated tok/s,
   request latency and time to first token (p50/p95), RSS at start, middle and end.
2. Sweep: for every batch size 1..--max-batch and a prompt length in every 256-slot cache bucket
   up to --context, one request with a prompt of that many tokens plus (batch - 1) short ones,
   all at once, so the engine decodes that (batch, cache length) shape: each shape it has not
   seen needs a decode trace. The sweep runs twice; RSS after each combination. With the trace
   cache bounded, the second pass (every shape seen before) stays flat.

The server is a subprocess (the default model unless --model); its RSS is read from /proc.

    .venv/bin/python benchmarks/bench_soak.py [--clients 64] [--seconds 60] [--max-batch 8] [--context 2048]
        [--quantize none]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import httpx

from llamakin.hardware import describe_cpu
from server_client import TOPICS, percentile, rss_mb, served_model, start_server, stream_chat


async def soak(
    url: str, model: str, clients: int, seconds: float, max_tokens: int, pid: int
) -> dict:
    stats = {
        "requests": 0,
        "errors": 0,
        "http_429": 0,
        "tokens": 0,
        "latency": [],
        "ttft": [],
        "first_error": None,
    }
    rss = {"start": rss_mb(pid)}
    deadline = time.perf_counter() + seconds

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            body = {
                "model": model,
                "stream": True,
                "max_tokens": max_tokens,
                "temperature": 0.7,
                "seed": i * 1000 + n,
                "stream_options": {"include_usage": True},
                "messages": [
                    {
                        "role": "user",
                        "content": f"Write a story about {TOPICS[(i + n) % len(TOPICS)]}.",
                    }
                ],
            }
            try:
                result = await stream_chat(client, url, body)
                if result.status == 429:
                    stats["http_429"] += 1
                    await asyncio.sleep(result.retry_after)
                    continue
                stats["requests"] += 1
                stats["tokens"] += result.completion_tokens
                stats["latency"].append(result.seconds)
                stats["ttft"].append(result.ttft)
            except Exception as e:  # noqa: BLE001 - counted and reported
                stats["errors"] += 1
                stats["first_error"] = stats["first_error"] or f"{type(e).__name__}: {e}"

    async def sample_middle() -> None:
        await asyncio.sleep(seconds / 2)
        rss["middle"] = rss_mb(pid)

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(sample_middle(), *(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - start
    rss["end"] = rss_mb(pid)
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": stats["requests"],
        "errors": stats["errors"],
        "http_429": stats["http_429"],
        "generated_tokens": stats["tokens"],
        "tokens_per_s": round(stats["tokens"] / wall, 1),
        "latency_p50_s": round(percentile(stats["latency"], 0.5), 2),
        "latency_p95_s": round(percentile(stats["latency"], 0.95), 2),
        "ttft_p50_s": round(percentile(stats["ttft"], 0.5), 2),
        "ttft_p95_s": round(percentile(stats["ttft"], 0.95), 2),
        "rss_mb": {k: round(v) for k, v in rss.items()},
        "first_error": stats["first_error"],
    }


async def sweep_one(
    client: httpx.AsyncClient, url: str, model: str, batch: int, length: int
) -> list[int]:
    """One prompt of ``length`` token ids plus ``batch - 1`` short ones, sent together."""

    def body(n: int, salt: int) -> dict:
        return {
            "model": model,
            "prompt": [100 + (salt * 31 + j * 7) % 5000 for j in range(n)],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        }

    bodies = [body(length, 0)] + [body(8, s) for s in range(1, batch)]
    responses = await asyncio.gather(
        *(client.post(url + "/v1/completions", json=b) for b in bodies)
    )
    return [r.status_code for r in responses]


async def sweep(
    url: str, model: str, batches: list[int], lengths: list[int], pid: int, passes: int
) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(1200)) as client:
        for p in range(1, passes + 1):
            for length in lengths:
                for batch in batches:
                    start = time.perf_counter()
                    statuses = await sweep_one(client, url, model, batch, length)
                    rows.append(
                        {
                            "pass": p,
                            "batch": batch,
                            "prompt_tokens": length,
                            "seconds": round(time.perf_counter() - start, 2),
                            "rss_mb": round(rss_mb(pid)),
                            "non_200": sum(s != 200 for s in statuses),
                        }
                    )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint or catalog name (default: the default model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--passes", type=int, default=2, help="sweep passes (0: no sweep)")
    parser.add_argument(
        "--batches", type=int, nargs="+", help="sweep batch sizes (default 1..--max-batch)"
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help="sweep prompt lengths (default: one in every 256-slot cache bucket up to --context)",
    )
    parser.add_argument("--trace-cache", type=int, help="LLAMAKIN_TRACE_CACHE for the server")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["auto", "none", "int8", "int4"],
        help="the server's --quantize (default none: float32 weights, as the README's numbers; "
        "serve itself defaults to auto)",
    )
    args = parser.parse_args()
    print(
        f"CPU: {describe_cpu()} (a shared machine's timings are noisy)",
        flush=True,
    )
    options = ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    options += ["--context", str(args.context), "--quantize", args.quantize]
    environment = dict(os.environ)
    if args.trace_cache is not None:
        environment["LLAMAKIN_TRACE_CACHE"] = str(args.trace_cache)
    server, url = start_server(options, args.model, env=environment, wait_s=1200)
    try:
        model = served_model(url)
        print(
            f"server up (--quantize {args.quantize}), RSS {rss_mb(server.pid):.0f} MB", flush=True
        )
        result = asyncio.run(
            soak(url, model, args.clients, args.seconds, args.max_tokens, server.pid)
        )
        result["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
        print("SOAK " + json.dumps(result), flush=True)
        if args.passes:
            buckets = range(256, args.context + 1, 256)
            lengths = args.lengths or [max(8, b - 64) for b in buckets]
            batches = args.batches or list(range(1, args.max_batch + 1))
            rows = asyncio.run(sweep(url, model, batches, lengths, server.pid, args.passes))
            first = [r["rss_mb"] for r in rows if r["pass"] == 1]
            later = [r["rss_mb"] for r in rows if r["pass"] > 1]
            summary = {
                "combinations": len(rows),
                "non_200": sum(r["non_200"] for r in rows),
                "rss_mb_pass1_first": first[0],
                "rss_mb_pass1_max": max(first),
                "rss_mb_later_passes_min": min(later, default=None),
                "rss_mb_later_passes_max": max(later, default=None),
                "health": httpx.get(url + "/health").json(),
                "load_average_after": os.getloadavg(),
            }
            print("SWEEP " + json.dumps(summary), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
