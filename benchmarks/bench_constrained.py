"""The cost of constrained JSON decoding per token, on the real SmolLM2-135M-Instruct.

One process, one model, the same chat prompt, decoded three ways in alternating rounds:
free (``ignore_eos``, the baseline), ``json_object`` (any JSON object) and ``json_schema`` (a
small schema), the last two through :mod:`llamakin.constrained`'s logits processor exactly as the
server applies it. Reported: decode tokens/s (median over rounds; each constrained round counts
only the tokens it produced, as it ends when the JSON is complete), the ratio to free decoding,
and the time of the processor per token (mask computation and masking), median over every call,
and again replayed alone on the samples, fastest of 5 per token (least disturbed by other load). The grammar is compiled once per round (the llguidance tokenizer once per process, its
build time printed separately), so the numbers are the per-token cost of the constraint.

    .venv/bin/python benchmarks/bench_constrained.py [--rounds 5] [--max-tokens 96] [--quantize auto]

The machine is shared: the load average is printed with the CPU; compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import llamakin
from llamakin.catalog import resolve
from llamakin.constrained import Grammar, llg_tokenizer
from llamakin.hardware import describe_cpu

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"type": "string"},
        "likes": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "color", "likes"],
    "additionalProperties": False,
}
PROMPT = [
    {
        "role": "user",
        "content": "Describe a cat as a JSON object with its name, age, color and the things it "
        "likes.",
    }
]


def cpu_line() -> str:
    return describe_cpu()


class Timed:
    """Wraps a logits processor and records how long each call takes."""

    def __init__(self, processor, seconds: list[float]):
        self.processor, self.seconds = processor, seconds

    def __call__(self, ids, logits):
        start = time.perf_counter()
        out = self.processor(ids, logits)
        self.seconds.append(time.perf_counter() - start)
        return out


def run(model, tok, max_tokens: int, processor=None) -> tuple[float, int, str]:
    stream = llamakin.generate(
        model,
        tok,
        PROMPT,
        max_new_tokens=max_tokens,
        temperature=0.7,
        seed=1,
        stream=True,
        ignore_eos=processor is None,
        logits_processor=processor,
    )
    text = "".join(stream)
    return stream.stats.decode_tokens_per_second, stream.stats.generated_tokens, text


def processor_alone(tok, vocab: int, schema, text: str, repeats: int = 5) -> tuple[float, int]:
    """The processor's own time over the tokens of ``text`` (a constrained answer), replayed
    ``repeats`` times with fresh constraints: the fastest time per position, summed, divided by
    the tokens. The minimum is the least disturbed by other processes on a shared machine."""
    ids = tok.encode(text, add_special_tokens=False)
    logits = torch.randn(vocab)
    best = [float("inf")] * len(ids)
    grammar = Grammar.json(tok, schema, vocab)
    for _ in range(repeats):
        constraint = grammar.constraint()
        for i in range(len(ids)):
            start = time.perf_counter()
            constraint(ids[:i], logits)
            best[i] = min(best[i], time.perf_counter() - start)
    return sum(best) / len(ids), len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="as llamakin serve loads it (default auto)",
    )
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    model = llamakin.load(args.model, quantize=None if args.quantize == "none" else args.quantize)
    tok = llamakin.load_tokenizer(resolve(args.model))
    vocab = model.config.vocab_size
    start = time.perf_counter()
    llg_tokenizer(tok, vocab)
    print(
        f"llguidance tokenizer built once per tokenizer: {time.perf_counter() - start:.2f} s",
        flush=True,
    )
    # warm-up: traces the decode step for the timed runs' cache length (it depends on max_tokens)
    run(model, tok, args.max_tokens)
    modes = {"free": None, "json_object": None, "json_schema": SCHEMA}
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    processor_seconds: dict[str, list[float]] = {m: [] for m in modes}
    samples = {}
    for _ in range(args.rounds):
        for mode, schema in modes.items():
            processor = None
            if mode != "free":
                processor = Timed(
                    Grammar.json(tok, schema, vocab).constraint(), processor_seconds[mode]
                )
            speed, n, text = run(model, tok, args.max_tokens, processor)
            speeds[mode].append(speed)
            tokens[mode].append(n)
            samples[mode] = text
            print(f"{mode}: {n} tokens, {speed:.1f} tok/s", flush=True)
            if mode != "free" and n < args.max_tokens:
                json.loads(text)  # a finished constrained answer is JSON
    print(f"loadavg after: {os.getloadavg()}")
    for mode, text in samples.items():
        print(f"{mode} sample: {text[:160]!r}")
    base = statistics.median(speeds["free"])
    print(
        f"\n| decoding | tokens/round (median) | decode tok/s (median of {args.rounds}) | vs free | processor per token "
        "(median) |\n|---|---|---|---|---|"
    )
    for mode in modes:
        median = statistics.median(speeds[mode])
        per_token = (
            f"{statistics.median(processor_seconds[mode]) * 1e3:.2f} ms"
            if processor_seconds[mode]
            else "-"
        )
        print(
            f"| {mode} | {statistics.median(tokens[mode])} | {median:.1f} | {median / base:.2f}x | {per_token} |"
        )
    print("\nthe processor alone, replaying each constrained sample (fastest of 5 per token):")
    for mode, schema in modes.items():
        if mode != "free":
            seconds, n = processor_alone(tok, vocab, schema, samples[mode])
            print(
                f"  {mode}: {seconds * 1e3:.3f} ms per token over {n} tokens (loadavg {os.getloadavg()[0]:.1f})"
            )


if __name__ == "__main__":
    main()
