"""Perplexity agreement with llama.cpp, and perplexity speed against transformers and llama.cpp.

On the same text (a prefix of a built-in corpus, written to a file both tools read) and the same
GGUF files — the default model's F32 export (``llamakin convert --gguf-type F32``) and its
catalog Q4_1 file — this runs:

* ``llama-perplexity -c CONTEXT --chunks N`` (llama.cpp built from the llama-cpp-python sdist by
  ``bench_llama_cpp.build_llama_cpp``; 2 threads, KV cache in F32 and flash attention off so the
  attention arithmetic is plain float32 like llamakin's);
* ``llamakin eval perplexity --protocol llama.cpp`` (the same chunks, BOS rule and scoring);
* llamakin again with llama.cpp's *activation* quantization emulated: on this CPU llama.cpp
  multiplies a Q4_1 matrix by activations first quantized to Q8_1 (blocks of 32 values, one
  fp16 scale, ``round(x / d)`` with ``d = max|x| / 127``), and the Q8_0 output head by activations
  quantized to Q8_0 (the same rounding); llamakin multiplies the dequantized weights by float32
  activations. Emulating that rounding on every linear layer's input shows how much of the
  Q4_1 gap it explains;
* transformers' ``LlamaForCausalLM`` with the same weights (llamakin's dequantized model saved as
  a Hugging Face directory) computing the same perplexity the usual way (``labels`` with the
  first half of each chunk masked), the same chunks in the same batches.

The tokens are checked too: llama.cpp's tokenizer (ctypes bindings) against llamakin's on the text.
Agreement targets: F32 within 0.2%, Q4_1 within 1%. Speed: tokens run through the model per
second (llama.cpp: its prompt-evaluation rate), medians over --rounds, the three tools taking
turns within each round.

    LLAMAKIN_HOME=~/.llamakin .venv/bin/python benchmarks/bench_perplexity.py [--corpus wikipedia]
        [--chunks 16] [--context 512] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamakin  # noqa: E402
from bench_llama_cpp import build_llama_cpp  # noqa: E402
from llamakin.catalog import home, pull  # noqa: E402
from llamakin.convert import convert_checkpoint  # noqa: E402
from llamakin.corpora import corpus_file  # noqa: E402
from llamakin.evaluate import adds_bos, llama_cpp_chunks, llama_cpp_tokenize, perplexity  # noqa: E402
from llamakin.hardware import describe_cpu  # noqa: E402


def cpu_description() -> str:
    return describe_cpu()


# -- llama.cpp ---------------------------------------------------------------------------------------
def llama_perplexity(binaries: Path, gguf: Path, text: Path, context: int, chunks: int) -> dict:
    done = subprocess.run(
        [
            str(binaries / "llama-perplexity"),
            "-m",
            str(gguf),
            "-f",
            str(text),
            "-c",
            str(context),
            "--chunks",
            str(chunks),
            "-t",
            "2",
            "-b",
            str(4 * context),
            "-ctk",
            "f32",
            "-ctv",
            "f32",
            "-fa",
            "off",
        ],
        capture_output=True,
        text=True,
    )
    log = done.stdout + done.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if done.returncode != 0 or not final:
        sys.exit(f"llama-perplexity failed:\n{log[-3000:]}")
    # its speed: "prompt eval time = X ms / N tokens" where printed, else the first pass (n_seq chunks
    # of the 4 * context batch) from "X seconds per pass"
    rate = re.search(r"prompt eval time =\s*([0-9.]+) ms /\s*(\d+) tokens", log)
    per_pass = re.search(r"([0-9.]+) seconds per pass", log)
    if rate:
        tokens_per_second = int(rate.group(2)) / (float(rate.group(1)) / 1000)
    elif per_pass:
        tokens_per_second = min(4, chunks) * context / float(per_pass.group(1))
    else:
        tokens_per_second = float("nan")
    return {
        "perplexity": float(final.group(1)),
        "stderr": float(final.group(2)),
        "tokens_per_second": tokens_per_second,
    }


LLAMA_CPP_TOKENS = """
import json, sys, llama_cpp
vocab = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False)
text = open(sys.argv[2], encoding="utf-8").read()
text = text[:-1] if text.endswith("\\n") else text
# add_bos=True is llama_tokenize's add_special: BOS only where the vocabulary adds it (common_tokenize(..., true))
print(json.dumps(vocab.tokenize(text.encode(), add_bos=True, special=False)))
"""


def llama_cpp_token_ids(python_path: Path, gguf: Path, text: Path) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP_TOKENS, str(gguf), str(text)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(python_path)},
    )
    if done.returncode != 0:
        return []
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- activation quantization as llama.cpp's CPU kernels do it -------------------------------------------
def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 / Q8_1 rounding of the last dimension in blocks of 32: ``round(x / d) * fp16(d)``,
    ``d = max|x| / 127`` (ggml's ``quantize_row_q8_1_ref``; the quantized values are the same for Q8_0)."""
    shape = x.shape
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    # roundf: half away from zero; torch.round: half to even (ties are rare)
    q = torch.round(blocks * inverse)
    return (q * d.half().float()).reshape(shape).to(x.dtype)


class EmulatedActivationQuantization:
    """Inside ``with``: every linear layer's input (attention and MLP projections, and the output
    head through the final norm's output) is rounded as llama.cpp's quantized matmuls round it."""

    def __init__(self, model):
        self.model, self.handles = model, []

    def __enter__(self):
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear):
                self.handles.append(
                    module.register_forward_pre_hook(
                        lambda m, args: (quantize_activations_q8(args[0]),)
                    )
                )
        self.handles.append(
            self.model.final_norm.register_forward_hook(
                lambda m, args, out: quantize_activations_q8(out)
            )
        )
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


# -- transformers ------------------------------------------------------------------------------------
@torch.inference_mode()
def transformers_perplexity(hf, windows, batch_size: int) -> tuple[float, float]:
    """(perplexity, seconds): each chunk's second half as labels, the loss summed over tokens."""
    total, count = 0.0, 0
    start = time.perf_counter()
    for s in range(0, len(windows), batch_size):
        batch = windows[s : s + batch_size]
        ids = torch.tensor([w.ids for w in batch])
        labels = ids.clone()
        labels[
            :, : batch[0].score_from + 1
        ] = -100  # positions predicted from the first half's logits
        logits = hf(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    seconds = time.perf_counter() - start
    import math

    return math.exp(total / count), seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", default="wikipedia", choices=["wikipedia", "shakespeare", "kjv"]
    )
    parser.add_argument(
        "--chars",
        type=int,
        default=200_000,
        help="characters of the corpus written to the text file",
    )
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        f"CPU: {cpu_description()}; torch {torch.__version__}; load average {os.getloadavg()}",
        flush=True,
    )
    binaries, python_path = build_llama_cpp()
    work = home() / "llama.cpp" / "exports"
    work.mkdir(parents=True, exist_ok=True)
    files = {"F32": work / "smollm2-135m-instruct-F32.gguf", "Q4_1": pull("smollm2-135m-instruct")}
    if not files["F32"].exists():
        convert_checkpoint(files["Q4_1"], files["F32"], gguf_type="F32")
    text_file = work / f"{args.corpus}-{args.chars}.txt"
    text_file.write_text(
        corpus_file(args.corpus).read_text(encoding="utf-8")[: args.chars], encoding="utf-8"
    )
    text = text_file.read_text(encoding="utf-8")
    print(
        f"text: the first {args.chars:,} characters of the {args.corpus} corpus ({text_file}); context "
        f"{args.context}, {args.chunks} chunks, batch {args.batch}",
        flush=True,
    )

    rows, speed = [], []
    for kind, gguf in files.items():
        model, tok = llamakin.load(gguf, dtype=torch.float32), llamakin.load_tokenizer(gguf)
        ours_ids = llama_cpp_tokenize(tok, text[:-1] if text.endswith("\n") else text)
        theirs_ids = llama_cpp_token_ids(python_path, gguf, text_file)
        same = ours_ids == theirs_ids
        print(
            f"{kind}: token ids identical to llama.cpp's: {same} ({len(ours_ids):,} tokens)",
            flush=True,
        )
        run = dict(
            context=args.context,
            protocol="llama.cpp",
            max_chunks=args.chunks,
            batch_size=args.batch,
        )
        windows = llama_cpp_chunks(
            ours_ids, args.context, tok.bos_token_id if adds_bos(tok) else None, args.chunks
        )
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        perplexity(model, tok, text[:20000], **{**run, "max_chunks": 1})  # warm-ups
        transformers_perplexity(hf, windows[:1], 1)
        # the three tools take turns in every round, so a machine whose load changes during the
        # run slows each of them alike
        ours_runs, theirs_runs, hf_runs = [], [], []
        for _ in range(args.rounds):
            ours_runs.append(perplexity(model, tok, text, **run))
            hf_runs.append(transformers_perplexity(hf, windows, args.batch))
            theirs_runs.append(
                llama_perplexity(binaries, gguf, text_file, args.context, args.chunks)
            )
        ours, theirs = ours_runs[-1], theirs_runs[-1]
        with EmulatedActivationQuantization(model):
            emulated = perplexity(model, tok, text, **run) if kind == "Q4_1" else None
        ratio = ours.perplexity / theirs["perplexity"]
        tolerance = 0.002 if kind == "F32" else 0.01
        row = {
            "file": kind,
            "llamakin": round(ours.perplexity, 4),
            "llamakin stderr": round(ours.stderr, 4),
            "llama.cpp": theirs["perplexity"],
            "llama.cpp stderr": theirs["stderr"],
            "ratio": round(ratio, 5),
            "within": f"{tolerance:.1%}",
            "agrees": abs(ratio - 1) <= tolerance,
            "tokens scored": ours.tokens,
        }
        if emulated is not None:
            gap = theirs["perplexity"] - ours.perplexity
            row["llamakin with llama.cpp's activation rounding"] = round(emulated.perplexity, 4)
            row["share of the gap explained"] = (
                round((emulated.perplexity - ours.perplexity) / gap, 3) if gap else None
            )
        rows.append(row)
        print(json.dumps(row), flush=True)

        hf_ppl = hf_runs[-1][0]
        tokens = sum(len(w.ids) for w in windows)
        ours_rate = statistics.median(r.tokens_per_second for r in ours_runs)
        hf_rate = statistics.median(tokens / s for _, s in hf_runs)
        cpp_rate = statistics.median(r["tokens_per_second"] for r in theirs_runs)
        speed.append(
            {
                "file": kind,
                "llamakin tok/s": round(ours_rate, 1),
                "transformers tok/s": round(hf_rate, 1),
                "vs transformers": round(ours_rate / hf_rate, 2),
                "llama.cpp tok/s": round(cpp_rate, 1),
                "vs llama.cpp": round(ours_rate / cpp_rate, 2),
                "transformers perplexity": round(hf_ppl, 4),
            }
        )
        print(json.dumps(speed[-1]), flush=True)
        del model, hf

    print(f"\nload average after: {os.getloadavg()}")
    print("\n| file | llamakin | llama.cpp | ratio | target |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['file']} | {r['llamakin']} ± {r['llamakin stderr']} | {r['llama.cpp']} ± {r['llama.cpp stderr']} | "
            f"{r['ratio']} | {r['within']} ({'met' if r['agrees'] else 'NOT met'}) |"
        )
    print(
        "\n| file | llamakin tok/s | transformers tok/s | ratio | llama.cpp tok/s | ratio |\n|---|---|---|---|---|---|"
    )
    for s in speed:
        print(
            f"| {s['file']} | {s['llamakin tok/s']} | {s['transformers tok/s']} | {s['vs transformers']}x | "
            f"{s['llama.cpp tok/s']} | {s['vs llama.cpp']}x |"
        )


if __name__ == "__main__":
    main()
