"""One way to name a model (``llamakin.source``): catalog name, .gguf file, checkpoint directory,
a file inside one, Meta's layout; every command and API entry point takes all of them."""

from __future__ import annotations

import pytest
import torch

import llamakin
from llamakin.checkpoint import read_model_config, stored_dtype
from llamakin.cli import main
from llamakin.errors import CheckpointError
from llamakin.source import ModelSource, resolve_model
from assets import smollm2_gguf

NAME = "smollm2-135m-instruct"
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    max_position_embeddings=32,
)


def test_resolve_catalog_name_and_gguf_file():
    path = smollm2_gguf()
    by_name, by_file = resolve_model(NAME), resolve_model(path)
    assert by_name == by_file == ModelSource(path, "gguf")
    assert resolve_model(by_name) is by_name
    # convert's default dtype for a catalog name (header only)
    assert stored_dtype(NAME) == "float32"
    assert read_model_config(NAME)[1] == read_model_config(path)[1]


@pytest.mark.parametrize("spec", [NAME, "gguf-path"])
def test_inspect_catalog_name_and_gguf_file(spec, capsys):
    spec = str(smollm2_gguf()) if spec == "gguf-path" else spec
    assert main(["inspect", spec]) == 0
    out = capsys.readouterr().out
    for fragment in (
        "gguf-llama",
        "Q4_1 (210 tensors), F32 (61 tensors), Q8_0 (1 tensor)",
        "parameters: total",
        "134,515,008",
        "memory: weights",
        "KV cache",
        "smollm2-135m-instruct/SmolLM2",
    ):
        assert fragment in out, fragment


def test_arch_diff_takes_catalog_names_and_gguf_files(capsys):
    assert main(["arch-diff", NAME, str(smollm2_gguf())]) == 0
    # the same model, named two ways
    assert "no architectural differences" in capsys.readouterr().out
    # a catalog name beside a reference name
    assert main(["arch-diff", NAME, "smollm2", "--all"]) == 0
    assert "tied embeddings" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = llamakin.Transformer(llamakin.ModelConfig(**TINY)).eval()
    meta_model = llamakin.Transformer(
        llamakin.ModelConfig(**TINY, rope_layout="interleaved")
    ).eval()
    hf_dir, meta_dir = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("meta")
    llamakin.save_pretrained(model, hf_dir, family="llama")
    llamakin.save_pretrained(meta_model, meta_dir, family="meta")
    return model, meta_model, hf_dir, meta_dir


def test_directory_file_inside_and_meta_layout_resolve(saved):
    model, meta_model, hf_dir, meta_dir = saved
    assert resolve_model(hf_dir) == ModelSource(hf_dir, "directory")
    inside = resolve_model(hf_dir / "config.json")
    assert inside.path == hf_dir and inside.named == hf_dir / "config.json"
    assert read_model_config(hf_dir)[0].name == "llama"
    assert read_model_config(hf_dir / "model.safetensors")[0].name == "llama"
    assert read_model_config(meta_dir)[0].name == "meta"
    assert stored_dtype(meta_dir) == "float32"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = model(ids)
        for spec in (hf_dir, hf_dir / "config.json", resolve_model(hf_dir)):
            assert torch.equal(llamakin.load(spec)(ids), want), spec
        assert torch.equal(llamakin.load(meta_dir)(ids), meta_model(ids))


def test_cli_inspect_on_meta_layout_and_file_inside(saved, capsys):
    _, _, hf_dir, meta_dir = saved
    assert main(["inspect", str(meta_dir)]) == 0
    assert "meta" in capsys.readouterr().out
    assert main(["inspect", str(hf_dir / "model.safetensors")]) == 0
    assert "llama" in capsys.readouterr().out


def test_unknown_name_is_one_sentence():
    with pytest.raises(CheckpointError, match="does not exist and is not a catalog model"):
        resolve_model("no-such-model-anywhere")


def test_model_save_pretrained_is_the_module_function(saved, tmp_path):
    model, _, hf_dir, _ = saved
    model.save_pretrained(tmp_path)  # kept for API compatibility
    assert (tmp_path / "config.json").read_text() == (hf_dir / "config.json").read_text()
