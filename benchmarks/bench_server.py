"""Server throughput and time-to-first-token with 1, 4 and 16 concurrent streaming clients.

Starts ``llamakin serve`` (the default model unless --model) in a subprocess, then runs each
concurrency level from this process with asyncio + httpx: every client sends --requests
streaming chat completions back to back. Reported per level: total generated tokens/s (from the
``usage`` chunks), and time to first token, median and p95.

    .venv/bin/python benchmarks/bench_server.py [--levels 1 4 16] [--max-tokens 64] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time

import httpx

TOPICS = ["a lighthouse keeper", "a robot gardener", "the first city on Mars", "a dragon who cannot fly",
          "a detective in Venice", "the last library", "a chess prodigy", "an old fisherman"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, url: str, model: str, topic: str, max_tokens: int):
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": hash(topic) % 1000,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Write a long story about {topic}."}]}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.perf_counter() - start


async def level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(i):
            results = []
            for r in range(requests):
                results.append(await one_request(client, url, model, TOPICS[(i + r) % len(TOPICS)], max_tokens))
            return results

        start = time.perf_counter()
        done = await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - start
    flat = [x for results in done for x in results]
    ttft = sorted(t for _, t in flat)
    p95 = ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))]
    return {"clients": clients, "requests": len(flat), "tokens": sum(n for n, _ in flat),
            "tokens_per_s": round(sum(n for n, _ in flat) / wall, 1),
            "ttft_median_s": round(statistics.median(ttft), 3), "ttft_p95_s": round(p95, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint or catalog name (default: the default model)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "llamakin.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch)]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(level(url, model, 1, 1, 8))  # warm-up (traces the decode step)
        rows = []
        for clients in args.levels:
            rows.append(asyncio.run(level(url, model, clients, args.requests, args.max_tokens)))
            print(json.dumps(rows[-1]), flush=True)
        base = rows[0]["tokens_per_s"]
        print("\n| concurrent clients | generated tok/s | vs 1 client | TTFT median (s) | TTFT p95 (s) |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clients']} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.1f}x | {r['ttft_median_s']} | {r['ttft_p95_s']} |")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
