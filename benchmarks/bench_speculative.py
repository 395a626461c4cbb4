"""Speculative decoding on the real model: plain greedy decoding vs ``--speculate lookup`` and
``--speculate int4`` (llamakin.speculative), alternating in one run, medians and ratios.

Model: SmolLM2-135M-Instruct (the catalog's Q4_1 GGUF) loaded as float32 (``quantize=None``),
int8 and kept int4 (``auto``; no int4 draft for it: the draft would be the model itself).
Prompts (chat template, greedy, up to --max-new-tokens, EOS ends a row):
``normal`` asks for a story; ``repeat`` asks to copy a passage with one change, so the answer
repeats its context (prompt lookup's case). Each row also says whether the speculative text equals
the plain one (it must, up to one-token vs several-token floating-point differences).

    .venv/bin/python benchmarks/bench_speculative.py [--rounds 3] [--max-new-tokens 96] [--draft-tokens 4] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamakin  # noqa: E402
from llamakin.catalog import pull  # noqa: E402
from llamakin.generate import GenerationRun, SamplingParams, encode_prompt  # noqa: E402
from llamakin.speculative import SpeculativeRun  # noqa: E402

PASSAGE = (
    "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
    "    return total / len(values)\n\n"
    "def variance(values):\n    m = mean(values)\n    total = 0\n    for value in values:\n"
    "        total += (value - m) ** 2\n    return total / len(values)\n"
)
PROMPTS = {
    "normal": "Write a short story about a robot who learns to paint.",
    "repeat": "Rewrite this Python code, renaming the variable `total` to `acc`. Output only the code.\n\n"
    + PASSAGE,
}


def one(model, tok, ids, params, mode, k):
    if mode == "plain":
        run = GenerationRun(model, tok, [ids], params)
    else:
        run = SpeculativeRun(model, tok, ids, params, mode, k)
    start = time.perf_counter()
    for _ in run:
        pass
    seconds = time.perf_counter() - start
    return run.results[0].token_ids, seconds, getattr(run.stats, "acceptance_rate", None)


def main() -> None:
    from bench_quant_kernels import cpu_line

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--targets", nargs="*", default=["none", "int8", "auto"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"cpu": cpu_line(), "loadavg": os.getloadavg()}), flush=True)
    path = pull("smollm2-135m-instruct")
    tok = llamakin.load_tokenizer(path)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    for target in args.targets:
        model = llamakin.load(path, quantize=None if target == "none" else target)
        modes = ["plain", "lookup"] + ([] if target == "auto" else ["int4"])
        for name, text in PROMPTS.items():
            ids = encode_prompt(tok, [{"role": "user", "content": text}])
            for mode in modes:  # warm-up: traces, the int4 draft
                one(model, tok, ids, params, mode, args.draft_tokens)
            times = {m: [] for m in modes}
            outputs, acceptance = {}, {}
            for _ in range(args.rounds):
                for mode in modes:
                    tokens, seconds, rate = one(model, tok, ids, params, mode, args.draft_tokens)
                    times[mode].append(len(tokens) / seconds)
                    outputs[mode], acceptance[mode] = tokens, rate
            base = statistics.median(times["plain"])
            for mode in modes:
                tps = statistics.median(times[mode])
                print(
                    json.dumps(
                        {
                            "target": target,
                            "prompt": name,
                            "mode": mode,
                            "tokens": len(outputs[mode]),
                            "tok/s (median, prefill included)": round(tps, 1),
                            "vs plain": round(tps / base, 2),
                            "acceptance": None
                            if acceptance[mode] is None
                            else round(acceptance[mode], 2),
                            "same text as plain": outputs[mode] == outputs["plain"],
                            "loadavg": os.getloadavg()[0],
                        }
                    ),
                    flush=True,
                )
        del model
    print(json.dumps({"loadavg after": os.getloadavg(), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
