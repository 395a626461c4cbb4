"""Inference speed: llamakin vs transformers on the same SmolLM2-135M weights, in one process.

Both load the catalog's real GGUF (dequantized to the same float32 values; the parity tests
prove identical logits). Each measurement alternates llamakin and transformers for --rounds
rounds and reports medians and the ratio. Run:

    .venv/bin/python benchmarks/bench_inference.py [--rounds 5] [--device cpu|cuda] [--quick]

Measured: decode tokens/s at batch 1 (and batch 8), prefill tokens/s for a 512-token prompt,
bfloat16 decode, load time; peak RSS is measured in fresh subprocesses (--rss).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import llamakin  # noqa: E402
from llamakin.catalog import pull  # noqa: E402


def load_pair(dtype: torch.dtype, device: str, quantize: str | None = None):
    import transformers

    path = pull("smollm2-135m-instruct")
    start = time.perf_counter()
    ours = llamakin.load(path, dtype=dtype, device=device, quantize=quantize)
    ours_load = time.perf_counter() - start
    start = time.perf_counter()
    theirs = (
        transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype
        )
        .to(device)
        .eval()
    )
    theirs_load = time.perf_counter() - start
    return ours, theirs, ours_load, theirs_load


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def traced_from_first_step():
    """``LLAMAKIN_TRACE_AFTER=0`` for the block: decode steps traced from the first token, the
    steady state a benchmark times (by default, runs of up to 64 steps decode eagerly until their
    shape has earned a trace: ``llamakin.speed.decode_trace``)."""
    return mock.patch.dict(os.environ, {"LLAMAKIN_TRACE_AFTER": "0"})


@torch.inference_mode()
def ours_decode(model, prompt: torch.Tensor, new: int, device: str) -> float:
    """Tokens/s of the greedy decode loop (prefill excluded), llamakin's generation engine, with
    the step traced from the first token (:func:`traced_from_first_step`)."""
    from llamakin.generate import GenerationRun, SamplingParams

    tok = _DummyTokenizer()
    with traced_from_first_step():
        run = GenerationRun(
            model, tok, prompt.tolist(), SamplingParams(max_new_tokens=new, ignore_eos=True)
        )
        for _ in run:
            pass
    sync(device)
    return run.stats.decode_tokens_per_second


@torch.inference_mode()
def theirs_decode(model, prompt: torch.Tensor, new: int, device: str) -> float:
    ids = prompt.to(device)
    # time-to-first-token is measured separately; subtract a 1-token generate to keep decode only
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    sync(device)
    total = time.perf_counter() - start
    return (new - 1) * prompt.shape[0] / (total - first)


@torch.inference_mode()
def ours_prefill(model, prompt: torch.Tensor, device: str) -> float:
    ids = prompt.to(device)
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 1)
    start = time.perf_counter()
    model(ids, cache=cache, last_only=True)
    sync(device)
    return ids.numel() / (time.perf_counter() - start)


@torch.inference_mode()
def theirs_prefill(model, prompt: torch.Tensor, device: str) -> float:
    ids = prompt.to(device)
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    return ids.numel() / (time.perf_counter() - start)


class _DummyTokenizer:
    """Decoding text is not what is measured: a tokenizer that turns ids into nothing."""

    eos_token_ids = ()

    def decode(self, ids, skip_special_tokens=False):
        return ""


def alternate(label: str, ours_fn, theirs_fn, rounds: int) -> dict:
    ours, theirs = [], []
    ours_fn(), theirs_fn()  # warm-up
    for _ in range(rounds):
        ours.append(ours_fn())
        theirs.append(theirs_fn())
    o, t = statistics.median(ours), statistics.median(theirs)
    row = {
        "measure": label,
        "llamakin": round(o, 1),
        "transformers": round(t, 1),
        "ratio": round(o / t, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def peak_rss(which: str, dtype: str, quantize: str | None = None) -> float:
    code = f"""
import resource, torch, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "src")!r})
from llamakin.catalog import pull
path = pull('smollm2-135m-instruct', progress=False)
if {which!r} == 'llamakin':
    import llamakin; m = llamakin.load(path, dtype=torch.{dtype}, quantize={quantize!r})
else:
    import transformers; m = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.{dtype})
with torch.inference_mode():
    m(torch.ones(1, 8, dtype=torch.long))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent through fork+exec
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fp32 batch-1 decode and prefill only")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS in subprocesses")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "bfloat16"],
        help="default: both (CUDA: bfloat16)",
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "auto", "int8", "int4"],
        default="none",
        help="llamakin's weights (auto: the file's Q4_1 kept as int4; transformers: float)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    quantize = None if args.quantize == "none" else args.quantize
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"llamakin quantize={args.quantize} loadavg={os.getloadavg()}",
        flush=True,
    )
    rows = []
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    if args.device == "cuda":
        dtypes = [torch.bfloat16]
    if args.dtypes:
        dtypes = [getattr(torch, name) for name in args.dtypes]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        ours, theirs, ours_load, theirs_load = load_pair(dtype, args.device, quantize)
        rows.append(
            {
                "measure": f"load s ({name})",
                "llamakin": round(ours_load, 2),
                "transformers": round(theirs_load, 2),
                "ratio": round(theirs_load / ours_load, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        short = torch.randint(100, 40000, (1, 16))
        rows.append(
            alternate(
                f"decode tok/s, batch 1 ({name})",
                lambda: ours_decode(ours, short, args.new_tokens, args.device),
                lambda: theirs_decode(theirs, short, args.new_tokens, args.device),
                args.rounds,
            )
        )
        long = torch.randint(100, 40000, (1, args.prompt_tokens))
        rows.append(
            alternate(
                f"prefill tok/s, {args.prompt_tokens} tokens ({name})",
                lambda: ours_prefill(ours, long, args.device),
                lambda: theirs_prefill(theirs, long, args.device),
                args.rounds,
            )
        )
        if not args.quick:
            batch = 16 if args.device == "cuda" else 8
            many = torch.randint(100, 40000, (batch, 16))
            rows.append(
                alternate(
                    f"decode tok/s, batch {batch} ({name})",
                    lambda: ours_decode(ours, many, args.new_tokens, args.device),
                    lambda: theirs_decode(theirs, many, args.new_tokens, args.device),
                    max(1, args.rounds // 2),
                )
            )
        ours = theirs = None  # free this pair before loading the next
    if args.rss:
        for dtype in ("float32",):
            o, t = peak_rss("llamakin", dtype, quantize), peak_rss("transformers", dtype)
            rows.append(
                {
                    "measure": f"peak RSS MiB ({dtype})",
                    "llamakin": round(o),
                    "transformers": round(t),
                    "ratio": round(t / o, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print("\n| measure | llamakin | transformers | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['measure']} | {r['llamakin']} | {r['transformers']} | {r['ratio']}x |")


if __name__ == "__main__":
    main()
