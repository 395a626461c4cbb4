"""ChatGLM-6B (v1) against a plain reference written from spec §6.1 in this file.

No native transformers class and no tokenizer exist offline, so the checkpoint is built in the
original layout with random tensors (config.json with the released keys, the spec's tensor
names), and the reference runs sequence-first with explicit per-head loops: per-head interleaved
``query_key_value``, 2-D RoPE with float16 tables, ``query_key_layer_scaling``, the prefix-LM
mask with the -10000 fill, alpha-scaled residuals on the normalised input, GELU-tanh.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import llamakin
from llamakin.generate import GenerationRun, SamplingParams

V, D, H, LAYERS, INNER = 100, 32, 4, 2, 64
HD = D // H
GMASK, MASK, SOP, EOS = 90, 91, 92, 93


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chatglm6b")
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": V, "hidden_size": D,
              "num_layers": LAYERS, "num_attention_heads": H, "inner_hidden_size": INNER, "layernorm_epsilon": 1e-5,
              "max_sequence_length": 64, "position_encoding_2d": True, "bos_token_id": SOP, "eos_token_id": EOS,
              "mask_token_id": MASK, "gmask_token_id": GMASK, "pad_token_id": 3}
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    w = {"transformer.word_embeddings.weight": rand(V, D, scale=1.0)}
    for i in range(LAYERS):
        t = f"transformer.layers.{i}."
        w |= {t + "input_layernorm.weight": 1 + rand(D, scale=0.2), t + "input_layernorm.bias": rand(D, scale=0.1),
              t + "attention.query_key_value.weight": rand(3 * D, D), t + "attention.query_key_value.bias": rand(3 * D, scale=0.1),
              t + "attention.dense.weight": rand(D, D), t + "attention.dense.bias": rand(D, scale=0.1),
              t + "post_attention_layernorm.weight": 1 + rand(D, scale=0.2),
              t + "post_attention_layernorm.bias": rand(D, scale=0.1),
              t + "mlp.dense_h_to_4h.weight": rand(INNER, D), t + "mlp.dense_h_to_4h.bias": rand(INNER, scale=0.1),
              t + "mlp.dense_4h_to_h.weight": rand(D, INNER), t + "mlp.dense_4h_to_h.bias": rand(D, scale=0.1),
              t + "attention.rotary_emb.inv_freq": torch.ones(HD // 4)}  # a buffer the loader must skip
    w |= {"transformer.final_layernorm.weight": 1 + rand(D, scale=0.2), "transformer.final_layernorm.bias": rand(D, scale=0.1)}
    save_file(w, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    return directory, w


def reference_logits(w: dict, tokens: list[int]) -> torch.Tensor:
    """All positions' logits for one sequence, following the released modeling_chatglm.py."""
    T = len(tokens)
    ctx = tokens.index(SOP)
    mask_pos = tokens.index(GMASK) if GMASK in tokens else tokens.index(MASK)
    pos = [p if p < ctx else mask_pos for p in range(T)]
    block = [0 if p < ctx else p - ctx + 1 for p in range(T)]
    inv_freq = (1.0 / 10000 ** (torch.arange(0, HD // 2, 2).float() / (HD // 2))).half()

    def table(ids):
        freqs = torch.tensor(ids).half()[:, None] * inv_freq[None]  # fp16 products, as the original
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().float(), emb.sin().float()

    (c1, s1), (c2, s2) = table(pos), table(block)

    def rot(x, c, s):  # rotate_half on one 64-dim half
        half = x.shape[-1] // 2
        return x * c + torch.cat([-x[:, half:], x[:, :half]], -1) * s

    blocked = torch.ones(T, T).tril()
    blocked[:, :ctx] = 1
    blocked = blocked < 0.5
    alpha = math.sqrt(2 * LAYERS)

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, (D,), w[p + ".weight"], w[p + ".bias"], 1e-5)

    h = w["transformer.word_embeddings.weight"][torch.tensor(tokens)]  # [T, D] (sequence-first, batch 1)
    for i in range(LAYERS):
        t = f"transformer.layers.{i}."
        x = ln(h, t + "input_layernorm")
        mixed = x @ w[t + "attention.query_key_value.weight"].T + w[t + "attention.query_key_value.bias"]
        mixed = mixed.view(T, H, 3 * HD)
        outs = []
        for head in range(H):
            q, k, v = mixed[:, head].split(HD, -1)
            q = torch.cat([rot(q[:, :HD // 2], c1, s1), rot(q[:, HD // 2:], c2, s2)], -1)
            k = torch.cat([rot(k[:, :HD // 2], c1, s1), rot(k[:, HD // 2:], c2, s2)], -1)
            coeff = i + 1  # query_key_layer_scaling
            scores = (q / (math.sqrt(HD) * coeff)) @ k.T
            scores = scores.masked_fill(blocked, -10000.0).float() * coeff
            outs.append(scores.softmax(-1) @ v)
        attn = torch.cat(outs, -1) @ w[t + "attention.dense.weight"].T + w[t + "attention.dense.bias"]
        h = x * alpha + attn
        y = ln(h, t + "post_attention_layernorm")
        up = y @ w[t + "mlp.dense_h_to_4h.weight"].T + w[t + "mlp.dense_h_to_4h.bias"]
        gelu = 0.5 * up * (1 + torch.tanh(0.7978845608028654 * (up + 0.044715 * up ** 3)))
        h = y * alpha + gelu @ w[t + "mlp.dense_4h_to_h.weight"].T + w[t + "mlp.dense_4h_to_h.bias"]
    return ln(h, "transformer.final_layernorm") @ w["transformer.word_embeddings.weight"].T  # tied


PROMPTS = [[5, 17, 33, 8, 41, GMASK, SOP], [12, 7, GMASK, SOP], [30, 31, 32, 33, 34, 35, 36, 37, GMASK, SOP]]


def test_config_and_knobs(checkpoint):
    model = llamakin.load(checkpoint[0])
    c = model.config
    assert (c.family, c.rope_layout, c.norm_type, c.mlp_type, c.prefix_lm) == ("chatglm", "glm2d", "layernorm", "gelu_tanh", True)
    assert c.normed_residual_alpha == pytest.approx(math.sqrt(2 * LAYERS)) and c.rope_table_dtype == "float16"


@torch.no_grad()
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_logits_match_the_reference(checkpoint, prompt):
    directory, w = checkpoint
    model = llamakin.load(directory)
    got = model(torch.tensor([prompt]))[0]
    assert (got - reference_logits(w, prompt)).abs().max() < 1e-5


@torch.no_grad()
def test_generation_follows_the_2d_position_protocol(checkpoint):
    """Greedy decoding with the cache equals the reference re-run on the growing sequence."""
    directory, w = checkpoint
    model = llamakin.load(directory)
    for prompt in PROMPTS:
        run = GenerationRun(model, _NoText(), [prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))
        for _ in run:
            pass
        sequence = list(prompt)
        for _ in range(6):
            sequence.append(int(reference_logits(w, sequence)[-1].argmax()))
        assert run.results[0].token_ids == sequence[len(prompt):]


@torch.no_grad()
def test_batched_prompts_with_padding(checkpoint):
    directory, _ = checkpoint
    model = llamakin.load(directory)
    tok = _NoText()
    alone = []
    for prompt in PROMPTS:
        run = GenerationRun(model, tok, [prompt], SamplingParams(max_new_tokens=5, ignore_eos=True))
        list(run)
        alone.append(run.results[0].token_ids)
    run = GenerationRun(model, tok, PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True))
    list(run)
    assert [r.token_ids for r in run.results] == alone


def test_prompt_without_gmask_is_refused(checkpoint):
    model = llamakin.load(checkpoint[0])
    with pytest.raises(llamakin.LlamakinError, match=r"needs a \[gMASK\] or \[MASK\]"):
        model(torch.tensor([[5, 6, SOP]]))


def test_export_round_trip(checkpoint, tmp_path):
    from safetensors.torch import load_file

    directory, w = checkpoint
    llamakin.load(directory).save_pretrained(tmp_path)
    again = load_file(tmp_path / "model.safetensors")
    assert set(again) == {k for k in w if not k.endswith("inv_freq")}
    assert all(torch.equal(again[k], w[k]) for k in again)


class _NoText:
    """Generation here is compared on token ids; no ChatGLM tokenizer exists offline."""

    eos_token_ids = (EOS,)

    def decode(self, ids, skip_special_tokens=False):
        return ""


def test_inspect_and_arch_diff_cover_it(checkpoint, capsys):
    from llamakin.cli import main

    assert main(["inspect", str(checkpoint[0])]) == 0
    out = capsys.readouterr().out
    assert "chatglm" in out and "normed_residual_alpha" in out and "glm2d" in out
    assert main(["arch-diff", str(checkpoint[0]), "chatglm2", "qwen", "internlm2", "diff-transformer"]) == 0
    out = capsys.readouterr().out
    assert "prefix LM" in out and "2-D (two position streams)" in out and "pair-norm weight" in out
