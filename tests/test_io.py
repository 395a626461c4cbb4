"""Checkpoint file handling: sharded safetensors, pytorch_model.bin, lazy loading, dtypes."""

from __future__ import annotations

import json

import pytest
import torch

import llamakin
from llamakin.checkpoint import stored_dtype
from hf_cases import CASES, save_case

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    model = save_case(next(c for c in CASES if c.name == "qwen2-window"), directory)
    return directory, model


def logits_close(a, b, ids):
    with torch.no_grad():
        return (a(ids) - b(ids)).abs().max().item() < 1e-5


def test_sharded_safetensors_both_ways(hf_dir, tmp_path):
    directory, hf = hf_dir
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    ours = llamakin.load(tmp_path / "hf_sharded")
    ids = torch.randint(0, 128, (1, 10))
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-5

    ours.save_pretrained(tmp_path / "ours_sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours_sharded")
    assert (back(ids).logits - hf(ids).logits).abs().max() == 0
    # saving a single file into the same directory removes the stale shards and index
    ours.save_pretrained(tmp_path / "ours_sharded")
    assert sorted(p.name for p in (tmp_path / "ours_sharded").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert logits_close(llamakin.load(tmp_path / "ours_sharded"), ours, ids)


def test_pytorch_bin_loads_with_weights_only(hf_dir, tmp_path):
    directory, hf = hf_dir
    target = tmp_path / "bin"
    target.mkdir()
    (target / "config.json").write_text((directory / "config.json").read_text())
    state = dict(hf.state_dict())
    # old HF checkpoints carry it
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, target / "pytorch_model.bin")
    ours = llamakin.load(target)
    ids = torch.randint(0, 128, (2, 7))
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-5


def test_dtype_and_device_arguments(hf_dir):
    directory, hf = hf_dir
    model = llamakin.load(directory, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and all(
        p.dtype == torch.bfloat16 for p in model.parameters()
    )
    logits = model(torch.randint(0, 128, (1, 5)))
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 5, 128)
    assert stored_dtype(directory) == "float32"
    model.save_pretrained(directory.parent / "bf16")
    assert stored_dtype(directory.parent / "bf16") == "bfloat16"


def test_loading_holds_one_source_tensor_at_a_time(hf_dir):
    """The loader streams: source tensors of one rule are freed before the next rule's are read,
    so peak memory is the model plus one (fused) tensor, never a second full copy."""
    import weakref

    from llamakin.checkpoint import empty_model, load_weights, read_checkpoint_config
    from llamakin.io.tensors import open_weights

    directory, hf = hf_dir
    family, config = read_checkpoint_config(directory)
    live, peak = {}, [0]

    class Watched:
        def __init__(self, source):
            self.source = source

        def __getattr__(self, name):
            return getattr(self.source, name)

        def get(self, name):
            t = self.source.get(name).clone()  # a private copy whose lifetime we can watch
            key = id(t)
            live[key] = t.numel() * t.element_size()
            weakref.finalize(t, live.pop, key, None)
            peak[0] = max(peak[0], sum(live.values()))
            return t

    model = empty_model(config, torch.float32, "cpu")
    rules = family.tensor_rules(config)
    with open_weights(directory) as source:
        load_weights(model, rules, Watched(source), family, "test")
    largest_rule = max(
        sum(p.numel() * 4 for p in [hf.state_dict()[n] for n in r.sources]) for r in rules
    )
    total = sum(p.numel() * 4 for p in model.parameters())
    assert peak[0] <= largest_rule < total / 3
    ids = torch.randint(0, 128, (1, 6))
    assert (model(ids) - hf(ids).logits).abs().max() < 1e-5


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path, monkeypatch):
    """GGUF, safetensors and training checkpoints go through one atomic write: a failure half-way
    (here the disk filling up after the GGUF header was written) leaves the directory as it was."""
    import gguf

    from llamakin.io.atomic import atomic_write
    from llamakin.io.gguf import write_gguf

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError):
        write_gguf(
            tmp_path / "m.gguf",
            "llama",
            [("general.name", "x", "str")],
            {"a": torch.ones(4)},
            {"a": "F32"},
        )
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept.txt").write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "kept.txt", fails)
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"] and (
        tmp_path / "kept.txt"
    ).read_text() == "old"
