"""A real LoRA fine-tune: SmolLM2-135M-Instruct (the catalog's default model) adapted to Shakespeare.

    .venv/bin/python examples/lora_shakespeare.py --out runs/lora-shakespeare [--set max_steps=150 ...]

Prepares the corpus with the model's own tokenizer, writes the held-out text (the validation split:
the last 5% of every play, never trained on) to ``OUT/heldout.txt``, measures its perplexity with
``llamakin eval perplexity`` and a sample before training, runs ``llamakin train --recipe
lora-shakespeare`` (rank 16, alpha 32, dropout 0.05 on q, k, v, o, gate, up, down), then measures
again with the exported PEFT adapter (``--adapter OUT/adapter``). Perplexity is over the first
``--eval-windows`` non-overlapping windows of ``seq_len`` tokens of the held-out text, the same
tokens before and after. Writes ``OUT/results.md`` / ``results.json`` and ``OUT/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import llamakin  # noqa: E402
from llamakin.train import prepare, recipe, train  # noqa: E402
from llamakin.train.plot import plot_runs  # noqa: E402

PROMPT = "KING HENRY.\n"


def write_heldout(data: Path, out: Path) -> Path:
    """The validation split as text: each play's held-out tail, decoded, separated by blank lines."""
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.fromfile(data / meta["val"]["shards"][0], dtype=np.dtype(meta["dtype"])).astype(
        np.int64
    )
    tokenizer = llamakin.load_tokenizer(data / "tokenizer")
    cuts = np.flatnonzero(tokens == meta["eos_token_id"])
    pieces = np.split(tokens, cuts + 1)
    text = "\n\n".join(
        tokenizer.decode([int(t) for t in p if t != meta["eos_token_id"]]).strip() for p in pieces
    )
    out.write_text(text.strip() + "\n")
    return out


def eval_perplexity(
    model: str, heldout: Path, seq_len: int, windows: int, adapter: Path | None = None
) -> dict:
    """``llamakin eval perplexity`` on the held-out text, as a user runs it."""
    command = [
        sys.executable,
        "-m",
        "llamakin.cli",
        "eval",
        "perplexity",
        "--model",
        model,
        "--file",
        str(heldout),
        "--context",
        str(seq_len),
        "--stride",
        str(seq_len),
        "--max-chunks",
        str(windows),
        "--json",
    ]
    if adapter is not None:
        command += ["--adapter", str(adapter)]
    print("$", " ".join(command[1:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def sample(model, tokenizer) -> str:
    return PROMPT + llamakin.generate(
        model, tokenizer, PROMPT, max_new_tokens=80, temperature=0.8, top_k=50, seed=3
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/lora-shakespeare")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides"
    )
    parser.add_argument("--eval-windows", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    load_start = os.getloadavg()
    cfg = recipe("lora-shakespeare", args.set)
    data = out / "data"
    if not (data / "meta.json").is_file():
        prepare(cfg.data, data, tokenizer=cfg.data_tokenizer)
    cfg = recipe("lora-shakespeare", [*args.set, f"data={json.dumps(str(data))}"])
    heldout = write_heldout(data, out / "heldout.txt")
    tokenizer = llamakin.load_tokenizer(data / "tokenizer")
    before = eval_perplexity(cfg.init_from, heldout, cfg.seq_len, args.eval_windows)
    base = llamakin.load(cfg.init_from)
    sample_before = sample(base, tokenizer)
    del base
    print(f"before: held-out perplexity {before['perplexity']:.3f}", flush=True)
    train_started = time.perf_counter()
    last = train(cfg, out)
    train_seconds = time.perf_counter() - train_started
    after = eval_perplexity(
        cfg.init_from, heldout, cfg.seq_len, args.eval_windows, adapter=out / "adapter"
    )
    tuned = llamakin.load(cfg.init_from, adapter=out / "adapter")
    sample_after = sample(tuned, tokenizer)
    plot_runs([out], out / "curves.png", labels=["LoRA on SmolLM2-135M-Instruct"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "steps": last["step"],
        "tokens": last["tokens"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows[1:] or rows])),
        "final_loss": last["loss"],
        "final_val_loss": last.get("val_loss"),
        "perplexity_before": round(before["perplexity"], 3),
        "perplexity_after": round(after["perplexity"], 3),
        "stderr_before": round(before["stderr"], 3),
        "stderr_after": round(after["stderr"], 3),
        "eval_tokens": after["tokens"],
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "sample_before": sample_before,
        "sample_after": sample_after,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(
        f"| | held-out perplexity ({result['eval_tokens']:,} tokens) |\n|---|---|\n"
        f"| SmolLM2-135M-Instruct | {result['perplexity_before']} +/- {result['stderr_before']} |\n"
        f"| + LoRA, {result['steps']} steps, {result['tokens']:,} tokens, {result['train_seconds']} s | "
        f"{result['perplexity_after']} +/- {result['stderr_after']} |\n\nBefore:\n\n```\n{sample_before}\n```\n\n"
        f"After:\n\n```\n{sample_after}\n```\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
