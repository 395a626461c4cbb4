"""Where the rest of an int4 decode step can go: batch-1 decode ms/token of the default model.

Loads the default model (SmolLM2-135M-Instruct from its Q4_1 GGUF) with ``quantize="auto"``:
int4 products (``_weight_int4pack_mm_for_cpu``, bf16 activations), everything else float32.
After a prompt of ``--prompt-tokens`` it times one decode step (batch 1, a cache of ``--cache``
slots) through each variant, alternating variants round by round in one run, and prints medians:

* ``trace``: what ``generate`` runs (:class:`llamakin.speed.decode_trace.Decoder`: a frozen
  TorchScript trace, run by TorchScript's default profiling executor);
* ``trace-noopt``: the same frozen trace run under ``torch.jit.optimized_execution(False)``
  (TorchScript's executor then skips its profile-guided optimisation pass);
* ``eager``: ``Transformer.decode_step`` in Python;
* ``compile`` / ``compile-max``: ``torch.compile`` (inductor, CPU C++ code generation,
  ``dynamic=False``; default mode and ``max-autotune-no-cudagraphs``) of the same step. Off by
  default (``--compile default max``): compiling takes minutes on 2 cores. The compile time is
  printed; torch's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``) make a second process faster.

* ``against``: with ``--against SRC`` (another checkout's ``src`` folder, e.g. a ``git worktree``
  of the commit before a change), that code's traced step on its own copy of the model and cache,
  imported under another package name in this process: a before/after comparison of code
  changes, alternating round by round like every variant (ratios under the same load).
* ``--batch N`` times an N-row step (every row at the same slot) instead of one row.
* ``--generate N`` (with ``--against``) times whole ``llamakin.generate`` calls instead: the
  ``--prompt-tokens`` prompt, N new tokens greedily (``ignore_eos``), prefill, traced decode,
  sampling and Python included, this checkout and the other alternating; tokens/s of the
  decode (``stream=True`` stats) and the wall time per call, medians.

Also printed per variant: the time to set it up and of its first three steps (TorchScript
optimises a graph on its second call), the largest logit difference from the eager step, whether
``--greedy`` greedy tokens equal the eager ones, and the cost of greedy sampling (argmax) beside
the step. The CPU line and ``os.getloadavg()`` are printed: on a shared machine compare ratios
within one run, not numbers across runs.

    .venv/bin/python benchmarks/bench_decode_step.py [--rounds 7] [--compile default max]
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import llamakin  # noqa: E402
from llamakin.hardware import describe_cpu  # noqa: E402
from llamakin.speed.decode_trace import Decoder  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
COMPILE_MODES = {"default": None, "max": "max-autotune-no-cudagraphs"}


class Variant:
    """One way to run ``decode_step(tokens, positions, slots)`` on the benchmark's cache."""

    def __init__(self, name: str, step, setup_s: float):
        self.name, self.step, self.setup_s = name, step, setup_s
        self.first_calls: list[float] = []
        self.times: list[float] = []


def make_variants(model, cache, names: list[str], compile_modes: list[str]) -> list[Variant]:
    variants = []
    for name in names:
        start = time.perf_counter()
        if name in ("trace", "trace-noopt"):
            decoder = Decoder(model, cache)
            if decoder._graph is None:
                raise SystemExit("the decode step was not traced (LLAMAKIN_TRACE=0?)")
            if name == "trace":
                step = decoder.step_rows
            else:

                def step(tokens, positions, slots, decoder=decoder):
                    with torch.jit.optimized_execution(False):
                        return decoder.step_rows(tokens, positions, slots)

        elif name == "eager":

            def step(tokens, positions, slots):
                return model.decode_step(tokens, positions, slots, cache.valid, cache)

        else:
            raise SystemExit(f"unknown variant {name!r}")
        variants.append(Variant(name, step, time.perf_counter() - start))
    for mode in compile_modes:

        def eager_step(tokens, positions, slots, valid):
            return model.decode_step(tokens, positions, slots, valid, cache)

        compiled = torch.compile(eager_step, dynamic=False, mode=COMPILE_MODES[mode])

        def step(tokens, positions, slots, compiled=compiled):
            return compiled(tokens, positions, slots, cache.valid)

        variants.append(Variant("compile" if mode == "default" else "compile-max", step, 0.0))
    return variants


def import_against(src: str):
    """The ``llamakin`` package of another checkout's ``src`` folder, imported as ``llamakin_against``
    (its imports are relative, so a renamed copy is a separate package with its own modules)."""
    folder = Path(tempfile.mkdtemp(prefix="llamakin_against_"))
    atexit.register(shutil.rmtree, folder, True)
    shutil.copytree(Path(src) / "llamakin", folder / "llamakin_against")
    sys.path.insert(0, str(folder))
    return importlib.import_module("llamakin_against")


def against_variant(package, args, prompt: torch.Tensor, tokens, positions, slots) -> Variant:
    """The other checkout's traced step on its own model and cache (same prompt, same slots)."""
    from llamakin_against.speed.decode_trace import Decoder as OtherDecoder

    model = package.load(args.model, quantize=args.quantize).eval()
    cache = model.new_cache(args.batch, args.cache)
    model(prompt, cache=cache, last_only=True)
    start = time.perf_counter()
    decoder = OtherDecoder(model, cache)
    variant = Variant("against", decoder.step_rows, time.perf_counter() - start)
    variant.reference = model.decode_step(tokens, positions, slots, cache.valid, cache)
    return variant


def generate_ab(args, package, other) -> None:
    """Whole ``generate`` calls of this checkout's package and the other one's, alternating."""
    runs = {}
    for name, pkg in (("this", package), ("against", other)):
        model = pkg.load(args.model, quantize=args.quantize).eval()
        tokenizer = pkg.load_tokenizer(args.model)
        runs[name] = (pkg, model, tokenizer, {"tok/s": [], "wall s": []}, [])
    torch.manual_seed(0)
    prompt = torch.randint(0, 1000, (args.prompt_tokens,)).tolist()
    for round_ in range(args.rounds + 1):  # round 0 warms up (traces, caches)
        for name, (pkg, model, tokenizer, times, texts) in runs.items():
            start = time.perf_counter()
            stream = pkg.generate(
                model, tokenizer, prompt, max_new_tokens=args.generate, ignore_eos=True, stream=True
            )
            texts.append("".join(stream))
            wall = time.perf_counter() - start
            if round_:
                times["tok/s"].append(stream.stats.decode_tokens_per_second)
                times["wall s"].append(wall)
    print(
        f"\ngenerate {args.generate} tokens after {args.prompt_tokens}, medians of {args.rounds}:"
    )
    for name, (_, _, _, times, texts) in runs.items():
        print(
            f"  {name:8s} decode {statistics.median(times['tok/s']):7.2f} tok/s, "
            f"wall {statistics.median(times['wall s']):6.2f} s per call   "
            f"rounds: {' '.join(f'{t:.1f}' for t in times['tok/s'])}"
        )
    print("  same text:", runs["this"][4] == runs["against"][4])
    print(describe_cpu(), f"; os.getloadavg() {os.getloadavg()}")


def greedy(variant: Variant, first: int, start: int, count: int, batch: int = 1) -> list[int]:
    """``count`` greedy tokens of row 0 from slot ``start`` on (every variant rewrites the same
    slots; every row is fed row 0's token)."""
    token, out = first, []
    for i in range(count):
        logits = variant.step(
            torch.full((batch, 1), token),
            torch.full((batch, 1), start + i),
            torch.full((batch,), start + i),
        )
        token = int(logits[0].argmax(-1))
        out.append(token)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--cache", type=int, default=256, help="KV cache slots (a trace bucket)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="decode steps per variant per round")
    parser.add_argument("--greedy", type=int, default=8, help="greedy tokens compared to eager")
    parser.add_argument("--variants", nargs="+", default=["trace", "trace-noopt", "eager"])
    parser.add_argument("--compile", nargs="*", default=[], choices=sorted(COMPILE_MODES))
    parser.add_argument("--batch", type=int, default=1, help="rows per decode step")
    parser.add_argument(
        "--quantize", default="auto", help="load(quantize=...): auto, none (float32), int8, int4"
    )
    parser.add_argument(
        "--against", metavar="SRC", help="another checkout's src folder: its traced step too"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--generate", type=int, metavar="N", help="with --against: time whole generate calls"
    )
    args = parser.parse_args()
    args.quantize = None if args.quantize == "none" else args.quantize
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate:
        if not args.against:
            raise SystemExit("--generate compares two checkouts: give --against SRC too")
        print(describe_cpu(), flush=True)
        torch.set_grad_enabled(False)
        generate_ab(args, llamakin, import_against(args.against))
        return

    print(describe_cpu(), flush=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = llamakin.load(args.model, quantize=args.quantize).eval()
    print(
        f"loaded {args.model} (quantize={args.quantize!r}) in {time.perf_counter() - start:.1f} s"
    )
    torch.set_grad_enabled(False)
    cache = model.new_cache(args.batch, args.cache)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_tokens))
    model(prompt, cache=cache, last_only=True)
    p, b = args.prompt_tokens, args.batch
    tokens, positions, slots = torch.full((b, 1), 5), torch.full((b, 1), p), torch.full((b,), p)

    variants = make_variants(model, cache, args.variants, args.compile)
    reference = model.decode_step(tokens, positions, slots, cache.valid, cache)
    if args.against:
        other = against_variant(
            import_against(args.against), args, prompt, tokens, positions, slots
        )
        print(
            f"against {args.against}: eager logits vs this checkout's eager: max difference "
            f"{float((other.reference - reference).abs().max()):.3g}"
        )
        variants.append(other)
    eager = Variant(
        "eager",
        lambda t, q, s: model.decode_step(t, q, s, cache.valid, cache),
        0.0,
    )
    eager_tokens = greedy(eager, 5, p, args.greedy, b)
    for v in variants:
        for _ in range(3):
            start = time.perf_counter()
            logits = v.step(tokens, positions, slots)
            v.first_calls.append(time.perf_counter() - start)
        v.max_diff = float((logits - reference).abs().max())
        v.same_greedy = greedy(v, 5, p, args.greedy, b) == eager_tokens
        print(
            f"{v.name:12s} setup {v.setup_s:6.1f} s, first steps "
            + " ".join(f"{t:.2f}" for t in v.first_calls)
            + f" s; max |logit - eager| {v.max_diff:.3g}; greedy tokens equal: {v.same_greedy}",
            flush=True,
        )

    sampling: list[float] = []
    for _ in range(args.rounds):
        for v in variants:
            start = time.perf_counter()
            for _ in range(args.steps):
                v.step(tokens, positions, slots)
            v.times.append((time.perf_counter() - start) * 1e3 / args.steps)
        start = time.perf_counter()
        for _ in range(args.steps):
            reference.argmax(-1).tolist()
        sampling.append((time.perf_counter() - start) * 1e3 / args.steps)

    base = statistics.median(variants[0].times)
    print(f"\nbatch-{b} decode step, cache {args.cache}, medians of {args.rounds} rounds:")
    for v in variants:
        m = statistics.median(v.times)
        print(
            f"  {v.name:12s} {m:8.1f} ms/step  {base / m:5.2f}x {variants[0].name}   "
            f"rounds: {' '.join(f'{t:.1f}' for t in v.times)}"
        )
    print(
        f"  greedy sampling (argmax over {model.config.vocab_size}): {statistics.median(sampling):.3f} ms"
    )
    print(describe_cpu(), f"; os.getloadavg() {os.getloadavg()}")


if __name__ == "__main__":
    main()
