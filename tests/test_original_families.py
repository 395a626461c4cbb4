"""Qwen v1, InternLM v1 and ChatGLM2 against re-implementations of their original modeling files.

The references live in ``original_code.py`` (see there for what each follows). Checkpoints are
tiny random models written directly in the original layout: the original tensor names and the
released ``config.json`` keys, scaled down. llamakin loads them with ``llamakin.load`` and the
float32 logits are compared at every real position, on prompts past the trained length, on
left-padded batches, while decoding with the cache (through ``llamakin.generate``'s traced decode
step too), at a depth other than the release's, in half precision, and after export (the
reference reading llamakin's written ``config.json``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import llamakin
from llamakin.generate import GenerationRun, SamplingParams
from llamakin.speed.decode_trace import Decoder, _traceable
from original_code import ChatGLM2, InternLM2, InternLMV1, QwenV1, chatglm2_config
from conftest import finished_results

V, D, H, HD = 64, 32, 4, 8
F32_TOL = (
    2e-5  # float32 logits of O(1); the references rotate by slot index, llamakin by real position
)


def _rand(g, *shape, scale=None):
    return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)


def _save(directory, config, weights):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


class _Ids:
    """Generation here runs on token ids; only the EOS ids are asked of the tokenizer."""

    eos_token_ids = (V - 1,)

    def decode(self, ids, skip_special_tokens=False):
        return ""


@pytest.fixture(autouse=True)
def own_trace_cache(monkeypatch):
    """A fresh trace cache for every test here: the process-wide recording budget
    (``LLAMAKIN_TRACE_BUDGET``) may be spent by earlier test files, and then the "traced" step
    would silently run eagerly and the traced path would go untested."""
    from llamakin.speed import decode_trace as decode

    monkeypatch.setattr(decode, "TRACES", decode.TraceCache(8))


def masked_max(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


def left_pad(rows):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def llamakin_greedy(model, rows, new_tokens, trace=True):
    """Prefill + decode steps the way ``GenerationRun`` runs them (the traced step unless ``trace`` is off)."""
    ids, mask = left_pad(rows)
    padded = bool((mask == 0).any())
    cache = model.new_cache(len(rows), ids.shape[1] + new_tokens)
    with torch.inference_mode():
        steps = [
            model(ids, attention_mask=mask if padded else None, cache=cache, last_only=True)[:, -1]
        ]
        decoder = Decoder(model, cache)
        if trace:  # dynamic NTK (a base growing every step) runs eagerly by design
            assert decoder._graph is not None or not _traceable(model), "the step was not traced"
        else:
            decoder._graph = None
        positions = mask.sum(-1, keepdim=True)
        for _ in range(new_tokens):
            nxt = steps[-1].argmax(-1)[:, None]
            steps.append(decoder.step(nxt, positions))
            positions = positions + 1
    return steps


# -- Qwen v1 -------------------------------------------------------------------------------------------
def qwen_checkpoint(
    directory, layers=2, seq_length=8, logn=True, ntk=True, seed=0, no_bias=True, max_pos=128
):
    """Qwen-7B's released config.json keys, scaled down."""
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": D,
        "intermediate_size": 2 * 48,
        "initializer_range": 0.02,
        "kv_channels": HD,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": max_pos,
        "model_type": "qwen",
        "no_bias": no_bias,
        "num_attention_heads": H,
        "num_hidden_layers": layers,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "use_cache": True,
        "use_dynamic_ntk": ntk,
        "use_flash_attn": "auto",
        "use_logn_attn": logn,
        "vocab_size": V,
    }
    g = torch.Generator().manual_seed(seed)
    w = {
        "transformer.wte.weight": _rand(g, V, D, scale=1.0),
        "transformer.ln_f.weight": 1 + _rand(g, D, scale=0.2),
        "lm_head.weight": _rand(g, V, D),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        w |= {
            p + "ln_1.weight": 1 + _rand(g, D, scale=0.2),
            p + "ln_2.weight": 1 + _rand(g, D, scale=0.2),
            p + "attn.c_attn.weight": _rand(g, 3 * D, D),
            p + "attn.c_attn.bias": _rand(g, 3 * D, scale=0.3),
            p + "attn.c_proj.weight": _rand(g, D, D),
            p + "mlp.w1.weight": _rand(g, 48, D),
            p + "mlp.w2.weight": _rand(g, 48, D),
            p + "mlp.c_proj.weight": _rand(g, D, 48),
        }
        if not no_bias:
            w |= {
                p + "attn.c_proj.bias": _rand(g, D, scale=0.1),
                p + "mlp.w1.bias": _rand(g, 48, scale=0.1),
                p + "mlp.w2.bias": _rand(g, 48, scale=0.1),
                p + "mlp.c_proj.bias": _rand(g, D, scale=0.1),
            }
    return _save(directory, config, w)


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V - 1, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def test_qwen1_ntk_and_logn_decoding_through_the_traced_step(tmp_path):
    """Item 1: a prompt past seq_length; the traced decode step must use the prefill's NTK alpha."""
    directory = qwen_checkpoint(tmp_path / "qwen")
    model = llamakin.load(directory)
    reference = QwenV1(directory)
    # alpha 1, 7, 3: one trace (same batch and cache bucket) serves all three
    for length in (
        5,
        20,
        11,
    ):
        rows = prompts([length], seed=length)
        _, expected = reference.greedy(rows, 8)
        for trace in (True, False):
            got = llamakin_greedy(model, rows, 8, trace=trace)
            diff = max((g - e).abs().max().item() for g, e in zip(got, expected))
            assert diff < F32_TOL, (length, trace, diff)
        ids = torch.tensor(rows)
        full, _ = reference.forward(ids)
        assert (model(ids)[0] - full[0]).abs().max() < F32_TOL
    # ... and through llamakin.generate / GenerationRun: the same tokens as the original's greedy loop
    rows = prompts([20], seed=7)
    tokens, _ = reference.greedy(rows, 10)
    run = GenerationRun(model, _Ids(), rows, SamplingParams(max_new_tokens=10, ignore_eos=True))
    list(run)
    assert run.results[0].token_ids == tokens[0]


@torch.no_grad()
def test_qwen1_padded_batch_computes_alpha_per_row(tmp_path):
    """Item 2: one NTK alpha per row from its real length, as the final release does."""
    # logn: see the README (key index vs position)
    directory = qwen_checkpoint(tmp_path / "qwen", logn=False)
    model = llamakin.load(directory)
    reference = QwenV1(directory)
    rows = prompts([20, 11, 6, 17])  # alphas 7, 3, 1, 7
    ids, mask = left_pad(rows)
    expected, _ = reference.forward(ids, mask)
    assert masked_max(model(ids, attention_mask=mask), expected, mask) < F32_TOL
    _, expected_steps = reference.greedy(rows, 6)
    for trace in (True, False):
        got = llamakin_greedy(model, rows, 6, trace=trace)
        assert max((g - e).abs().max().item() for g, e in zip(got, expected_steps)) < F32_TOL
    # each row as it would be alone
    for b, row in enumerate(rows):
        alone, _ = reference.forward(torch.tensor([row]))
        assert (model(ids, attention_mask=mask)[b, -len(row) :] - alone[0]).abs().max() < F32_TOL


@torch.no_grad()
def test_qwen1_three_layers_biases_and_export_read_by_the_original(tmp_path):
    directory = qwen_checkpoint(tmp_path / "qwen", layers=3, no_bias=False)
    model = llamakin.load(directory)
    model.save_pretrained(tmp_path / "out")
    ids = torch.tensor(prompts([19]))
    for d in (directory, tmp_path / "out"):
        expected, _ = QwenV1(d).forward(ids)
        assert (model(ids) - expected).abs().max() < F32_TOL


@torch.no_grad()
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_qwen1_half_precision(tmp_path, dtype, tol):
    """The original rotates q/k in float32 and runs softmax in the activations' dtype; llamakin
    rotates in the activations' dtype (transformers'); the difference is rounding only."""
    directory = qwen_checkpoint(tmp_path / "qwen")
    ids = torch.tensor(prompts([20]))
    expected, _ = QwenV1(directory, dtype).forward(ids)
    got = llamakin.load(directory, dtype=dtype)(ids)
    reference32, _ = QwenV1(directory).forward(ids)
    assert (got.float() - expected.float()).abs().max() < tol
    assert (got.float() - reference32).abs().max() < 2 * tol


# -- InternLM v1 ----------------------------------------------------------------------------------------
def internlm_checkpoint(directory, layers=2, kind="dynamic", factor=2.0, max_pos=16, seed=0):
    """InternLM-7B's config.json keys (``rotary`` dict, ``bias``), scaled down."""
    config = {
        "architectures": ["InternLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm.InternLMConfig",
            "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
        },
        "bias": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": D,
        "initializer_range": 0.02,
        "intermediate_size": 48,
        "max_position_embeddings": max_pos,
        "model_type": "internlm",
        "num_attention_heads": H,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-6,
        "rotary": {"base": 10000, "type": kind, "scaling_factor": factor},
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": V,
    }
    g = torch.Generator().manual_seed(seed)
    w = {
        "model.embed_tokens.weight": _rand(g, V, D, scale=1.0),
        "model.norm.weight": 1 + _rand(g, D, scale=0.2),
        "lm_head.weight": _rand(g, V, D),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        # a persistent buffer in the original
        w |= {
            p + "input_layernorm.weight": 1 + _rand(g, D, scale=0.2),
            p + "post_attention_layernorm.weight": 1 + _rand(g, D, scale=0.2),
            p + "mlp.gate_proj.weight": _rand(g, 48, D),
            p + "mlp.up_proj.weight": _rand(g, 48, D),
            p + "mlp.down_proj.weight": _rand(g, D, 48),
            p + "self_attn.rotary_emb.inv_freq": torch.ones(HD // 2),
        }
        for n in "qkvo":
            w |= {
                p + f"self_attn.{n}_proj.weight": _rand(g, D, D),
                p + f"self_attn.{n}_proj.bias": _rand(g, D, scale=0.3),
            }
    return _save(directory, config, w)


def internlm_reference_steps(reference, rows, new_tokens):
    ids, mask = left_pad(rows)
    logits, past = reference.forward(ids, mask)
    steps = [logits[:, -1]]
    for _ in range(new_tokens):
        nxt = steps[-1].argmax(-1)[:, None]
        mask = torch.cat((mask, torch.ones(len(rows), 1, dtype=mask.dtype)), 1)
        logits, past = reference.forward(nxt, mask, past)
        steps.append(logits[:, -1])
    return steps


@torch.no_grad()
def test_internlm_v1_dynamic_ntk_cache_across_max_position_embeddings(tmp_path):
    """Item 6: prompt inside the context, decoding 14 steps past max_position_embeddings (16)."""
    directory = internlm_checkpoint(tmp_path / "ilm")
    model = llamakin.load(directory)
    assert model.config.rope_cached_keys
    reference = InternLMV1(directory)
    rows = prompts([10])
    expected = internlm_reference_steps(reference, rows, 14)
    got = llamakin_greedy(model, rows, 14)
    diffs = [(g - e).abs().max().item() for g, e in zip(got, expected)]
    assert max(diffs) < F32_TOL, diffs
    # the generation API runs the same steps (and may pass max_position_embeddings: item 7)
    run = GenerationRun(model, _Ids(), rows, SamplingParams(max_new_tokens=14, ignore_eos=True))
    list(run)
    assert run.results[0].token_ids == [int(s[0].argmax()) for s in expected[:-1]]


@torch.no_grad()
def test_internlm_v1_padded_batch_past_the_context(tmp_path):
    """A left-padded prompt batch past max_position_embeddings: one base for the batch, from the
    whole key length. (The original's decode step cannot run a batch: ``cos[:, :, -1, :]`` is
    ``[B, 1, hd]`` and broadcasts against the heads, so only batch-1 decoding is compared.)"""
    directory = internlm_checkpoint(tmp_path / "ilm")
    model = llamakin.load(directory)
    ids, mask = left_pad(prompts([20, 13, 5]))
    expected, _ = InternLMV1(directory).forward(ids, mask)
    assert masked_max(model(ids, attention_mask=mask), expected, mask) < F32_TOL


@torch.no_grad()
def test_internlm_v1_origin_three_layers_and_export(tmp_path):
    directory = internlm_checkpoint(tmp_path / "ilm", layers=3, kind="origin")
    model = llamakin.load(directory)
    # a fixed base: rotated keys are the same thing, and faster
    assert not model.config.rope_cached_keys
    model.save_pretrained(tmp_path / "out")
    for rows in (prompts([20]), prompts([9], seed=2)):  # batch 1: see the padded-batch test
        expected = internlm_reference_steps(InternLMV1(tmp_path / "out"), rows, 5)
        assert (
            max(
                (g - e).abs().max().item()
                for g, e in zip(llamakin_greedy(model, rows, 5), expected)
            )
            < F32_TOL
        )


@torch.no_grad()
def test_internlm_v1_dynamic_export_keeps_the_cache_semantics(tmp_path):
    directory = internlm_checkpoint(tmp_path / "ilm")
    llamakin.load(directory).save_pretrained(tmp_path / "out")
    back = llamakin.load(tmp_path / "out")
    assert back.config.rope_cached_keys and back.config.rope_scaling.type == "dynamic"
    expected = internlm_reference_steps(InternLMV1(tmp_path / "out"), prompts([12]), 8)
    assert (
        max(
            (g - e).abs().max().item()
            for g, e in zip(llamakin_greedy(back, prompts([12]), 8), expected)
        )
        < F32_TOL
    )


@torch.no_grad()
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_internlm_v1_half_precision(tmp_path, dtype, tol):
    directory = internlm_checkpoint(tmp_path / "ilm")
    ids = torch.tensor(prompts([20]))
    expected, _ = InternLMV1(directory, dtype).forward(ids)
    got = llamakin.load(directory, dtype=dtype)(ids)
    assert (got.float() - expected.float()).abs().max() < tol


# -- InternLM2 ------------------------------------------------------------------------------------------
HKV = 2


def internlm2_checkpoint(directory, layers=2, seed=0, max_pos=16, scaling=("dynamic", 2.0)):
    """internlm2-chat-7b's config.json keys (grouped wqkv, ``rope_scaling``), scaled down."""
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": D,
        "initializer_range": 0.02,
        "intermediate_size": 48,
        "max_position_embeddings": max_pos,
        "model_type": "internlm2",
        "num_attention_heads": H,
        "num_hidden_layers": layers,
        "num_key_value_heads": HKV,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"type": scaling[0], "factor": scaling[1]} if scaling else None,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": V,
    }
    g = torch.Generator().manual_seed(seed)
    w = {
        "model.tok_embeddings.weight": _rand(g, V, D, scale=1.0),
        "model.norm.weight": 1 + _rand(g, D, scale=0.2),
        "output.weight": _rand(g, V, D),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {
            p + "attention_norm.weight": 1 + _rand(g, D, scale=0.2),
            p + "ffn_norm.weight": 1 + _rand(g, D, scale=0.2),
            p + "attention.wqkv.weight": _rand(g, (H + 2 * HKV) * HD, D),
            p + "attention.wo.weight": _rand(g, D, D),
            p + "feed_forward.w1.weight": _rand(g, 48, D),
            p + "feed_forward.w3.weight": _rand(g, 48, D),
            p + "feed_forward.w2.weight": _rand(g, D, 48),
        }
    return _save(directory, config, w)


@torch.no_grad()
@pytest.mark.parametrize("scaling", [("dynamic", 2.0), ("linear", 2.0)], ids=["dynamic", "linear"])
def test_internlm2_against_the_original_with_cache_and_padding(tmp_path, scaling):
    """Keys cached after RoPE with the base of their step (the original's rotary state), decoding
    past max_position_embeddings (16); a padded batch decoded together (positions from the mask)."""
    directory = internlm2_checkpoint(tmp_path / "ilm2", layers=3, scaling=scaling)
    model = llamakin.load(directory)
    assert not model.config.rope_cached_keys
    for rows in (prompts([10]), prompts([12, 7, 3])):
        expected = internlm_reference_steps(InternLM2(directory), rows, 10)
        assert (
            max(
                (g - e).abs().max().item()
                for g, e in zip(llamakin_greedy(model, rows, 10), expected)
            )
            < F32_TOL
        )
    model.save_pretrained(tmp_path / "out")
    ids = torch.tensor(prompts([20]))
    expected, _ = InternLM2(tmp_path / "out").forward(ids)
    assert (model(ids) - expected).abs().max() < F32_TOL


@torch.no_grad()
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_internlm2_half_precision(tmp_path, dtype, tol):
    directory = internlm2_checkpoint(tmp_path / "ilm2")
    ids = torch.tensor(prompts([20]))
    expected, _ = InternLM2(directory, dtype).forward(ids)
    assert (llamakin.load(directory, dtype=dtype)(ids).float() - expected.float()).abs().max() < tol


# -- ChatGLM2 -------------------------------------------------------------------------------------------
# ChatGLM2-6B's released config.json (THUDM/chatglm2-6b), every key but _name_or_path/transformers_version
CHATGLM2_RELEASED_KEYS = {
    "model_type",
    "architectures",
    "auto_map",
    "add_bias_linear",
    "add_qkv_bias",
    "apply_query_key_layer_scaling",
    "apply_residual_connection_post_layernorm",
    "attention_dropout",
    "attention_softmax_in_fp32",
    "bias_dropout_fusion",
    "ffn_hidden_size",
    "fp32_residual_connection",
    "hidden_dropout",
    "hidden_size",
    "kv_channels",
    "layernorm_epsilon",
    "multi_query_attention",
    "multi_query_group_num",
    "num_attention_heads",
    "num_layers",
    "original_rope",
    "padded_vocab_size",
    "post_layer_norm",
    "rmsnorm",
    "seq_length",
    "use_cache",
    "torch_dtype",
    "tie_word_embeddings",
    "eos_token_id",
    "pad_token_id",
}
G, FFN = 2, 48


def chatglm2_checkpoint(directory, layers=2, seed=0, dtype="float32"):
    config = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": FFN,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": D,
        "kv_channels": HD,
        "layernorm_epsilon": 1e-5,
        "multi_query_attention": True,
        "multi_query_group_num": G,
        "num_attention_heads": H,
        "num_layers": layers,
        "original_rope": True,
        "padded_vocab_size": V,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 64,
        "use_cache": True,
        "torch_dtype": dtype,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    g = torch.Generator().manual_seed(seed)
    w = {
        "transformer.embedding.word_embeddings.weight": _rand(g, V, D, scale=1.0),
        "transformer.encoder.final_layernorm.weight": 1 + _rand(g, D, scale=0.2),
        "transformer.output_layer.weight": _rand(g, V, D),
        "transformer.rotary_pos_emb.inv_freq": torch.ones(HD // 4),
    }
    qkv = (H + 2 * G) * HD
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        w |= {
            p + "input_layernorm.weight": 1 + _rand(g, D, scale=0.2),
            p + "post_attention_layernorm.weight": 1 + _rand(g, D, scale=0.2),
            p + "self_attention.query_key_value.weight": _rand(g, qkv, D),
            p + "self_attention.query_key_value.bias": _rand(g, qkv, scale=0.3),
            p + "self_attention.dense.weight": _rand(g, D, D),
            p + "mlp.dense_h_to_4h.weight": _rand(g, 2 * FFN, D),
            p + "mlp.dense_4h_to_h.weight": _rand(g, D, FFN),
        }
    return _save(directory, config, w)


def chatglm2_reference_steps(reference, rows, new_tokens):
    """The original's generation: left padding, positions by slot (get_position_ids), the cache."""
    ids, mask = left_pad(rows)
    T = ids.shape[1]
    positions = torch.arange(T)[None].expand(len(rows), -1)
    logits, past = reference.forward(ids, positions, mask)
    steps = [logits[:, -1]]
    for step in range(new_tokens):
        nxt = steps[-1].argmax(-1)[:, None]
        mask = torch.cat((mask, torch.ones(len(rows), 1, dtype=mask.dtype)), 1)
        logits, past = reference.forward(nxt, torch.full((len(rows), 1), T + step), mask, past)
        steps.append(logits[:, -1])
    return steps


@torch.no_grad()
def test_chatglm2_against_the_original_with_cache_and_padding(tmp_path):
    directory = chatglm2_checkpoint(tmp_path / "cg2", layers=3)
    model = llamakin.load(directory)
    reference = ChatGLM2(directory)
    rows = prompts([14, 9, 3])
    ids, mask = left_pad(rows)
    positions = torch.arange(ids.shape[1])[None].expand(3, -1)
    expected, _ = reference.forward(ids, positions, mask)
    assert masked_max(model(ids, attention_mask=mask), expected, mask) < F32_TOL
    expected_steps = chatglm2_reference_steps(reference, rows, 8)
    for trace in (True, False):
        got = llamakin_greedy(model, rows, 8, trace=trace)
        assert max((g - e).abs().max().item() for g, e in zip(got, expected_steps)) < F32_TOL


@torch.no_grad()
def test_chatglm2_export_runs_in_the_original_code(tmp_path):
    """Item 5: the exported config.json holds every key of the released one, and the original's
    config class + forward (which reads config.use_cache, config.torch_dtype, ...) run it."""
    directory = chatglm2_checkpoint(tmp_path / "cg2")
    model = llamakin.load(directory)
    model.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert CHATGLM2_RELEASED_KEYS <= set(written), CHATGLM2_RELEASED_KEYS - set(written)
    assert (
        written["auto_map"]["AutoModelForCausalLM"]
        == "modeling_chatglm.ChatGLMForConditionalGeneration"
    )
    config = chatglm2_config(written)
    for key in CHATGLM2_RELEASED_KEYS - {"model_type", "architectures", "auto_map", "torch_dtype"}:
        assert getattr(config, key) == json.loads((directory / "config.json").read_text())[key], key
    rows = prompts([12])
    ids = torch.tensor(rows)
    expected, _ = ChatGLM2(tmp_path / "out").forward(ids, torch.arange(12)[None])
    assert (model(ids) - expected).abs().max() < F32_TOL
    # without use_cache (the old export) the original forward fails the way the issue reports
    del written["use_cache"]
    (tmp_path / "out" / "config.json").write_text(json.dumps(written))
    with pytest.raises(AttributeError, match="use_cache"):
        ChatGLM2(tmp_path / "out").forward(ids, torch.arange(12)[None])


@torch.no_grad()
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_chatglm2_half_precision(tmp_path, dtype, tol):
    """The original computes its RoPE angles in config.torch_dtype (fp16/bf16 positions and
    frequencies) and multiplies the RMSNorm weight before the cast; llamakin builds float32 tables."""
    directory = chatglm2_checkpoint(tmp_path / "cg2", dtype=str(dtype).removeprefix("torch."))
    ids = torch.tensor(prompts([20]))
    expected, _ = ChatGLM2(directory).forward(ids, torch.arange(20)[None])
    got = llamakin.load(directory, dtype=dtype)(ids)
    assert (got.float() - expected.float()).abs().max() < tol


# -- generating past the trained context (item 7) --------------------------------------------------------
def test_generation_past_the_context_only_where_rope_scaling_extends_it(tmp_path, caplog):
    rows = prompts([12])
    qwen = llamakin.load(qwen_checkpoint(tmp_path / "qwen", seq_length=8, max_pos=16))
    run = GenerationRun(qwen, _Ids(), rows, SamplingParams(max_new_tokens=20, ignore_eos=True))
    list(run)
    # a warning of the "llamakin" logger: on stderr unless the application configures logging
    assert "past the model's trained context of 16" in caplog.text
    tokens, _ = QwenV1(tmp_path / "qwen").greedy(rows, 20)
    assert run.results[0].token_ids == tokens[0]
    plain = llamakin.load(qwen_checkpoint(tmp_path / "plain", logn=False, ntk=False, max_pos=16))
    with pytest.raises(llamakin.LlamakinError, match="more than the model's context of 16"):
        GenerationRun(plain, _Ids(), rows, SamplingParams(max_new_tokens=20))
    origin = llamakin.load(internlm_checkpoint(tmp_path / "ilm", kind="origin"))
    with pytest.raises(llamakin.LlamakinError, match="more than the model's context of 16"):
        GenerationRun(origin, _Ids(), rows, SamplingParams(max_new_tokens=5))
    # ChatGLM2's original indexes a RoPE table of seq_length rows: it cannot go past it either
    chatglm2 = llamakin.load(chatglm2_checkpoint(tmp_path / "cg2"))
    with pytest.raises(llamakin.LlamakinError, match="more than the model's context of 64"):
        GenerationRun(chatglm2, _Ids(), rows, SamplingParams(max_new_tokens=53))
    GenerationRun(chatglm2, _Ids(), rows, SamplingParams(max_new_tokens=52))  # 64 exactly: fine


# -- the server's continuous batch (item 1, through serve/engine.py) -------------------------------------
def test_qwen1_ntk_in_the_servers_continuous_batch(tmp_path):
    """Rows of different lengths join one cache and leave it at different times (the last row moves
    into a freed one); each keeps the NTK alpha of its own prompt, as the original computes it alone."""
    import asyncio

    from llamakin.serve.engine import Engine, Request

    directory = qwen_checkpoint(tmp_path / "qwen")
    model = llamakin.load(directory)
    rows, new = prompts([20, 5, 11]), [3, 9, 9]  # alphas 7, 1, 3; the first finishes first
    references = [QwenV1(directory).greedy([r], n) for r, n in zip(rows, new)]
    expected = [tokens[0] for tokens, _ in references]
    # the logits each row's sampler saw (a pass-through logits processor records them): tokens
    # alone are too coarse on this tiny model to notice a wrong alpha
    seen = [[] for _ in rows]

    def recorder(row):
        def record(generated, logits):
            seen[row].append(logits.clone())
            return logits

        return lambda: [record]

    async def serve():
        engine = Engine(model, _Ids(), max_batch=4)
        loop = asyncio.get_running_loop()
        requests = [
            Request(
                r,
                SamplingParams(max_new_tokens=n, ignore_eos=True),
                loop,
                asyncio.Queue(),
                make_processors=recorder(i),
            )
            for i, (r, n) in enumerate(zip(rows, new))
        ]
        for request in requests:
            engine.submit(request)
        results = await finished_results(requests)
        engine.stop()
        return [r.token_ids for r in results]

    assert asyncio.run(serve()) == expected
    for row, (_, steps) in enumerate(references):
        assert len(seen[row]) == new[row]
        diff = max((g - e[0]).abs().max().item() for g, e in zip(seen[row], steps))
        assert diff < F32_TOL, (row, diff)
