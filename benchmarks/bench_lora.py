"""LoRA training: llamakin vs PEFT + transformers on the same base, rank, targets, batch and length.

Both sides load the same Hugging Face directory (the catalog's default model, SmolLM2-135M-Instruct,
converted from its GGUF once) in float32, put rank-r adapters on the same projections (dropout 0,
so both compute exactly the same function), and run the same step (forward, cross-entropy,
backward, gradient clipping, fused AdamW over the adapters only) on the same random batches.
llamakin's loss is the training loop's (:func:`llamakin.train.loss.token_loss_sum`: the output
head fused into the cross-entropy, chunk by chunk); PEFT's is ``F.cross_entropy`` over
``model(input_ids).logits``, which is what transformers' own ``labels=`` loss computes too
(``ForCausalLMLoss``: the logits in float32, then ``F.cross_entropy``).
Steps alternate between the two in one process; medians are compared. Peak memory is measured
in a fresh process per side (peak RSS in training, and its growth over the loaded model), with
the bytes the model holds (parameters and buffers: the frozen base plus the adapters).

``peft-bf16-base`` (with ``--precision bfloat16``): PEFT on a base loaded in bfloat16, as many
PEFT recipes do; faster for transformers, but not the same function (bf16 residual stream).
QLoRA sides (``--sides llamakin,qlora-int4,qlora-int8``): llamakin with the frozen base held as
int4 (groups of 32) or int8 weight-only (``lora.quantize``), the same adapters in float32.

    .venv/bin/python benchmarks/bench_lora.py [--batch 2] [--seq 128] [--steps 5] [--rank 16]
        [--precision float32|bfloat16]
    .venv/bin/python benchmarks/bench_lora.py --sides llamakin,qlora-int4,qlora-int8 [--no-speed]

The machine may be shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import llamakin  # noqa: E402
from llamakin.catalog import DEFAULT_MODEL, home  # noqa: E402
from llamakin.hardware import describe_cpu  # noqa: E402
from llamakin.lora import LoraSettings, apply_lora  # noqa: E402
from llamakin.lora.model import hold_frozen_matrices_in, parse_targets  # noqa: E402
from llamakin.lora.quantized import load_quantized_base, quantized_bytes  # noqa: E402
from llamakin.quant.model import release_freed_memory  # noqa: E402
from llamakin.train.loss import token_loss_sum  # noqa: E402

SIDES = ("llamakin", "peft", "peft-bf16-base", "qlora-int4", "qlora-int8")
HF_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "lm_head": "lm_head",
}


def cpu_description() -> str:
    return describe_cpu()


def hf_directory(model: str) -> Path:
    """A float32 Hugging Face directory of ``model`` (converted once into the llamakin home)."""
    from llamakin.catalog import resolve
    from llamakin.convert import convert_checkpoint

    source = Path(resolve(model))
    if source.is_dir() and (source / "config.json").is_file():
        return source
    target = home() / "bench" / (source.stem + "-hf-f32")
    if not (target / "config.json").is_file():
        convert_checkpoint(source, target, dtype="float32")
    return target


def build(side: str, directory: Path, args):
    targets = parse_targets(args.targets)
    if side == "llamakin" or side.startswith("qlora-"):
        model = (
            load_quantized_base(directory, side.removeprefix("qlora-"))
            if side.startswith("qlora-")
            else llamakin.load(directory)
        )
        apply_lora(model, LoraSettings(rank=args.rank, alpha=args.alpha, targets=targets))
        model.gradient_checkpointing = args.checkpointing
        if args.precision == "bfloat16":  # what a LoRA run under bf16 autocast does
            hold_frozen_matrices_in(model, torch.bfloat16)
    else:
        import peft
        import transformers

        # peft-bf16-base: the base loaded in bfloat16 (a common PEFT recipe; its residual stream
        # and norms' outputs are then bfloat16 too: a less precise function than the other sides')
        dtype = torch.bfloat16 if side == "peft-bf16-base" else torch.float32
        base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        if args.checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        config = peft.LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            target_modules=[HF_NAMES[t] for t in targets],
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(base, config)
    return model.train()


def make_step(model, side: str, precision: str = "float32"):
    """One training step of ``side``; ``precision="bfloat16"`` runs forward and loss under bf16
    autocast on both sides (float32 adapters; the same function on both sides: llamakin holds its
    frozen matrices in bfloat16 as a LoRA run under autocast does, which rounds them exactly as
    autocast's casts of PEFT's float32 base do), as ``train --set precision=bfloat16`` and as
    transformers' Trainer with ``bf16=True``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    mixed = precision == "bfloat16"

    def step(x, y):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            if side.startswith("peft"):  # transformers' logits, then the cross-entropy over them
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            else:  # the training loop's own loss: the head fused into it, chunk by chunk
                loss = token_loss_sum(model, x, y) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return x.numel() / (time.perf_counter() - start), loss.item()

    return step, sum(p.numel() for p in params)


def batches(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, vocab, (args.batch, args.seq), generator=g),
            torch.randint(0, vocab, (args.batch, args.seq), generator=g),
        )
        for _ in range(args.steps + 1)
    ]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(side: str, directory: Path, args) -> None:
    """Run in a fresh process: RSS after loading (freed memory handed back to the OS), then the peak
    RSS over one training step (activations, gradients and the optimizer's first allocation of its
    state), the peak counter reset after loading (``/proc/self/clear_refs``) so that loading's
    transients do not count."""
    model = build(side, directory, args)
    release_freed_memory()
    loaded = rss_mb()
    held = quantized_bytes(model) / 2**20
    step, _ = make_step(model, side, args.precision)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    for x, y in batches(args, 49152)[:1]:
        step(x, y)
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "side": side,
                "model_mb": round(held),
                "loaded_mb": round(loaded),
                "peak_mb": round(peak),
                "training_mb": round(peak - loaded),
            }
        )
    )


def memory(side: str, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--model",
        args.model,
        "--rank",
        str(args.rank),
        "--alpha",
        str(args.alpha),
        "--targets",
        args.targets,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--precision",
        args.precision,
    ] + (["--checkpointing"] if args.checkpointing else [])
    out = (
        subprocess.run(command, capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--targets", default="q,k,v,o,gate,up,down")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--precision",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: both sides under bf16 autocast (mixed precision; the float32 default "
        "compares identical arithmetic)",
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="gradient checkpointing on both sides"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-side peak-memory processes"
    )
    parser.add_argument("--no-speed", action="store_true", help="only the peak-memory processes")
    parser.add_argument(
        "--sides",
        default="llamakin,peft",
        help="comma-separated: llamakin, peft, peft-bf16-base, qlora-int4, qlora-int8 (default llamakin,peft)",
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # memory child
    args = parser.parse_args()
    directory = hf_directory(args.model)
    if args.side:
        memory_child(args.side, directory, args)
        return
    print(cpu_description())
    print(f"load average before: {os.getloadavg()}")
    sides = tuple(args.sides.split(","))
    if not set(sides) <= set(SIDES) or "llamakin" not in sides:
        parser.error(f"--sides takes llamakin and any of {', '.join(SIDES)}")
    if args.no_speed:
        rows = [memory(side, args) for side in sides]
        print(f"load average after:  {os.getloadavg()}")
        print(
            "\n| side | model (parameters + buffers) MB | RSS after loading MB | peak RSS MB | growth in training MB |"
        )
        print("|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['side']} | {row['model_mb']} | {row['loaded_mb']} | {row['peak_mb']} | {row['training_mb']} |"
            )
        return
    models = {side: build(side, directory, args) for side in sides}
    steps, trained = {}, {}
    for side in sides:
        steps[side], trained[side] = make_step(models[side], side, args.precision)
    assert len(set(trained.values())) == 1, trained  # the same adapters
    speeds = {side: [] for side in sides}
    losses = {side: [] for side in sides}
    vocab = models["llamakin"].config.vocab_size
    for i, (x, y) in enumerate(batches(args, vocab)):
        for side in sides:
            speed, loss = steps[side](x, y)
            losses[side].append(loss)
            if i:  # the first step warms up allocators and thread pools
                speeds[side].append(speed)
    medians = {side: statistics.median(speeds[side]) for side in sides}
    print(f"load average after:  {os.getloadavg()}")
    print(
        "first-step losses (LoRA sides compute the same function; QLoRA sides the quantized base's): "
        + ", ".join(f"{side} {losses[side][0]:.5f}" for side in sides)
    )
    result = {
        "model": args.model,
        "rank": args.rank,
        "targets": args.targets,
        "batch": args.batch,
        "seq": args.seq,
        "adapter_parameters": trained["llamakin"],
        "checkpointing": args.checkpointing,
        "precision": args.precision,
        **{f"{side}_tok_s": round(medians[side], 1) for side in sides},
        **{f"{side}_all": [round(v, 1) for v in speeds[side]] for side in sides},
    }
    if not args.no_memory:
        del models, steps
        for side in sides:
            mem = memory(side, args)
            for key in ("model_mb", "peak_mb", "training_mb"):
                result[f"{side}_{key}"] = mem[key]
    print(json.dumps(result))
    print("\n| side | tokens/s (median) | model MB | peak RSS MB | RSS growth in training MB |")
    print("|---|---|---|---|---|")
    for side in sides:
        print(
            f"| {side} | {result[f'{side}_tok_s']} | {result.get(f'{side}_model_mb', '-')} | "
            f"{result.get(f'{side}_peak_mb', '-')} | {result.get(f'{side}_training_mb', '-')} |"
        )
    for side in sides[1:]:
        print(
            f"llamakin / {side} tokens/s: {medians['llamakin'] / medians[side]:.2f}x (batch {args.batch} x "
            f"{args.seq}, rank {args.rank}, targets {args.targets}, {args.precision})"
        )


if __name__ == "__main__":
    main()
