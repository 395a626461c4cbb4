"""Long-budget fuzzing of hostile checkpoint files (issue 12): mutated GGUF headers (F32 and Q8_0),
safetensors headers and config.json fields, each of which must load or be refused with a
LlamakinError within a time and memory bound (the harness is tests/fuzz_files.py; `make test`
runs a short, derandomized budget of the same cases).

    .venv/bin/python benchmarks/fuzz_files.py --examples 2000 [--seed N]

Prints the number of cases run per target, how many loaded and how many were refused, the first
failure with its mutation (hypothesis shrinks it), the CPU and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st  # noqa: E402

import fuzz_files as fz  # noqa: E402
from llamakin.hardware import describe_cpu  # noqa: E402


def cpu_model() -> str:
    return describe_cpu()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases per target")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument(
        "--only",
        choices=["gguf-F32", "gguf-Q8_0", "safetensors", "config.json"],
        action="append",
        help="run only these targets (repeatable)",
    )
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; load average at start: {os.getloadavg()}")
    runs = settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seeds = fz.make_seeds(tmp / "seeds")
        config = json.loads((seeds["hf"] / "config.json").read_text())
        safetensors = (seeds["hf"] / "model.safetensors").read_bytes()

        def gguf_target(quant):
            original = seeds[quant].read_bytes()

            @given(st.data())
            def case(data):
                mutated, _ = data.draw(fz.gguf_mutations(original), label="mutation")
                (tmp / "m.gguf").write_bytes(mutated)
                fz.check_load(tmp / "m.gguf", f"gguf-{quant}")

            return case

        @given(st.data())
        def safetensors_case(data):
            mutated, _ = data.draw(fz.safetensors_mutations(safetensors), label="mutation")
            fz.write_case(seeds["hf"], tmp / "ckpt")
            (tmp / "ckpt" / "model.safetensors").write_bytes(mutated)
            fz.check_load(tmp / "ckpt", "safetensors")

        @given(st.data())
        def config_case(data):
            mutated, _ = data.draw(fz.config_mutations(config), label="mutation")
            fz.write_case(seeds["hf"], tmp / "ckpt")
            (tmp / "ckpt" / "config.json").write_text(json.dumps(mutated))
            fz.check_load(tmp / "ckpt", "config.json")

        targets = {
            "gguf-F32": gguf_target("F32"),
            "gguf-Q8_0": gguf_target("Q8_0"),
            "safetensors": safetensors_case,
            "config.json": config_case,
        }
        for name, case in targets.items():
            if args.only and name not in args.only:
                continue
            case = runs(case)
            if args.seed is not None:
                case = hypothesis_seed(args.seed)(case)
            start = time.perf_counter()
            try:
                case()
                status = "ok"
            except BaseException as e:  # noqa: BLE001 - report and go on with the next target
                if isinstance(e, KeyboardInterrupt):
                    raise
                status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                failures.append((name, e))
            print(
                f"{name:12s} {fz.STATS.by_target.get(name, 0):6d} cases in {time.perf_counter() - start:6.1f} s  {status}"
            )
    print(
        f"total: {fz.STATS.cases} cases, {fz.STATS.loaded} loaded, {fz.STATS.refused} refused with a LlamakinError, "
        f"{len(failures)} target(s) failed; load average at end: {os.getloadavg()}"
    )
    for name, e in failures:
        where = [
            f"{f.filename.split('/src/')[-1]}:{f.lineno} {f.name}"
            for f in traceback.extract_tb(e.__traceback__)
            if "/src/llamakin/" in f.filename
        ]
        print(f"--- {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print("    raised at: " + " <- ".join(reversed(where[-4:])))
        for note in getattr(e, "__notes__", []):
            print("    " + note)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
