"""A real LoRA fine-tune: SmolLM2-135M-Instruct (the catalog's default model) adapted to Shakespeare.

    .venv/bin/python examples/lora_shakespeare.py --out runs/lora-shakespeare [--set max_steps=150 ...]

Prepares the corpus with the model's own tokenizer, measures held-out perplexity and a sample
before training, runs ``llamakin train --recipe lora-shakespeare`` (rank 16, alpha 32, dropout
0.05 on q, k, v, o, gate, up, down), then loads the base with the exported PEFT adapter and
measures again. Writes ``OUT/results.md`` / ``results.json`` and ``OUT/curves.png``. Perplexity
is over the first ``--eval-windows`` non-overlapping windows of the validation split (the held-out
last 5% of every play), the same tokens before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import llamakin  # noqa: E402
from llamakin.train import prepare, recipe, train  # noqa: E402
from llamakin.train.plot import plot_runs  # noqa: E402

PROMPT = "KING HENRY.\n"


@torch.no_grad()
def heldout_perplexity(model, data: Path, seq_len: int, windows: int) -> float:
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.fromfile(data / meta["val"]["shards"][0], dtype=np.dtype(meta["dtype"])).astype(np.int64)
    total, count = 0.0, 0
    for w in range(min(windows, (len(tokens) - 1) // seq_len)):
        chunk = torch.from_numpy(tokens[w * seq_len:(w + 1) * seq_len + 1])[None]
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float()[0], chunk[0, 1:], reduction="sum").item()
        count += seq_len
    return math.exp(total / count)


def sample(model, tokenizer) -> str:
    return PROMPT + llamakin.generate(model, tokenizer, PROMPT, max_new_tokens=80, temperature=0.8, top_k=50, seed=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lora-shakespeare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--eval-windows", type=int, default=24)
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    cfg = recipe("lora-shakespeare", args.set)
    data = out / "data"
    if not (data / "meta.json").is_file():
        prepare(cfg.data, data, tokenizer=cfg.data_tokenizer)
    cfg = recipe("lora-shakespeare", [*args.set, f"data={json.dumps(str(data))}"])
    tokenizer = llamakin.load_tokenizer(data / "tokenizer")
    base = llamakin.load(cfg.init_from)
    before = {"perplexity": heldout_perplexity(base, data, cfg.seq_len, args.eval_windows), "sample": sample(base, tokenizer)}
    del base
    print(f"before: held-out perplexity {before['perplexity']:.2f}", flush=True)
    train_started = time.perf_counter()
    last = train(cfg, out)
    train_seconds = time.perf_counter() - train_started
    tuned = llamakin.load(cfg.init_from, adapter=out / "adapter")
    after = {"perplexity": heldout_perplexity(tuned, data, cfg.seq_len, args.eval_windows), "sample": sample(tuned, tokenizer)}
    plot_runs([out], out / "curves.png", labels=["LoRA on SmolLM2-135M-Instruct"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"steps": last["step"], "tokens": last["tokens"], "train_seconds": round(train_seconds, 1),
              "total_seconds": round(time.perf_counter() - started, 1),
              "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows[1:] or rows])),
              "final_val_loss": last.get("val_loss"), "perplexity_before": round(before["perplexity"], 3),
              "perplexity_after": round(after["perplexity"], 3), "eval_tokens": args.eval_windows * cfg.seq_len,
              "load_average": os.getloadavg(), "threads": torch.get_num_threads(),
              "sample_before": before["sample"], "sample_after": after["sample"]}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(
        f"| | held-out perplexity ({result['eval_tokens']:,} tokens) |\n|---|---|\n"
        f"| SmolLM2-135M-Instruct | {result['perplexity_before']} |\n"
        f"| + LoRA, {result['steps']} steps, {result['tokens']:,} tokens, {result['train_seconds']} s | "
        f"{result['perplexity_after']} |\n\nBefore:\n\n```\n{before['sample']}\n```\n\nAfter:\n\n```\n"
        f"{after['sample']}\n```\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
