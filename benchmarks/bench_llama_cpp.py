"""llamakin against llama.cpp on the same machine and the same weights: parity, then speed.

llama.cpp is what a CPU user would run instead, and GGUF export is how llamakin hands models to
it. This script builds llama.cpp from the sources vendored in the ``llama-cpp-python`` sdist on
PyPI (the same package whose vocab test vectors the tests use; built once, ~8 minutes on 2
cores, cached under ``$LLAMAKIN_HOME/llama.cpp``), then:

1. **parity** — exports the catalog model with ``llamakin convert`` to F32 and F16 GGUF and has
   llama.cpp (through the sdist's ctypes bindings, KV cache in F32, flash attention off) tokenize
   and evaluate a few prompts: token ids must be identical and logits agree to float32 rounding;
2. **speed** — llama.cpp's own ``llama-bench`` (pp512 and tg128, 2 threads) alternating with
   llamakin's prefill of 512 tokens and batch-1 decode of 128 tokens, medians over --rounds.

    .venv/bin/python benchmarks/bench_llama_cpp.py [--rounds 3] [--skip-speed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamakin  # noqa: E402
from bench_inference import ours_decode, ours_prefill  # noqa: E402
from llamakin.catalog import home, pull  # noqa: E402
from llamakin.convert import convert_checkpoint  # noqa: E402

PACKAGE = "llama-cpp-python==0.3.36"
TOOLS = ("llama-bench", "llama-perplexity")  # built together with the llama library (for the ctypes bindings)
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return",
           "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: 2024 times!"]


def build_llama_cpp() -> tuple[Path, Path]:
    """(directory of llama.cpp's binaries and shared libraries, PYTHONPATH for its ctypes bindings)."""
    root = home() / "llama.cpp" / PACKAGE.replace("==", "-")
    source = root / "src"
    build = root / "build"
    python_path = root / "python"
    if not all((build / "bin" / tool).exists() for tool in TOOLS):
        missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
        if missing:
            sys.exit(f"building llama.cpp needs {' and '.join(missing)} on PATH (Debian: apt install cmake g++).")
        root.mkdir(parents=True, exist_ok=True)
        print(f"building llama.cpp from the {PACKAGE} sdist (once; several minutes)...", file=sys.stderr, flush=True)
        if not source.is_dir() or not any(source.iterdir()):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                            "-d", str(root)], check=True, capture_output=True)
            archive = next(root.glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(source, filter="data")
        package = next(source.iterdir())
        subprocess.run(["cmake", "-S", str(package / "vendor" / "llama.cpp"), "-B", str(build),
                        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF"], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS,
                        "llama"], check=True)
    if not (python_path / "llama_cpp").exists():
        package = next(source.iterdir())
        python_path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-r", str(package / "llama_cpp"), str(python_path)], check=True)
        (python_path / "llama_cpp" / "lib").symlink_to(build / "bin")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(python_path), "diskcache"],
                       check=True)
    return build / "bin", python_path


LLAMA_CPP_LOGITS = """
import json, sys, numpy as np, llama_cpp
path, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = llama_cpp.Llama(path, n_ctx=512, logits_all=True, verbose=False, n_threads=2,
                        type_k=0, type_v=0, flash_attn=False)  # GGML_TYPE_F32 cache: no f16 rounding
result = {}
for i, text in enumerate(prompts):
    ids = model.tokenize(text.encode(), add_bos=True, special=True)
    model.reset()
    model.eval(ids)
    np.save(f"{out}/{i}.npy", np.asarray(model.scores[:len(ids)], dtype=np.float32))
    result[i] = ids
print(json.dumps(result))
"""


@torch.no_grad()
def parity(gguf: Path, python_path: Path) -> dict:
    """Token ids and logits of llama.cpp vs llamakin on the same GGUF file."""
    out = gguf.parent / (gguf.stem + "-logits")
    out.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(python_path)}
    done = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOGITS, str(gguf), json.dumps(PROMPTS), str(out)],
                          env=env, capture_output=True, text=True, check=True)
    their_ids = json.loads(done.stdout.strip().splitlines()[-1])
    model, tok = llamakin.load(gguf), llamakin.load_tokenizer(gguf)
    worst, same_ids, same_argmax = 0.0, True, True
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text)
        same_ids &= ids == their_ids[str(i)]
        theirs = torch.from_numpy(__import__("numpy").load(out / f"{i}.npy"))
        ours = model(torch.tensor([their_ids[str(i)]])).float()[0]
        worst = max(worst, (ours - theirs).abs().max().item())
        same_argmax &= bool((ours.argmax(-1) == theirs.argmax(-1)).all())
    return {"file": gguf.name, "token ids identical": same_ids, "max |logit diff|": worst,
            "greedy tokens identical": same_argmax}


def llama_bench(binaries: Path, gguf: Path) -> dict[str, float]:
    """tokens/s of llama.cpp's pp512 and tg128 (one repetition)."""
    done = subprocess.run([str(binaries / "llama-bench"), "-m", str(gguf), "-t", "2", "-p", "512", "-n", "128",
                           "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    return {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}


def speed(binaries: Path, gguf: Path, dtype: torch.dtype, rounds: int) -> list[dict]:
    model = llamakin.load(gguf, dtype=dtype)
    one, long = torch.randint(100, 40000, (1, 1)), torch.randint(100, 40000, (1, 512))
    ours: dict[str, list[float]] = {"prefill": [], "decode": []}
    theirs: dict[str, list[float]] = {"prefill": [], "decode": []}
    ours_prefill(model, long, "cpu"), ours_decode(model, one, 8, "cpu")  # warm-up (and decode trace)
    for _ in range(rounds):
        ours["prefill"].append(ours_prefill(model, long, "cpu"))
        ours["decode"].append(ours_decode(model, one, 128, "cpu"))
        for key, value in llama_bench(binaries, gguf).items():
            theirs[key].append(value)
    rows = []
    for key, label in (("prefill", "prefill tok/s, 512 tokens"), ("decode", "decode tok/s, batch 1, 128 tokens")):
        o, t = statistics.median(ours[key]), statistics.median(theirs[key])
        name = str(dtype).removeprefix("torch.")
        rows.append({"measure": f"{label} ({gguf.stem.split('-')[-1]} file, llamakin {name})",
                     "llamakin": round(o, 1), "llama.cpp": round(t, 1), "ratio": round(o / t, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    binaries, python_path = build_llama_cpp()
    work = home() / "llama.cpp" / "exports"
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in ("F32", "F16"):
        files[kind] = work / f"smollm2-135m-instruct-{kind}.gguf"
        if not files[kind].exists():
            convert_checkpoint(pull("smollm2-135m-instruct"), files[kind], gguf_type=kind)
        print(json.dumps(parity(files[kind], python_path)), flush=True)
    if args.skip_speed:
        return
    rows = speed(binaries, files["F32"], torch.float32, args.rounds)
    rows += speed(binaries, files["F16"], torch.bfloat16, args.rounds)
    print("\n| measure | llamakin | llama.cpp | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['measure']} | {r['llamakin']} | {r['llama.cpp']} | {r['ratio']}x |")


if __name__ == "__main__":
    main()
