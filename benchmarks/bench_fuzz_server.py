"""The server fuzz of ``tests/test_server_fuzz.py`` with a long budget: how many hostile request
bodies ran, what they got, and whether any broke the rule (a 5xx, a malformed error, a stream
that did not end properly, or a bystander stream that got a different text).

An in-process server on 127.0.0.1 (the tiny random model of the tests, with the default model's
tokenizer: what is fuzzed is the request handling) takes hypothesis cases in rounds until the
time budget is spent; a bystander client streams the same greedy request meanwhile.

    .venv/bin/python benchmarks/bench_fuzz_server.py [--seconds 600] [--round 200]
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import llamakin  # noqa: E402
from llamakin.catalog import pull  # noqa: E402
from llamakin.hardware import describe_cpu  # noqa: E402
from llamakin.serve import Engine, create_app  # noqa: E402
from server_fuzz import MODEL, cases, check, send, tiny_model  # noqa: E402


def cpu_model() -> str:
    return describe_cpu()


def start_server(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_queue=64, context=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, MODEL), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return engine, server, thread, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600, help="time budget")
    parser.add_argument("--round", type=int, default=200, help="hypothesis examples per round")
    args = parser.parse_args()
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()} (shared machine: "
        "timings are noisy)",
        flush=True,
    )
    tokenizer = llamakin.load_tokenizer(pull(progress=False))
    engine, server, thread, url = start_server(tiny_model(tokenizer), tokenizer)
    client = httpx.Client(timeout=120)
    outcomes: collections.Counter[str] = collections.Counter()
    body = {
        "model": MODEL,
        "prompt": "A calm sea",
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": True,
    }
    expected = client.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
    stop, bystander_runs, bystander_bad = threading.Event(), [0], []

    def bystander():
        with httpx.Client(timeout=120) as own:
            while not stop.is_set():
                r = own.post(url + "/v1/completions", json=body)
                bystander_runs[0] += 1
                if r.status_code != 200 or r.json()["choices"][0]["text"] != expected:
                    bystander_bad.append(r.text[:200])

    watcher = threading.Thread(target=bystander, daemon=True)
    watcher.start()

    @settings(
        max_examples=args.round,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases())
    def one(case):
        outcomes[check(send(client, url, case), case)] += 1
        assert engine.thread.is_alive(), "the engine thread died"

    start, rounds, failure = time.perf_counter(), 0, None
    try:
        while time.perf_counter() - start < args.seconds:
            one()
            rounds += 1
            print(
                f"round {rounds}: {sum(outcomes.values())} cases in {time.perf_counter() - start:.0f} s "
                f"({dict(sorted(outcomes.items()))})",
                flush=True,
            )
    except Exception as e:  # noqa: BLE001 - hypothesis reports the minimal failing case
        failure = e
    finally:
        stop.set()
        watcher.join(timeout=120)
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()
    seconds = time.perf_counter() - start
    print(
        f"\n{sum(outcomes.values())} cases in {seconds:.0f} s ({rounds} rounds of up to {args.round}); answers: "
        f"{dict(sorted(outcomes.items()))}; bystander streams: {bystander_runs[0]}, wrong: {len(bystander_bad)}; "
        f"load average {os.getloadavg()}"
    )
    if failure is not None or bystander_bad:
        print(f"FAILED: {failure or bystander_bad[:3]}")
        sys.exit(1)
    print("no case broke the rule")


if __name__ == "__main__":
    main()
