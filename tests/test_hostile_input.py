"""Hostile files, configs and command lines (issue 12, items 7, 9 and 10): each is refused with one
sentence, before anything is allocated, or handled, never a raw exception, a hang or a TB allocation."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import llamakin
from llamakin import CheckpointError, ConfigError, LlamakinError
from llamakin.cli import main
from hf_cases import CASES, Case, save_case

gguf = pytest.importorskip("gguf")


def one_sentence(message: str) -> None:
    assert message and "\n" not in message and message.rstrip().endswith((".", ")")), message
    assert "Traceback" not in message


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """A liveness guard (not a timing assertion): the old code hung here for many minutes."""

    def fail(*_):
        raise AssertionError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    save_case(next(c for c in CASES if c.name == "llama"), directory)
    return directory


def clone(good, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(good, target)
    return target


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args):
    """``llamakin ARGS`` in this process (a subprocess costs seconds of imports; one test below
    runs the real executable)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return Result(code, out.getvalue(), err.getvalue())


def assert_cli_refuses(result, fragment):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr, result.stderr


# -- item 7: the model's size is checked against the file and the machine before building it -------
def header_only_gguf(path, **metadata) -> None:
    """A GGUF of metadata only (a couple of KB), as a hostile or truncated-by-design file would be."""
    writer = gguf.GGUFWriter(str(path), "llama")
    values = {
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.context_length": 64,
        "llama.vocab_size": 32,
        **metadata,
    }
    for key, value in values.items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_float32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "metadata", [{"llama.block_count": 10**6}, {"llama.embedding_length": 2**20}]
)
def test_gguf_declaring_a_huge_model_is_refused_from_its_header(tmp_path, metadata):
    header_only_gguf(tmp_path / "m.gguf", **metadata)
    assert (tmp_path / "m.gguf").stat().st_size < 4096
    with (
        no_hang(),
        pytest.raises(
            CheckpointError, match="parameters but the file stores only 0 values"
        ) as info,
    ):
        llamakin.load(tmp_path / "m.gguf")
    one_sentence(str(info.value))


@pytest.mark.parametrize("quantize", ["auto", "int8", "int4"])
def test_quantized_loading_checks_the_size_too(tmp_path, quantize):
    header_only_gguf(tmp_path / "m.gguf", **{"llama.block_count": 10**6})
    with (
        no_hang(),
        pytest.raises(
            CheckpointError, match="parameters but the file stores only 0 values"
        ) as info,
    ):
        llamakin.load(tmp_path / "m.gguf", quantize=quantize)
    one_sentence(str(info.value))


def test_converting_a_gguf_without_tensors(tmp_path):
    header_only_gguf(tmp_path / "m.gguf")
    assert_cli_refuses(
        run_cli("convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")), "holds no tensors"
    )


def test_config_json_with_a_huge_hidden_size_is_refused_before_allocating(good, tmp_path):
    directory = clone(good, tmp_path)
    edit_config(directory, hidden_size=2**20, head_dim=None)
    with no_hang(), pytest.raises(CheckpointError, match="describes a model of") as info:
        llamakin.load(directory)
    one_sentence(str(info.value))


def test_sizes_beyond_torch_arithmetic_are_refused(good, tmp_path):
    """Found by benchmarks/fuzz_files.py: a GGUF whose sizes overflow torch's storage-size arithmetic
    (even on the meta device) raised a raw RuntimeError."""
    directory = clone(good, tmp_path)
    edit_config(directory, vocab_size=2**31 + 128, hidden_size=2**30 + 64, head_dim=16)
    with no_hang(), pytest.raises(CheckpointError, match="far beyond any memory") as info:
        llamakin.load(directory)
    one_sentence(str(info.value))


def test_a_model_larger_than_memory_is_refused(good, monkeypatch):
    from llamakin import validation

    monkeypatch.setattr(validation, "memory_available", lambda device: 10_000)
    with pytest.raises(LlamakinError, match="but cpu has only 10.0 KB available") as info:
        llamakin.load(good)
    one_sentence(str(info.value))
    monkeypatch.setattr(validation, "memory_available", lambda device: 10**9)
    llamakin.load(good)  # the same model loads when it fits


def test_parameter_count_matches_the_built_model():
    from llamakin.validation import parameter_count

    for changes in (
        dict(),
        dict(num_layers=5, tie_word_embeddings=True),
        dict(attention_kind="differential"),
        dict(qk_norm=True, q_bias=True, k_bias=True, v_bias=True, num_layers=3),
    ):
        base = dict(
            vocab_size=50,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=48,
        )
        config = llamakin.ModelConfig(**{**base, **changes})
        with torch.device("meta"):
            built = sum(p.numel() for p in llamakin.Transformer(config).parameters())
        assert parameter_count(config) == built


# -- item 9: GGUF files ------------------------------------------------------------------------------
def convert_to_gguf(good, tmp_path, name="m.gguf"):
    assert main(["convert", str(good), str(tmp_path / name), "--gguf-type", "F32"]) == 0
    return tmp_path / name


def test_gguf_alignment_zero(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    writer.add_uint32("general.alignment", 0)
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    (
        writer.write_header_to_file(),
        writer.write_kv_data_to_file(),
        writer.write_tensors_to_file(),
        writer.close(),
    )
    with pytest.raises(
        CheckpointError, match=r"general.alignment=0, which is not a power of two"
    ) as info:
        llamakin.load(tmp_path / "a.gguf")
    one_sentence(str(info.value))


def test_gguf_head_count_zero(tmp_path):
    header_only_gguf(tmp_path / "h.gguf", **{"llama.attention.head_count": 0})
    with pytest.raises(
        ConfigError, match="llama.attention.head_count must be a positive integer, got 0"
    ) as info:
        llamakin.load(tmp_path / "h.gguf")
    one_sentence(str(info.value))


def test_gguf_q8_0_rows_not_a_multiple_of_32(tmp_path):
    from llamakin.io.gguf import GGUFFile

    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((2, 40), dtype=np.float32))
    (
        writer.write_header_to_file(),
        writer.write_kv_data_to_file(),
        writer.write_tensors_to_file(),
        writer.close(),
    )
    data = bytearray((tmp_path / "q.gguf").read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)  # then: n_dims u32, dims u64 x2, type u32, offset u64
    type_at = at + 4 + 2 * 8
    assert struct.unpack_from("<I", data, type_at)[0] == gguf.GGMLQuantizationType.F32
    struct.pack_into("<I", data, type_at, gguf.GGMLQuantizationType.Q8_0)
    (tmp_path / "q.gguf").write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match="rows of 40 values, not a multiple of the 32-value blocks of Q8_0"
    ):
        GGUFFile(tmp_path / "q.gguf")


@pytest.mark.parametrize(
    "merges,fragment",
    [
        (["ab"], "is not two tokens separated by a space"),
        (["a zz"], "uses 'zz', which is not in the vocabulary"),
        ([17], "is not two tokens separated by a space"),
        ("a b", "must be a list of strings"),
    ],
)
def test_gguf_tokenizer_with_bad_merges(merges, fragment):
    from llamakin.tokenizer import from_gguf_metadata

    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<eos>"],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 3,
    }
    with pytest.raises(CheckpointError, match=fragment) as info:
        from_gguf_metadata(meta, source="t.gguf")
    one_sentence(str(info.value))
    meta["tokenizer.ggml.merges"] = ["a b"]
    assert from_gguf_metadata(meta, source="t.gguf").encode("ab") == [2]


# -- item 9: config.json values ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,fragment",
    [
        (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
        (dict(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
        (dict(rope_theta="abc"), "rope_theta must be a positive number, got 'abc'"),
        (
            dict(rope_scaling={"rope_type": "linear", "factor": "2"}),
            "rope_scaling.factor must be a number, got '2'",
        ),
        (
            dict(rope_scaling={"rope_type": 3, "factor": 2.0}),
            "rope_scaling.rope_type must be a string",
        ),
        (
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": "1",
                    "original_max_position_embeddings": 32,
                }
            ),
            "rope_scaling.low_freq_factor must be a number",
        ),
        (
            dict(max_position_embeddings=0),
            "max_position_embeddings must be a positive integer, got 0",
        ),
        (dict(num_hidden_layers=2.5), "num_hidden_layers must be a positive integer, got 2.5"),
        (dict(rms_norm_eps=True), "rms_norm_eps must be a positive number, got True"),
        # found by benchmarks/fuzz_files.py
        (
            dict(model_type=[]),
            "model_type must be a string, got []",
        ),
        (dict(architectures=5), "architectures must be a list of strings, got 5"),
    ],
)
def test_config_json_values_of_the_wrong_type_or_range(good, tmp_path, changes, fragment):
    directory = clone(good, tmp_path)
    edit_config(directory, **changes)
    with pytest.raises(ConfigError) as info:
        llamakin.load(directory)
    assert fragment in str(info.value) and "config.json" in str(info.value)
    one_sentence(str(info.value))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_tensors_of_a_non_float_dtype_are_refused(good, tmp_path, dtype):
    directory = clone(good, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = torch.ones_like(tensors[name], dtype=dtype)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=f"tensor '{name}' holds .* values, not floating-point weights"
    ) as info:
        llamakin.load(directory)
    one_sentence(str(info.value))


def test_token_ids_outside_the_vocabulary(good):
    model = llamakin.load(good)
    with pytest.raises(
        LlamakinError, match="input_ids holds token id 128, outside the model's vocabulary of 128"
    ):
        model(torch.tensor([[1, 2, 128]]))
    with pytest.raises(LlamakinError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))

    class Tok:
        eos_token_ids = (1,)

    with pytest.raises(LlamakinError, match="the prompt holds token id 100000"):
        llamakin.generate(model, Tok(), [5, 100000], max_new_tokens=2)


# -- item 9: command lines ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model with a real trained tokenizer that fits its embedding (300 <= 512 rows), and
    a second directory whose tokenizer is larger than the model's embedding (128 rows)."""
    from llamakin.train.data import train_tokenizer

    root = tmp_path_factory.mktemp("chat")
    texts = [
        "the quick brown fox jumps over the lazy dog " * 20,
        "to be or not to be, that is the question " * 20,
    ]
    tok = train_tokenizer(texts, 300)
    save_case(Case("llama", "LlamaConfig", "LlamaForCausalLM", dict(vocab_size=512)), root / "fits")
    tok.save(root / "fits")
    save_case(next(c for c in CASES if c.name == "llama"), root / "small")
    train_tokenizer(texts * 3 + ["abcdefghijklmnopqrstuvwxyz0123456789 " * 5], 400).save(
        root / "small"
    )
    return root


def test_cli_tiny_temperature_samples_like_greedy(chat_model):
    base = ["generate", "the quick", "--model", str(chat_model / "fits"), "--max-new-tokens", "6"]
    greedy = run_cli(*base, "--temperature", "0")
    tiny = run_cli(*base, "--temperature", "1e-45", "--seed", "3")
    assert greedy.returncode == 0 and tiny.returncode == 0, tiny.stderr
    assert tiny.stdout == greedy.stdout


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--seed", str(2**70)], "seed must be an integer from -2^63 to 2^64 - 1"),
        (["--temperature", "nan"], "temperature must be 0 (greedy) or a positive number"),
        (["--temperature", "inf"], "temperature must be 0 (greedy) or a positive number"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--device", "cuda:7"], "cuda:7"),
    ],
)
def test_cli_sampling_and_device_errors(chat_model, extra, fragment):
    if extra[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    assert_cli_refuses(
        run_cli("generate", "hi", "--model", str(chat_model / "fits"), *extra), fragment
    )


def test_cli_refusal_as_a_process_exits_2_without_traceback(chat_model):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamakin.cli",
            "generate",
            "hi",
            "--model",
            str(chat_model / "fits"),
            "--seed",
            str(2**70),
        ],
        capture_output=True,
        text=True,
    )
    assert_cli_refuses(result, "seed must be an integer")


def test_cli_device_cuda_without_cuda(chat_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_cli_refuses(
        run_cli("generate", "hi", "--model", str(chat_model / "fits"), "--device", "cuda"),
        "has no usable CUDA GPU",
    )


def test_cli_tokenizer_larger_than_the_embedding(chat_model):
    assert_cli_refuses(
        run_cli("generate", "hi", "--model", str(chat_model / "small")), "embeds only 128"
    )


def test_convert_refuses_destinations_it_should_not_write(good, tmp_path):
    (tmp_path / "file.txt").write_text("keep me")
    assert_cli_refuses(
        run_cli("convert", str(good), str(tmp_path / "file.txt" / "out")), "file.txt is a file"
    )
    assert_cli_refuses(
        run_cli("convert", str(good), str(tmp_path / "file.txt")), "is an existing file"
    )
    assert (tmp_path / "file.txt").read_text() == "keep me"
    assert_cli_refuses(
        run_cli("convert", str(good), "/proc/llamakin-test/out"),
        "cannot write /proc/llamakin-test/out",
    )
    gguf_path = convert_to_gguf(good, tmp_path)
    before = gguf_path.read_bytes()
    assert_cli_refuses(
        run_cli("convert", str(good), str(gguf_path)), "already holds a checkpoint; pass --force"
    )
    assert gguf_path.read_bytes() == before
    assert main(["convert", str(good), str(tmp_path / "hf")]) == 0
    assert_cli_refuses(
        run_cli("convert", str(good), str(tmp_path / "hf")), "already holds a checkpoint"
    )
    assert main(["convert", str(good), str(tmp_path / "hf"), "--force"]) == 0
    assert main(["convert", str(good), str(gguf_path), "--gguf-type", "F16", "--force"]) == 0
    assert gguf_path.read_bytes() != before
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(good), str(tmp_path / "empty")]) == 0  # an empty directory is fine


# -- item 9 and 10: training -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting,fragment",
    [
        ("micro_batch=1.5", "micro_batch must be an integer, got 1.5"),
        ('lr="fast"', "lr must be a finite number, got 'fast'"),
        ("tokenizer=train:abc", "train:VOCAB needs a vocabulary size of at least 300"),
        ("seq_len=true", "seq_len must be an integer, got True"),
    ],
)
def test_train_settings_of_the_wrong_type(setting, fragment):
    from llamakin.train import recipe

    with pytest.raises(ConfigError) as info:
        recipe("shakespeare-tiny", [setting])
    assert fragment in str(info.value)
    one_sentence(str(info.value))


def test_train_recipe_with_an_impossible_model_size_is_refused(tmp_path, monkeypatch):
    from llamakin.train import recipe, train

    corpus = tmp_path / "c.txt"
    corpus.write_text("It is a truth universally acknowledged. " * 200)
    cfg = recipe(
        "shakespeare-tiny",
        [
            "model.hidden_size=1048576",
            "model.num_heads=8",
            "tokenizer=train:300",
            f"data={json.dumps(str(corpus))}",
        ],
    )
    with no_hang(), pytest.raises(LlamakinError, match="available; use a smaller model"):
        train(cfg, tmp_path / "run", progress=False)


TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=64",
    "seq_len=16",
    "micro_batch=2",
    "warmup_steps=1",
    "eval_interval=100",
    "eval_batches=1",
    "save_interval=2",
    "tokenizer=train:300",
    "precision=float32",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run (checkpoint at step 4) to resume from."""
    from llamakin.train import recipe, train

    root = tmp_path_factory.mktemp("run")
    (root / "c.txt").write_text(
        "Whan that Aprille with his shoures soote the droghte of March hath perced. " * 80
    )
    cfg = recipe(
        "shakespeare-tiny", [*TINY, "max_steps=4", f"data={json.dumps(str(root / 'c.txt'))}"]
    )
    train(cfg, root / "run", progress=False)
    return root, cfg


def fresh_run(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run"


def resume(trained, run, *extra):
    from llamakin.train import recipe, train

    root, _ = trained
    cfg = recipe(
        "shakespeare-tiny", [*TINY, "max_steps=6", f"data={json.dumps(str(run / 'data'))}", *extra]
    )
    return train(cfg, run, resume=True, progress=False)


def test_resume_drops_metrics_after_the_checkpoint_and_stale_temporaries(trained, tmp_path):
    run = fresh_run(trained, tmp_path)
    with open(
        run / "metrics.jsonl", "a"
    ) as f:  # what a run killed at step 6 had logged past its step-4 checkpoint
        f.write(json.dumps({"step": 5, "loss": 99.0, "tokens": 1, "grad_norm": 1.0}) + "\n")
        f.write(json.dumps({"step": 6, "loss": 99.0, "tokens": 1, "grad_norm": 1.0}) + "\n")
        f.write('{"step": 7, "lo')  # torn by the kill
    dead = run / ".ckpt.pt.tmp-999999999"
    dead.write_bytes(b"half a checkpoint")
    resume(trained, run)
    assert not dead.exists()
    assert (
        json.loads((run / "train_config.json").read_text())["precision_reason"]
        == "precision=float32 was asked for"
    )
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(
        json.loads(line)["loss"] != 99.0
        for line in (run / "metrics.jsonl").read_text().splitlines()
    )


def test_resume_from_bad_checkpoints(trained, tmp_path):
    import pickle

    from llamakin.train.loop import TrainingError

    run = fresh_run(trained, tmp_path)
    good_bytes = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(good_bytes[: len(good_bytes) // 2])
    with pytest.raises(TrainingError, match="is not a readable training checkpoint") as info:
        resume(trained, run)
    one_sentence(str(info.value))

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'PWNED')!r}, 'w').write('x')",))

    with open(run / "ckpt.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(TrainingError, match="is not a readable training checkpoint"):
        resume(trained, run)
    assert not (tmp_path / "PWNED").exists()

    torch.save({"model": {}, "step": 3}, run / "ckpt.pt")
    with pytest.raises(TrainingError, match="lacks a valid 'optimizer'"):
        resume(trained, run)

    (run / "ckpt.pt").write_bytes(good_bytes)
    with pytest.raises(TrainingError, match="was saved for another model .*hidden_size") as info:
        resume(trained, run, "model.hidden_size=64")
    one_sentence(str(info.value))


@pytest.mark.parametrize(
    "content,name,fragment",
    [
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\xff\xfe", "data.jsonl", "is a binary file, not text"),
        (b'{"text": "caf\xe9"}\n', "latin1.jsonl", "is not UTF-8 text"),
        (b"", "empty.txt", "the inputs hold no text"),
        (b"   \n\n", "blank.jsonl", "the inputs hold no text"),
    ],
)
def test_data_prepare_refuses_binary_and_empty_inputs(tmp_path, content, name, fragment):
    (tmp_path / name).write_bytes(content)
    result = run_cli(
        "data",
        "prepare",
        str(tmp_path / name),
        "--train-tokenizer",
        "300",
        "--out",
        str(tmp_path / "d"),
    )
    assert_cli_refuses(result, fragment)
    assert not (tmp_path / "d" / "meta.json").exists()


def test_plot_with_a_torn_last_line(trained, tmp_path):
    run = fresh_run(trained, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["not json", *lines]) + "\n")
    assert_cli_refuses(
        run_cli("plot", str(run), "--out", str(tmp_path / "q.png")),
        "metrics.jsonl:1 is not valid JSON",
    )
