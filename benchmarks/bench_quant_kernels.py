"""PyTorch's weight-only quantized CPU kernels on one SmolLM2-135M token's products, on this machine.

The matrices of one decode step of SmolLM2-135M in llamakin's fused layout (30 layers of qkv
960x576, o 576x576, gate_up 3072x576, down 576x1536, then the 49152x576 head: 121 products, all
distinct so the weights stream from memory as in real decoding), timed per kernel and activation
dtype, for 1 row (decode), 8 rows (batched decode) and 512 rows (prefill, the fastest kernels
only). Prints the CPU model, its flags that matter, the load average, milliseconds per token
(medians) and each kernel's max error against float32 ``F.linear`` of the dequantized weights.

    .venv/bin/python benchmarks/bench_quant_kernels.py [--rows 1 8] [--repeats 5]
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from llamakin.hardware import describe_cpu  # noqa: E402
from llamakin.model.linear import linear as llamakin_linear  # noqa: E402
from llamakin.quant import kernels  # noqa: E402
from llamakin.quant.tensors import quantize_int4, quantize_int8  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def cpu_line() -> str:
    return describe_cpu()


def time_products(fn, weights, x, repeats: int) -> float:
    """Median milliseconds of one pass over every weight."""
    for w in weights[:8]:
        fn(x[w[1]], w[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(x[w[1]], w[0])
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", nargs="*", default=None, help="subset of kernel names to run")
    parser.add_argument(
        "--layers", type=int, default=30, help="fewer layers for quicker prefill rows"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 gives stable rankings on a machine shared with other work)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global SHAPES
    SHAPES = SHAPES[: 4 * args.layers] + SHAPES[-1:]
    print(cpu_line(), flush=True)
    torch.manual_seed(0)
    floats = [torch.randn(n, k) * 0.05 for n, k in SHAPES]
    int8 = [quantize_int8(w) for w in floats]
    int4 = [quantize_int4(w, 32) for w in floats]
    int8_deq = [q.dequantize() for q in int8]
    int4_deq = [q.dequantize() for q in int4]
    bf16 = [w.to(torch.bfloat16) for w in floats]

    candidates = {
        "fp32 llamakin.linear": (lambda x, w: llamakin_linear(x, w), floats, torch.float32),
        "bf16 F.linear": (lambda x, w: F.linear(x, w), bf16, torch.bfloat16),
    }
    for act in (torch.float32, torch.bfloat16, torch.float16):
        name = str(act).removeprefix("torch.")
        candidates[f"int8pack_mm {name}"] = (
            lambda x, q: torch.ops.aten._weight_int8pack_mm(x, q.qweight, q.scales.to(x.dtype)),
            int8,
            act,
        )
        candidates[f"int4pack_mm {name}"] = (kernels.int4_product_fn(act), int4, act)
    if kernels.fbgemm_available():
        candidates["fbgemm linear_dynamic fp32"] = (
            kernels.fbgemm_linear,
            [kernels.pack_fbgemm(q) for q in int8],
            torch.float32,
        )
    candidates["int4 dequant->fp32 slices"] = (kernels.int4_dequant_product, int4, torch.float32)

    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k in (576, 1536)}
        chosen = {
            n: c
            for n, c in candidates.items()
            if not args.kernels or any(n.startswith(k) for k in args.kernels)
        }
        times: dict[str, list[float]] = {n: [] for n in chosen}
        errors: dict[str, float] = {}
        with torch.no_grad():
            for name, (fn, weights, act) in chosen.items():
                x = {k: v.to(act) for k, v in xs.items()}
                # error on the first (qkv) matrix against its dequantized weight in float32
                ref_w = (
                    int8_deq[0]
                    if "int8" in name or "fbgemm" in name
                    else int4_deq[0]
                    if "int4" in name
                    else floats[0]
                )
                errors[name] = (
                    (fn(x[576], weights[0]).float() - F.linear(xs[576], ref_w)).abs().max().item()
                )
            # kernels interleaved, so load changes hit all of them alike
            for _ in range(args.repeats):
                for name, (fn, weights, act) in chosen.items():
                    x = {k: v.to(act) for k, v in xs.items()}
                    pairs = [(w, w_k) for w, (_, w_k) in zip(weights, SHAPES)]
                    times[name].append(time_products(fn, pairs, x, 1))
        for name in chosen:
            print(
                json.dumps(
                    {
                        "rows": rows,
                        "kernel": name,
                        "ms per token (median)": round(statistics.median(times[name]), 2),
                        "min": round(min(times[name]), 2),
                        "max err vs fp32 of the same weight": float(f"{errors[name]:.3g}"),
                    }
                ),
                flush=True,
            )
    print(f"loadavg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
