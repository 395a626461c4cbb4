"""Bad input gets one clear sentence (CLI: exit code 2, no traceback) and loses nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llamakin
from llamakin import CheckpointError, ConfigError, LlamakinError, ModelConfig, UnsupportedError
from conftest import run_cli
from hf_cases import CASES, save_case


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    save_case(next(c for c in CASES if c.name == "llama"), directory)
    return directory


def clone(good, tmp_path):
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(good, target)
    return target


def one_sentence(message: str) -> None:
    assert message and "\n" not in message and message.rstrip().endswith(".")


# -- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,fragment",
    [
        (dict(hidden_size=65), "not divisible by num_heads"),
        (dict(num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(norm_type="batchnorm"), "norm_type='batchnorm' is not supported"),
        (dict(rope_layout="complex"), "rope_layout='complex'"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer"),
        (dict(norm_eps=0.0), "norm_eps must be a positive"),
        (dict(rotary_dim=7), "rotary_dim (7) must be even"),
        (dict(attention_kind="differential", num_heads=4, num_kv_heads=1), "must both be even"),
        (dict(sliding_window_layers=(0,)), "sliding_window is not"),
        (dict(sliding_window=4, sliding_window_layers=(9,)), "outside"),
        (dict(mlp_type="relu"), "mlp_type='relu'"),
    ],
)
def test_invalid_configs_are_refused_with_one_sentence(changes, fragment):
    base = dict(vocab_size=10, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=8)
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**base, **changes})
    assert fragment in str(info.value)
    one_sentence(str(info.value))


def test_invalid_rope_scaling():
    with pytest.raises(ConfigError, match="factor must be at least 1"):
        llamakin.RopeScaling(type="linear", factor=0.5)
    with pytest.raises(ConfigError, match="rope_scaling.type='ntk'"):
        llamakin.RopeScaling(type="ntk")


# -- checkpoints --------------------------------------------------------------------------------
def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for k, v in changes.items():
        if v is None:
            del config[k]
    path.write_text(json.dumps(config))


def edit_weights(directory, fn):
    path = directory / "model.safetensors"
    tensors = fn(load_file(path))
    save_file(tensors, path)


@pytest.mark.parametrize(
    "mutate,error,fragment",
    [
        (
            lambda d: edit_config(d, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]),
            UnsupportedError,
            "model_type 'gpt_neox', which llamakin does not know",
        ),
        (lambda d: edit_config(d, hidden_size=None), ConfigError, "has no 'hidden_size'"),
        (lambda d: edit_config(d, num_key_value_heads=3), ConfigError, "multiple of num_kv_heads"),
        (lambda d: edit_config(d, hidden_act="gelu"), UnsupportedError, "hidden_act 'gelu'"),
        (
            lambda d: edit_config(d, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
            UnsupportedError,
            "'longrope' is not supported",
        ),
        (
            lambda d: (d / "config.json").write_text("{not json"),
            CheckpointError,
            "is not valid JSON",
        ),
        (lambda d: (d / "config.json").unlink(), CheckpointError, "has no config.json"),
        (lambda d: (d / "model.safetensors").unlink(), CheckpointError, "has no model.safetensors"),
        (
            lambda d: edit_weights(
                d, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k}
            ),
            CheckpointError,
            "lacks tensor 'model.layers.1.mlp.up_proj.weight'",
        ),
        (
            lambda d: edit_weights(
                d, lambda t: {**t, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}
            ),
            CheckpointError,
            "has tensor 'model.layers.0.self_attn.extra.weight' that a llama model",
        ),
        (
            lambda d: edit_weights(d, lambda t: {**t, "model.norm.weight": torch.ones(63)}),
            CheckpointError,
            "has shape [63] but the config implies [64]",
        ),
        (
            lambda d: edit_config(d, intermediate_size=100),
            CheckpointError,
            "the config does not match the weights",
        ),
    ],
)
def test_broken_checkpoints_are_refused(good, tmp_path, mutate, error, fragment):
    directory = clone(good, tmp_path)
    mutate(directory)
    with pytest.raises(error) as info:
        llamakin.load(directory)
    assert fragment in str(info.value)
    one_sentence(str(info.value))


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_safetensors(good, tmp_path, cut):
    directory = clone(good, tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        llamakin.load(directory)
    one_sentence(str(info.value))


def test_corrupt_pytorch_bin(good, tmp_path):
    directory = clone(good, tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        llamakin.load(directory)


def test_pickle_with_code_is_never_executed(good, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))

    directory = clone(good, tmp_path)
    (directory / "model.safetensors").unlink()
    with open(directory / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": Evil()}, f)
    with pytest.raises(CheckpointError):
        llamakin.load(directory)
    assert not (tmp_path / "PWNED").exists() and not (directory / "PWNED").exists()


def test_missing_shard(good, tmp_path):
    directory = clone(good, tmp_path)
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        llamakin.load(directory)


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match="does not exist"):
        llamakin.load("/no/such/checkpoint")


def test_prompt_longer_than_cache(good):
    model = llamakin.load(good)
    cache = model.new_cache(1, 8)
    with pytest.raises(LlamakinError, match="holds 8 tokens but 12 are needed"):
        model(torch.zeros(1, 12, dtype=torch.long), cache=cache)


# -- CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["inspect", "/no/such/dir"], "does not exist"),
        (["arch-diff", "llama", "gpt5"], "neither a checkpoint path nor a known reference"),
        (["convert", "/no/such/dir", "/tmp/x"], "does not exist"),
    ],
)
def test_cli_errors_exit_2_without_traceback(args, fragment):
    result = run_cli(*args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_convert_refuses_inexpressible_target(good, tmp_path):
    result = run_cli(
        "convert", str(good), str(tmp_path / "out"), "--rope-layout", "interleaved", "--to", "qwen3"
    )
    assert (
        result.returncode == 2
        and "cannot save as qwen3" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_usage_error_exits_2():
    assert run_cli("convert").returncode == 2
