"""inspect / arch-diff output, export-format choice, ModelConfig serialisation."""

from __future__ import annotations

import pytest
import torch

import llamakin
from llamakin.architecture import parameter_breakdown
from llamakin.cli import main
from llamakin.families import family_for_export
from llamakin.reference import REFERENCE_CONFIGS, reference_config
from hf_cases import CASES, save_case

BASE = dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)


def test_inspect_card(tmp_path, capsys):
    save_case(next(c for c in CASES if c.name == "granite"), tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for fragment in (
        "granite",
        "float32",
        "parameters: total",
        "differs from plain LLaMA",
        "embedding_multiplier",
        "logits_scaling",
        "num_kv_heads",
        "memory: weights",
        "KV cache",
    ):
        assert fragment in out, fragment


def test_parameter_breakdown_matches_transformers(tmp_path):
    hf = save_case(next(c for c in CASES if c.name == "glm4"), tmp_path)
    config = llamakin.load(tmp_path).config
    assert parameter_breakdown(config)["total"] == sum(p.numel() for p in hf.parameters())


def test_reference_configs_parse_and_count():
    for name in REFERENCE_CONFIGS:
        config, _ = reference_config(name)
        assert parameter_breakdown(config)["total"] > 1e8
    assert abs(parameter_breakdown(reference_config("llama2-7b")[0])["total"] - 6_738_415_616) == 0
    assert reference_config("llama2-7b-meta")[0].intermediate_size == 11008


def test_arch_diff_shows_only_differences(capsys):
    assert main(["arch-diff", "llama", "granite-code", "glm4"]) == 0
    out = capsys.readouterr().out
    assert "attention bias" in out and "q k v o" in out and "q k v" in out
    assert "sandwich" in out and "interleaved, 64/128" in out
    assert main(["arch-diff", "llama", "llama"]) == 0
    assert "no architectural differences" in capsys.readouterr().out


def test_arch_diff_accepts_paths(tmp_path, capsys):
    save_case(next(c for c in CASES if c.name == "qwen3"), tmp_path)
    assert main(["arch-diff", str(tmp_path), "qwen3", "--all"]) == 0
    assert "per-head RMSNorm" in capsys.readouterr().out


@pytest.mark.parametrize(
    "knobs,family",
    [
        ({}, "llama"),
        (dict(q_bias=True, k_bias=True, v_bias=True, o_bias=True, mlp_bias=True), "llama"),
        (dict(attention_kind="differential"), "diffllama"),
        (dict(q_bias=True, k_bias=True, v_bias=True), "qwen2"),
        (dict(qk_norm=True), "qwen3"),
        (dict(sliding_window=16), "mistral"),
        (dict(embedding_multiplier=2.0), "granite"),
        (dict(rope_layout="interleaved"), "meta"),
        (
            dict(rope_layout="interleaved", rotary_dim=8, q_bias=True, k_bias=True, v_bias=True),
            "glm",
        ),
        (dict(rope_layout="interleaved", q_bias=True), "llamakin"),
        (dict(norm_type="layernorm", mlp_type="gelu_tanh", mlp_bias=True), "llamakin"),
    ],
)
def test_export_picks_the_first_exact_format(knobs, family, tmp_path):
    config = llamakin.ModelConfig(**BASE, **knobs)
    assert family_for_export(config).name == family
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    back = llamakin.load(tmp_path)
    assert back.config == config.replace(family=family) or family == "meta"
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


def test_config_dict_round_trip():
    config = llamakin.ModelConfig(
        **BASE,
        rope_scaling=llamakin.RopeScaling(type="yarn", factor=4.0),
        sliding_window=8,
        sliding_window_layers=(1,),
        eos_token_ids=(1, 2),
    )
    assert llamakin.ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(llamakin.ConfigError, match="unknown ModelConfig keys"):
        llamakin.ModelConfig.from_dict({**config.to_dict(), "hiden_size": 3})
