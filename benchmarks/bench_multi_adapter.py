"""Decode steps with several LoRA adapters chosen per row (``serve --adapter NAME=DIR``) against the base.

SmolLM2-135M-Instruct in float32 with two random rank-16 adapters on the seven projections; a
batch of 4 rows on adapters [1, 2, 0, 1] decoding at a cache of 256 slots. Three configurations,
steps alternating in one run, medians compared: the base model (traced decode step), the
multi-adapter model with the traced step (the per-row indices an input of the trace), and the
same eagerly (``LLAMAKIN_TRACE=0``).

    .venv/bin/python benchmarks/bench_multi_adapter.py [--steps 20] [--rows 4]

The machine may be shared: the CPU and the load average are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamakin  # noqa: E402
from bench_lora import cpu_description  # noqa: E402
from llamakin.catalog import DEFAULT_MODEL  # noqa: E402
from llamakin.lora import LoraSettings, apply_lora, lora_layers, save_adapter  # noqa: E402
from llamakin.lora.multi import attach_adapters, select_rows  # noqa: E402
from llamakin.speed.decode_trace import Decoder  # noqa: E402


def random_adapter(model_name: str, directory: Path, seed: int) -> Path:
    model = llamakin.load(model_name)
    apply_lora(model, LoraSettings(rank=16, alpha=32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for part in layer.adapted:
                layer.lora_B[part].normal_(0, 0.01, generator=g)
    return save_adapter(model, directory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args()
    print(cpu_description())
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {
            name: random_adapter(args.model, Path(tmp) / name, seed)
            for seed, name in enumerate(("a", "b"))
        }
        base = llamakin.load(args.model).eval()
        multi = llamakin.load(args.model).eval()
        attach_adapters(multi, adapters)
    ids = [(1, 2, 0, 1)[i % 4] for i in range(args.rows)]
    configs = {
        "base, traced": (base, "1"),
        "2 adapters per row, traced": (multi, "1"),
        "2 adapters per row, eager": (multi, "0"),
    }
    times = {name: [] for name in configs}
    decoders = {}
    token = torch.full((args.rows, 1), 42)
    lengths = torch.full((args.rows,), 8)
    with torch.inference_mode():
        for name, (model, trace) in configs.items():
            os.environ["LLAMAKIN_TRACE"] = trace
            cache = model.new_cache(args.rows, 256)
            decoders[name] = Decoder(model, cache)
        for step in range(args.steps + 1):
            for name, (model, _) in configs.items():
                select_rows(model, ids)
                start = time.perf_counter()
                decoders[name].step_rows(token, lengths[:, None], lengths)
                if step:  # the first step warms up
                    times[name].append(time.perf_counter() - start)
    print(f"load average after:  {os.getloadavg()}")
    base_ms = statistics.median(times["base, traced"]) * 1e3
    print(
        f"\n| {args.rows} rows, cache 256 | ms per decode step (median of {args.steps}) | vs base |"
    )
    print("|---|---|---|")
    for name in configs:
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {ms:.1f} | {ms / base_ms:.2f}x |")


if __name__ == "__main__":
    main()
