"""What the server benchmarks share: starting ``llamakin serve`` in a subprocess, one streamed chat
completion read the way a client reads it, the prompts' topics, percentiles and the server's RSS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

TOPICS = [
    "a lighthouse keeper",
    "a robot gardener",
    "the first city on Mars",
    "a dragon who cannot fly",
    "a detective in Venice",
    "the last library",
    "a chess prodigy",
    "an old fisherman",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    options: list[str], model: str | None = None, env: dict | None = None, wait_s: float = 600
) -> tuple[subprocess.Popen, str]:
    """``llamakin serve OPTIONS`` on a free port; returns once ``/health`` answers."""
    port = free_port()
    command = [sys.executable, "-m", "llamakin.cli", "serve", "--port", str(port), *options]
    if model:
        command += ["--model", model]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.25)
    return server, url


def served_model(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


@dataclass
class Streamed:
    """One streamed chat completion as the client saw it."""

    status: int
    text: str = ""
    first_token_s: float | None = None  # None: no content arrived
    seconds: float = 0.0
    completion_tokens: int = 0  # from the usage chunk, when asked for
    retry_after: float = 0.0  # a 429's Retry-After

    @property
    def ttft(self) -> float:
        return self.first_token_s if self.first_token_s is not None else self.seconds


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> Streamed:
    """POST a streaming chat completion and read it to ``[DONE]``. A 429 is returned (with its
    Retry-After) for the caller to count; any other failure, an error event or a stream cut
    short raises ``RuntimeError``."""
    start = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code == 429:
            await response.aread()
            return Streamed(429, retry_after=float(response.headers.get("retry-after", "1")))
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        result = Streamed(200)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result.seconds = time.perf_counter() - start
                return result
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            piece = event["choices"][0]["delta"].get("content") if event.get("choices") else None
            if piece and result.first_token_s is None:
                result.first_token_s = time.perf_counter() - start
            result.text += piece or ""
            if event.get("usage"):
                result.completion_tokens = event["usage"]["completion_tokens"]
    raise RuntimeError("the stream ended without [DONE]")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_average() -> list[float]:
    return [round(x, 1) for x in os.getloadavg()]
