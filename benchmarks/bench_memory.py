"""Where the memory of ``llamakin generate`` on the default model goes: peak and resident RSS per phase.

Two measurements, both on the catalog's default model (SmolLM2-135M-Instruct, Q4_1 GGUF):

1. **The whole process** (the number users see): ``python -m llamakin generate --chat ... --max-new-tokens
   N`` run as a child (the ``make demo`` command line), its peak RSS from ``getrusage``
   (``ru_maxrss`` of the children), median over --rounds runs.
2. **Phase by phase, in this process**: after each phase its own peak (``VmHWM``, reset between
   phases by writing 5 to ``/proc/self/clear_refs``, Linux >= 4.0) and the resident set after it
   (``VmRSS``): the interpreter, ``import llamakin.cli`` (what ``generate`` imports at start),
   ``load`` (``quantize="auto"``, as ``generate``'s default), the tokenizer, and generating.

    .venv/bin/python benchmarks/bench_memory.py [--rounds 3] [--quantize auto] [--max-new-tokens 32]

Prints the CPU line and the load average (the machine is shared: RSS does not depend on load,
times do).
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

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Explain in two sentences why the sky is blue."


def status_mb() -> dict[str, float]:
    """``VmHWM`` (peak) and ``VmRSS`` (now) of this process, MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def whole_process(args) -> list[float]:
    """Peak RSS of each run of the command, MB: each run in a fresh parent whose only child it is
    (``ru_maxrss`` of the children is the largest child so far)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    command = [
        sys.executable,
        "-c",
        "import sys; from llamakin.cli import main; sys.exit(main())",  # the `llamakin` script
        "generate",
        "--chat",
        PROMPT,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--quantize",
        args.quantize,
    ]
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    peaks = []
    for _ in range(args.rounds):
        out = subprocess.run(
            [sys.executable, "-c", probe, *command],
            env=env,
            check=True,
            text=True,
            capture_output=True,
        )
        peaks.append(int(out.stdout.split()[-1]) / 1024)
    return peaks


def phases(args) -> list[dict]:
    rows = []
    clearable = reset_peak()

    def mark(name: str, started: float) -> None:
        rows.append(
            {"phase": name, **status_mb(), "seconds": round(time.perf_counter() - started, 2)}
        )
        reset_peak()

    t = time.perf_counter()
    mark("interpreter (+ this script's imports)", t)
    t = time.perf_counter()
    import llamakin.cli  # noqa: F401  (what `llamakin generate` imports before anything else)

    mark("import llamakin.cli", t)
    import llamakin
    from llamakin.catalog import DEFAULT_MODEL, pull
    from llamakin.generate import GenerationRun, SamplingParams, encode_prompt

    path = pull(DEFAULT_MODEL)
    t = time.perf_counter()
    model = llamakin.load(path, quantize=None if args.quantize == "none" else args.quantize)
    mark(f"load (quantize={args.quantize})", t)
    t = time.perf_counter()
    tokenizer = llamakin.load_tokenizer(path)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": PROMPT}])
    mark("tokenizer + chat template", t)
    t = time.perf_counter()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    for _ in GenerationRun(model, tokenizer, [ids], params):  # what `generate` streams
        pass
    mark(f"generate {args.max_new_tokens} tokens", t)
    if not clearable:
        rows.append({"note": "/proc/self/clear_refs not writable: VmHWM is cumulative"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--phases-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from llamakin.hardware import describe_cpu

    print(describe_cpu(), flush=True)
    if not args.phases_only:
        peaks = whole_process(args)
        print(
            json.dumps(
                {
                    "llamakin generate, peak RSS of the process (MB)": [round(p) for p in peaks],
                    "median": round(statistics.median(peaks)),
                }
            ),
            flush=True,
        )
    for row in phases(args):
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    print(f"loadavg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
