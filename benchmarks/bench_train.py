"""Training throughput: llamakin vs transformers on the paper recipes, same loop, batch and length.

For ``baseline-paper-small`` (transformers' LlamaForCausalLM) and ``diff-paper-small``
(DiffLlamaForCausalLM): both models get the same configuration (the same parameter count, checked)
and the same loop (fused AdamW, cross-entropy, backward, gradient clipping, step) on the same random
batches (llamakin's cross-entropy is the training loop's, the head fused into it:
``llamakin.train.loss.token_loss_sum``; transformers' is ``F.cross_entropy`` over its logits); steps alternate between the two and the medians are compared. On CPU: float32 for
both, then llamakin's own bfloat16 autocast against its float32. On CUDA (``--device cuda``):
bfloat16 autocast for both, with each one's MFU against the device's measured bf16 matmul rate.

    .venv/bin/python benchmarks/bench_train.py [--steps 6] [--batch 4] [--seq 256] [--device cuda]
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
from llamakin.model import Transformer  # noqa: E402
from llamakin.train.config import RECIPES  # noqa: E402
from llamakin.train.loop import flops_per_token, measured_peak_flops  # noqa: E402
from llamakin.train.loss import token_loss_sum  # noqa: E402

VOCAB = 49152  # SmolLM2's tokenizer, as the recipes use


def transformers_twin(config):
    import transformers

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        head_dim=config.head_dim,
    )
    if config.attention_kind == "differential":
        return transformers.DiffLlamaForCausalLM(transformers.DiffLlamaConfig(**common))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(model, hf: bool, precision: str, device: str = "cpu"):
    # as `llamakin train`
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step(x, y):
        x, y = x.to(device), y.to(device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            if hf:  # transformers' logits, then the cross-entropy over them
                logits = model(x).logits
            else:  # the training loop's own loss: the head fused into it, chunk by chunk
                loss = token_loss_sum(model, x, y) / y.numel()
        if hf:
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return x.numel() / (time.perf_counter() - start)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--recipes", nargs="+", default=["baseline-paper-small", "diff-paper-small"]
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--no-bf16",
        action="store_true",
        help="skip llamakin's CPU bf16-vs-fp32 row (slow on CPUs that emulate bf16)",
    )
    args = parser.parse_args()
    print(describe_cpu(), f"; load average {os.getloadavg()}", flush=True)
    precision = "bfloat16" if args.device == "cuda" else "float32"
    peak = measured_peak_flops(torch.device(args.device), precision)
    torch.manual_seed(0)
    batches = [
        (
            torch.randint(0, VOCAB, (args.batch, args.seq)),
            torch.randint(0, VOCAB, (args.batch, args.seq)),
        )
        for _ in range(args.steps + 1)
    ]
    rows = []
    for name in args.recipes:
        config = RECIPES[name].model_config(VOCAB)
        ours, theirs = Transformer(config).train(), transformers_twin(config).train()
        n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
        assert n_ours == n_theirs, (n_ours, n_theirs)
        ours, theirs = ours.to(args.device), theirs.to(args.device)
        steps = {
            "llamakin": make_step(ours, False, precision, args.device),
            "transformers": make_step(theirs, True, precision, args.device),
        }
        speeds = {k: [] for k in steps}
        for i, (x, y) in enumerate(batches):
            for key, step in steps.items():
                speed = step(x, y)
                if i:  # the first step warms up allocators and kernels
                    speeds[key].append(speed)
        o, t = statistics.median(speeds["llamakin"]), statistics.median(speeds["transformers"])
        per_token = flops_per_token(ours, args.seq)
        rows.append(
            {
                "recipe": name,
                "parameters": n_ours,
                "llamakin tok/s": round(o, 1),
                "transformers tok/s": round(t, 1),
                "ratio": round(o / t, 2),
                "llamakin MFU": round(o * per_token / peak, 3),
                "transformers MFU": round(t * per_token / peak, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if args.device == "cuda" or args.no_bf16:
            continue
        bf16 = make_step(ours, False, "bfloat16")
        bf16_speeds = [bf16(x, y) for x, y in batches[:3]][1:]
        rows[-1]["llamakin bf16 tok/s"] = round(statistics.median(bf16_speeds), 1)
        rows[-1]["bf16 speed-up"] = round(statistics.median(bf16_speeds) / o, 2)
        print(json.dumps(rows[-1]), flush=True)
        del ours, theirs
    print(f"load average after: {os.getloadavg()}")
    print(
        f"\nbatch {args.batch} x {args.seq}, {args.device}, {precision} unless noted, "
        f"measured matmul peak {peak / 1e12:.2f} TFLOP/s, {torch.get_num_threads()} CPU threads"
    )
    print(
        "| recipe | parameters | llamakin tok/s | transformers tok/s | ratio | MFU llamakin / transformers "
        "| llamakin bf16 tok/s | bf16 vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['parameters']:,} | {r['llamakin tok/s']} | {r['transformers tok/s']} | "
            f"{r['ratio']}x | {r['llamakin MFU']} / {r['transformers MFU']} | "
            f"{r.get('llamakin bf16 tok/s', '-')} | {str(r['bf16 speed-up']) + 'x' if 'bf16 speed-up' in r else '-'} |"
        )


if __name__ == "__main__":
    main()
