"""Helpers shared by the test files (``tests/`` is on the import path: ``pythonpath`` in pyproject.toml).

``from conftest import run_cli, tiny_model`` in a test file; fixtures stay in the files that use them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import llamakin

# Decode steps are traced from the first step in tests (as every shape was before short runs
# stepped eagerly, llamakin.speed.decode_trace "When a trace pays"), so the many generation
# tests keep exercising the traced path; the tests of that policy set their own value.
os.environ.setdefault("LLAMAKIN_TRACE_AFTER", "0")


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``llamakin ARGS...`` in a fresh process (exit codes, stderr and tracebacks as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "llamakin.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_model(
    tokenizer: llamakin.Tokenizer, max_position_embeddings: int = 64
) -> llamakin.Transformer:
    """A 2-layer random model (GQA, tied embeddings) over ``tokenizer``'s vocabulary, seeded; the
    embeddings are widened to N(0, 1) so greedy decoding does not collapse to one token."""
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0)
    return model


def metrics_losses(run: Path) -> list[float]:
    """The loss of every step a run logged in ``metrics.jsonl``, in step order."""
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows[record["step"]] = record["loss"]
    return [rows[s] for s in sorted(rows)]


def crash_and_resume(recipe: str, out: Path, settings: list[str]) -> list[float]:
    """``llamakin train`` of ``recipe`` killed after step 4 (``LLAMAKIN_DIE_AFTER_STEP``), then
    resumed with ``--resume``; the losses the two processes logged in ``out``."""
    command = [sys.executable, "-m", "llamakin.cli", "train", "--recipe", recipe, "--out", str(out)]
    for item in settings:
        command += ["--set", item]
    crashed = subprocess.run(
        command, env={**os.environ, "LLAMAKIN_DIE_AFTER_STEP": "4"}, capture_output=True, text=True
    )
    assert crashed.returncode == 17, crashed.stderr
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    return metrics_losses(out)


async def finished_results(requests, timeout: float = 120) -> list:
    """Each server-engine request's final ``RowResult``, in order, once it is done (its text pieces
    skipped); fails on an error event or after ``timeout`` seconds of silence."""
    results = []
    for request in requests:
        while True:
            kind, payload = await asyncio.wait_for(request.events.get(), timeout)
            assert kind != "error", payload
            if kind == "done":
                results.append(payload)
                break
    return results
