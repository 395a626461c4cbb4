"""Hostile-file fuzzing shared by ``tests/test_fuzz_files.py`` (a short budget in ``make test``) and
``benchmarks/fuzz_files.py`` (a long one that reports how many cases ran).

Three targets, each mutated by ``hypothesis`` from a real, loadable checkpoint:

* GGUF: the header's scalar fields (metadata values, tensor dims, ggml types and offsets) set to
  boundary values, random byte flips inside the header, and truncation;
* safetensors: the JSON header's dtypes, shapes and data offsets, dropped or added entries, a
  wrong length prefix, truncation;
* ``config.json``: any field set to a boundary value of another type (0, -1, 2^20, 2^64, "64",
  "abc", 1.5, null, true, [], {}, nested rope dicts), or deleted.

Each case loads the file (and runs a 3-token forward when it loads) and must either work or raise
a :class:`~llamakin.LlamakinError`, within :data:`CASE_SECONDS` and the address-space limit the
runner sets; anything else fails the run with the offending mutation.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import strategies as st

import llamakin
from llamakin import LlamakinError

CASE_SECONDS = 30  # a liveness bound per case (the slowest legitimate case takes well under 1 s)
MEMORY_HEADROOM = 3 << 30  # address space a case may add to what the process already maps

INTERESTING_INTS = [
    0,
    1,
    2,
    3,
    7,
    31,
    32,
    33,
    64,
    255,
    256,
    2**15,
    2**16 - 1,
    2**20,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
]
JSON_VALUES = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            3,
            2**20,
            2**31,
            2**64,
            10**30,
            1.5,
            0.0,
            -0.5,
            1e-300,
            1e300,
            "64",
            "abc",
            "",
            None,
            True,
            False,
            [],
            {},
            [1, 2],
            [0],
            {"rope_type": "linear", "factor": "x"},
            {"rope_type": "yarn", "factor": 0},
            {"rope_type": "llama3", "factor": 8.0},
            {"type": "dynamic", "factor": -1},
            {"rope_type": 7},
            {"a": {"b": 1}},
        ]
    ),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)


@dataclass
class Stats:
    cases: int = 0
    loaded: int = 0
    refused: int = 0
    by_target: dict = field(default_factory=dict)


STATS = Stats()


# -- seeds ------------------------------------------------------------------------------------------
def make_seeds(root: Path) -> dict[str, Path]:
    """A tiny Llama checkpoint (config.json + model.safetensors) and its GGUF in F32 and Q8_0."""
    from llamakin.cli import main

    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=64,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        norm_eps=1e-5,
    )
    model = llamakin.Transformer(config)
    model.save_pretrained(root / "hf", family="llama")
    for quant in ("F32", "Q8_0"):
        assert (
            main(["convert", str(root / "hf"), str(root / f"m-{quant}.gguf"), "--gguf-type", quant])
            == 0
        )
    return {"hf": root / "hf", "F32": root / "m-F32.gguf", "Q8_0": root / "m-Q8_0.gguf"}


# -- running one case ---------------------------------------------------------------------------------
@contextlib.contextmanager
def bounded(seconds: int = CASE_SECONDS):
    """Fail a case that runs past ``seconds`` (SIGALRM) or maps more than :data:`MEMORY_HEADROOM`
    beyond what the process has now (RLIMIT_AS, restored afterwards)."""

    def late(*_):
        raise TimeoutError(f"a fuzz case ran longer than {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, late)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = _mapped_bytes()
    limit = mapped + MEMORY_HEADROOM if mapped else resource.RLIM_INFINITY
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _mapped_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_load(path: Path, target: str) -> None:
    """Load ``path``: it works (and runs 3 tokens) or raises a LlamakinError; nothing else."""
    STATS.cases += 1
    STATS.by_target[target] = STATS.by_target.get(target, 0) + 1
    with bounded():
        try:
            model = llamakin.load(path)
            with torch.no_grad():
                model(torch.tensor([[1, 2, 3]]) % model.config.vocab_size)
        except LlamakinError as e:
            assert str(e) and "\n" not in str(e).strip(), (
                f"a LlamakinError of more than one line: {e}"
            )
            STATS.refused += 1
            return
    STATS.loaded += 1


# -- GGUF -----------------------------------------------------------------------------------------------
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def gguf_fields(data: bytes) -> tuple[list[tuple[str, int, str]], int]:
    """The scalar fields of a GGUF header as (what, offset, struct format), and the header's end."""
    pos = 0
    fields: list[tuple[str, int, str]] = []

    def take(fmt: str, what: str | None = None):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        if what is not None:
            fields.append((what, pos, fmt))
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = data[pos : pos + n].decode("utf-8", "replace")
        pos += n
        return s

    def value(kind: int, what: str):
        nonlocal pos
        if kind in _SCALAR:
            take(_SCALAR[kind], what)
        elif kind == 8:
            string()
        elif kind == 9:
            item, count = take("<I"), take("<Q", f"{what}[count]")
            if item in _SCALAR:
                size = struct.calcsize(_SCALAR[item])
                for i in range(min(count, 4)):
                    fields.append((f"{what}[{i}]", pos + i * size, _SCALAR[item]))
                pos += count * size
            else:
                for i in range(count):
                    value(item, f"{what}[{i}]")

    take("<I"), take("<I", "version")
    n_tensors, n_kv = take("<Q", "n_tensors"), take("<Q", "n_kv")
    for _ in range(n_kv):
        key = string()
        kind = take("<I", f"{key}:type")
        value(kind, key)
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I", f"{name}:n_dims")
        for d in range(n_dims):
            take("<Q", f"{name}:dim{d}")
        take("<I", f"{name}:ggml_type")
        take("<Q", f"{name}:offset")
    return fields, pos


@st.composite
def gguf_mutations(draw, data: bytes):
    """A mutated copy of a GGUF file's bytes and a description of what was done."""
    fields, header_end = gguf_fields(data)
    out = bytearray(data)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "field", "flip", "truncate"]))
        if kind == "field":
            what, offset, fmt = draw(st.sampled_from(fields))
            if fmt in ("<f", "<d"):
                v = draw(
                    st.sampled_from([0.0, -1.0, 1e-45, 1e38, float("inf"), float("nan"), 2.0**20])
                )
            elif fmt == "<?":
                v = draw(st.booleans())
            else:
                bits = 8 * struct.calcsize(fmt)
                raw = draw(
                    st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(0, 2**bits - 1))
                )
                v = raw % (2**bits)
                if fmt.islower() or fmt[-1] in "bhiq":  # signed formats
                    v = v - 2**bits if v >= 2 ** (bits - 1) else v
            struct.pack_into(fmt, out, offset, v)
            done.append(f"{what}={v!r}")
        elif kind == "flip":
            at = draw(st.integers(0, header_end - 1))
            out[at] = draw(st.integers(0, 255))
            done.append(f"byte {at}={out[at]}")
        else:
            cut = draw(st.integers(0, len(out) - 1))
            del out[cut:]
            done.append(f"truncated at {cut}")
            break
    return bytes(out), "; ".join(done)


# -- safetensors ------------------------------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "BOOL", "U8", "F8_E4M3", "XX", 3]


@st.composite
def safetensors_mutations(draw, data: bytes):
    n = struct.unpack_from("<Q", data, 0)[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    done = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["dtype", "shape", "offsets", "drop", "add", "metadata", "prefix", "truncate"]
            )
        )
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if kind == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(
                st.one_of(
                    st.lists(
                        st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-5, 5)), max_size=4
                    ),
                    st.sampled_from(["64", None, [1.5], [[2]]]),
                )
            )
        elif kind == "offsets" and isinstance(entry, dict):
            entry["data_offsets"] = draw(
                st.one_of(
                    st.lists(
                        st.one_of(
                            st.sampled_from(INTERESTING_INTS), st.integers(-10, len(body) + 10)
                        ),
                        min_size=0,
                        max_size=3,
                    ),
                    st.sampled_from(["0", None]),
                )
            )
        elif kind == "drop":
            header.pop(name, None)
        elif kind == "add":
            header[
                draw(
                    st.sampled_from(
                        ["model.layers.0.self_attn.q_proj.weight", "x", "lm_head.weight", ""]
                    )
                )
            ] = draw(
                st.sampled_from(
                    [
                        {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]},
                        {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4]},
                        5,
                        "x",
                        None,
                    ]
                )
            )
        elif kind == "metadata":
            header["__metadata__"] = draw(
                st.sampled_from([{"format": "pt"}, {"format": 3}, [], "x", None])
            )
        done.append(f"{kind} {name}")
    encoded = json.dumps(header).encode()
    prefix = len(encoded)
    if draw(st.integers(0, 9)) == 0:
        prefix = draw(st.sampled_from([0, 1, prefix - 1, prefix + 1, 2**63, 2**64 - 1]))
        done.append(f"length prefix {prefix}")
    out = struct.pack("<Q", prefix) + encoded + body
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, len(out)))
        out = out[:cut]
        done.append(f"truncated at {cut}")
    return out, "; ".join(done)


# -- config.json ------------------------------------------------------------------------------------------
EXTRA_KEYS = [
    "rope_scaling",
    "rope_parameters",
    "head_dim",
    "sliding_window",
    "partial_rotary_factor",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "eos_token_id",
    "model_type",
    "architectures",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "layer_types",
    "max_window_layers",
]


@st.composite
def config_mutations(draw, config: dict):
    mutated = json.loads(json.dumps(config))
    done = []
    keys = sorted(set(mutated) | set(EXTRA_KEYS))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 5)) == 0:
            mutated.pop(key, None)
            done.append(f"-{key}")
        else:
            mutated[key] = draw(JSON_VALUES)
            done.append(f"{key}={mutated[key]!r}")
    return mutated, "; ".join(done)


def write_case(seed_dir: Path, target_dir: Path) -> None:
    if target_dir.exists():
        shutil.rmtree(target_dir)
    shutil.copytree(seed_dir, target_dir)
