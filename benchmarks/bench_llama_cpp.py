"""llamakin against llama.cpp on the same machine and the same weights: parity, then speed.

llama.cpp is what a CPU user would run instead, and GGUF export is how llamakin hands models to
it. This script builds llama.cpp from the sources vendored in the ``llama-cpp-python`` sdist on
PyPI (the same package whose vocab test vectors the tests use; built once, ~8 minutes on 2
cores, cached under ``$LLAMAKIN_HOME/llama.cpp``), then:

1. **parity** — exports the catalog model with ``llamakin convert`` to F32 and F16 GGUF and has
   llama.cpp (through the sdist's ctypes bindings, KV cache in F32, flash attention off) tokenize
   and evaluate a few prompts: token ids must be identical and logits agree to float32 rounding;
2. **speed** — llama.cpp's own ``llama-bench`` (pp512 and tg128, 2 threads) alternating with
   llamakin's prefill of 512 tokens and batch-1 decode of 128 tokens, medians over --rounds, on
   the catalog's own Q4_1 file (llamakin ``quantize="auto"``: kept as int4), a Q8_0 export (kept
   as int8) and the F16/F32 exports (float); llamakin's batch-8 decode on the same models; peak
   RSS of each side on the Q4_1 file (fresh processes). The CPU model, flags and load are printed.

    .venv/bin/python benchmarks/bench_llama_cpp.py [--rounds 3] [--skip-speed] [--skip-parity]
        [--llama-cpp DIR] [--files Q4_1 Q8_0 F16 F32]

``--llama-cpp DIR`` uses llama.cpp binaries (``llama-bench``) already built in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
# built together with the llama library (for the ctypes bindings)
TOOLS = (
    "llama-bench",
    "llama-perplexity",
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: 2024 times!",
]


# Compiler flags that leave llama.cpp's AMX kernels out of a -march=native build (AVX-512 and VNNI
# stay): on AMX CPUs under Linux's per-thread XFD those kernels die with SIGILL, because only the
# main thread asks for AMX tile permission (ggml-org/llama.cpp pull request 26954, open in 2026).
WITHOUT_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def build_llama_cpp() -> tuple[Path, Path]:
    """(directory of llama.cpp's binaries and shared libraries, PYTHONPATH for its ctypes bindings).

    The native build, unless it dies with SIGILL on a tiny run of the default model (its AMX
    kernels, see ``WITHOUT_AMX``): then a second build without them, which is the fastest llama.cpp
    that runs on this machine. Which one is used is printed.
    """
    binaries, python_path = _build("build", [])
    if _runs(binaries):
        return binaries, python_path
    print(
        json.dumps(
            {
                "llama.cpp build": f"native with {WITHOUT_AMX}: its AMX kernels die with SIGILL "
                "on this machine (only the main thread requests AMX permission; llama.cpp pull "
                "request 26954)"
            }
        ),
        flush=True,
    )
    flags = [f"-DCMAKE_C_FLAGS={WITHOUT_AMX}", f"-DCMAKE_CXX_FLAGS={WITHOUT_AMX}"]
    return _build("build-no-amx", flags)


def _runs(binaries: Path) -> bool:
    """False when llama-bench dies with SIGILL on a tiny run of the default model (AMX CPUs only)."""
    with open("/proc/cpuinfo") as cpuinfo:
        if "amx_tile" not in cpuinfo.read():
            return True
    command = [str(binaries / "llama-bench"), "-m", str(pull("smollm2-135m-instruct"))]
    done = subprocess.run(
        command + ["-t", "2", "-p", "8", "-n", "2", "-r", "1", "-o", "json"], capture_output=True
    )
    return done.returncode != -signal.SIGILL


def _build(name: str, cmake_flags: list[str]) -> tuple[Path, Path]:
    """Builds llama.cpp once into ``<root>/<name>`` with ``cmake_flags`` added to the native ones."""
    root = home() / "llama.cpp" / PACKAGE.replace("==", "-")
    source = root / "src"
    build = root / name
    python_path = root / name.replace("build", "python")
    if not all((build / "bin" / tool).exists() for tool in TOOLS):
        missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
        if missing:
            sys.exit(
                f"building llama.cpp needs {' and '.join(missing)} on PATH (Debian: apt install cmake g++)."
            )
        root.mkdir(parents=True, exist_ok=True)
        print(
            f"building llama.cpp from the {PACKAGE} sdist (once; several minutes)...",
            file=sys.stderr,
            flush=True,
        )
        if not source.is_dir() or not any(source.iterdir()):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    PACKAGE,
                    "-d",
                    str(root),
                ],
                check=True,
                capture_output=True,
            )
            archive = next(root.glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(source, filter="data")
        package = next(source.iterdir())
        subprocess.run(
            [
                "cmake",
                "-S",
                str(package / "vendor" / "llama.cpp"),
                "-B",
                str(build),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                *cmake_flags,
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                "cmake",
                "--build",
                str(build),
                "-j",
                str(os.cpu_count() or 2),
                "--target",
                *TOOLS,
                "llama",
            ],
            check=True,
        )
    if not (python_path / "llama_cpp").exists():
        package = next(source.iterdir())
        python_path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-r", str(package / "llama_cpp"), str(python_path)], check=True)
        (python_path / "llama_cpp" / "lib").symlink_to(build / "bin")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--target",
                str(python_path),
                "diskcache",
            ],
            check=True,
        )
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
    done = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP_LOGITS, str(gguf), json.dumps(PROMPTS), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
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
    return {
        "file": gguf.name,
        "token ids identical": same_ids,
        "max |logit diff|": worst,
        "greedy tokens identical": same_argmax,
    }


def llama_bench(binaries: Path, gguf: Path) -> dict[str, float]:
    """tokens/s of llama.cpp's pp512 and tg128 (one repetition)."""
    done = subprocess.run(
        [
            str(binaries / "llama-bench"),
            "-m",
            str(gguf),
            "-t",
            "2",
            "-p",
            "512",
            "-n",
            "128",
            "-r",
            "1",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(done.stdout)
    return {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}


def speed(
    binaries: Path,
    gguf: Path,
    dtype: torch.dtype,
    rounds: int,
    quantize: str | None = "auto",
    label: str | None = None,
) -> list[dict]:
    model = llamakin.load(gguf, dtype=dtype, quantize=quantize)
    one, long = torch.randint(100, 40000, (1, 1)), torch.randint(100, 40000, (1, 512))
    eight = torch.randint(100, 40000, (8, 1))
    ours: dict[str, list[float]] = {"prefill": [], "decode": [], "decode8": []}
    theirs: dict[str, list[float]] = {"prefill": [], "decode": []}
    # warm-up, with the timed runs' token counts: a decode step is traced per cache length, which
    # follows the tokens asked for (powers of two from 64 slots), so the timed rounds replay traces
    (
        ours_prefill(model, long, "cpu"),
        ours_decode(model, one, 128, "cpu"),
        ours_decode(model, eight, 32, "cpu"),
    )
    for _ in range(rounds):
        ours["prefill"].append(ours_prefill(model, long, "cpu"))
        ours["decode"].append(ours_decode(model, one, 128, "cpu"))
        for key, value in llama_bench(binaries, gguf).items():
            theirs[key].append(value)
        ours["decode8"].append(ours_decode(model, eight, 32, "cpu"))
    rows = []
    kind = label or gguf.stem.split("-")[-1].split(".")[-1]
    name = str(dtype).removeprefix("torch.") + (f", quantize={quantize}" if quantize else "")
    for key, what in (
        ("prefill", "prefill tok/s, 512 tokens"),
        ("decode", "decode tok/s, batch 1, 128 tokens"),
    ):
        o, t = statistics.median(ours[key]), statistics.median(theirs[key])
        rows.append(
            {
                "measure": f"{what} ({kind} file, llamakin {name})",
                "llamakin": round(o, 1),
                "llama.cpp": round(t, 1),
                "ratio": round(o / t, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    rows.append(
        {
            "measure": f"decode tok/s, batch 8 ({kind} file, llamakin {name})",
            "llamakin": round(statistics.median(ours["decode8"]), 1),
            "llama.cpp": "-",
            "ratio": "-",
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    return rows


RSS_OURS = """
import sys, torch
sys.path.insert(0, {src!r})
import llamakin
m = llamakin.load({path!r}, quantize={quantize!r})
tok = llamakin.load_tokenizer({path!r})
llamakin.generate(m, tok, "Hello there", max_new_tokens=16, temperature=0.0)
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)
"""

RSS_THEIRS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], capture_output=True, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def peak_rss(binaries: Path, gguf: Path) -> list[dict]:
    """Peak resident memory (MiB) of llamakin loading the file and generating 16 tokens, and of
    llama.cpp's llama-bench decoding 16 tokens (both fresh processes). llamakin twice: as it runs
    by default (16 tokens step eagerly: no trace recorded) and with ``LLAMAKIN_TRACE_AFTER=0``
    (the step traced from the first token, what longer generations do)."""
    src = str(Path(__file__).resolve().parents[1] / "src")

    def ours(trace_after: str | None) -> float:
        env = {k: v for k, v in os.environ.items() if k != "LLAMAKIN_TRACE_AFTER"}
        if trace_after is not None:
            env["LLAMAKIN_TRACE_AFTER"] = trace_after
        done = subprocess.run(
            [sys.executable, "-c", RSS_OURS.format(src=src, path=str(gguf), quantize="auto")],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        return float(done.stdout.split()[-1])

    theirs = subprocess.run(
        [
            sys.executable,
            "-c",
            RSS_THEIRS,
            str(binaries / "llama-bench"),
            "-m",
            str(gguf),
            "-t",
            "2",
            "-p",
            "0",
            "-n",
            "16",
            "-r",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    t = float(theirs.stdout.split()[-1])
    rows = []
    for label, trace_after in (("", None), (", decode traced from the first token", "0")):
        o = ours(trace_after)
        rows.append(
            {
                "measure": f"peak RSS MiB ({gguf.name}; llamakin quantize=auto incl. Python + "
                f"torch{label})",
                "llamakin": round(o),
                "llama.cpp": round(t),
                "ratio": round(o / t, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cpu_description() -> str:
    from bench_quant_kernels import cpu_line

    return cpu_line()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument(
        "--llama-cpp", type=Path, help="directory of already built llama.cpp binaries"
    )
    parser.add_argument(
        "--files",
        nargs="+",
        default=["Q4_1", "Q8_0", "F16", "F32"],
        choices=["Q4_1", "Q8_0", "F16", "F32"],
    )
    args = parser.parse_args()
    print(json.dumps({"cpu": cpu_description(), "loadavg": os.getloadavg()}), flush=True)
    if args.llama_cpp:
        binaries, python_path = args.llama_cpp, None
    else:
        binaries, python_path = build_llama_cpp()
    work = home() / "llama.cpp" / "exports"
    work.mkdir(parents=True, exist_ok=True)
    files = {"Q4_1": pull("smollm2-135m-instruct")}
    for kind in ("F32", "F16", "Q8_0"):
        files[kind] = work / f"smollm2-135m-instruct-{kind}.gguf"
        needed = kind in args.files or (kind != "Q8_0" and not args.skip_parity)
        if needed and not files[kind].exists():
            convert_checkpoint(pull("smollm2-135m-instruct"), files[kind], gguf_type=kind)
        if needed and kind != "Q8_0" and not args.skip_parity and python_path is not None:
            print(json.dumps(parity(files[kind], python_path)), flush=True)
    if args.skip_speed:
        return
    rows = []
    settings = {
        "Q4_1": (torch.float32, "auto"),
        "Q8_0": (torch.float32, "auto"),
        "F32": (torch.float32, None),
        "F16": (torch.bfloat16, None),
    }
    for kind in args.files:
        dtype, quantize = settings[kind]
        rows += speed(binaries, files[kind], dtype, args.rounds, quantize, label=kind)
    if "Q4_1" in args.files:
        rows.extend(peak_rss(binaries, files["Q4_1"]))
    print(f"\nCPU: {cpu_description()}")
    print("\n| measure | llamakin | llama.cpp | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['measure']} | {r['llamakin']} | {r['llama.cpp']} | {r['ratio']}x |")


if __name__ == "__main__":
    main()
