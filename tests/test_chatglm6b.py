"""ChatGLM-6B (v1) against a re-implementation of its original ``modeling_chatglm.py``.

No native transformers class and no tokenizer exist offline, so the checkpoint is built in the
original layout with random tensors (config.json with the released keys, the original tensor
names), and the reference (``original_code.ChatGLM6B``) follows the original file: sequence-first,
per-head interleaved ``query_key_value``, 2-D RoPE from float16-rounded inverse frequencies with
tables in the model's dtype, ``query_key_layer_scaling``, the prefix-LM mask with the -10000 fill,
residuals on the normalised input scaled by sqrt(56) whatever the depth, GELU-tanh, its own cache,
and the tokenizer's left padding.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import llamakin
from llamakin.generate import GenerationRun, SamplingParams
from original_code import ChatGLM6B
from conftest import finished_results

V, D, H, LAYERS, INNER = 100, 32, 4, 2, 64
HD = D // H
GMASK, MASK, SOP, EOS = 90, 91, 92, 93


def make_checkpoint(directory, layers: int = LAYERS, seed: int = 0):
    config = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "vocab_size": V,
        "hidden_size": D,
        "num_layers": layers,
        "num_attention_heads": H,
        "inner_hidden_size": INNER,
        "layernorm_epsilon": 1e-5,
        "max_sequence_length": 256,
        "position_encoding_2d": True,
        "bos_token_id": SOP,
        "eos_token_id": EOS,
        "mask_token_id": MASK,
        "gmask_token_id": GMASK,
        "pad_token_id": 3,
        "use_cache": True,
        "torch_dtype": "float16",
    }
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (
            scale if scale is not None else shape[-1] ** -0.5
        )

    w = {"transformer.word_embeddings.weight": rand(V, D, scale=1.0)}
    for i in range(layers):
        t = f"transformer.layers.{i}."
        # a buffer the loader must skip
        w |= {
            t + "input_layernorm.weight": 1 + rand(D, scale=0.2),
            t + "input_layernorm.bias": rand(D, scale=0.1),
            t + "attention.query_key_value.weight": rand(3 * D, D),
            t + "attention.query_key_value.bias": rand(3 * D, scale=0.1),
            t + "attention.dense.weight": rand(D, D),
            t + "attention.dense.bias": rand(D, scale=0.1),
            t + "post_attention_layernorm.weight": 1 + rand(D, scale=0.2),
            t + "post_attention_layernorm.bias": rand(D, scale=0.1),
            t + "mlp.dense_h_to_4h.weight": rand(INNER, D),
            t + "mlp.dense_h_to_4h.bias": rand(INNER, scale=0.1),
            t + "mlp.dense_4h_to_h.weight": rand(D, INNER),
            t + "mlp.dense_4h_to_h.bias": rand(D, scale=0.1),
            t + "attention.rotary_emb.inv_freq": torch.ones(HD // 4),
        }
    w |= {
        "transformer.final_layernorm.weight": 1 + rand(D, scale=0.2),
        "transformer.final_layernorm.bias": rand(D, scale=0.1),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(w, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    return directory, w


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("chatglm6b"))


def reference_logits(
    directory, tokens: list[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """All positions' logits for one sequence, from the re-implemented original (``original_code.py``)."""
    reference = ChatGLM6B(directory, dtype)
    return reference.forward(*reference.encode([tokens]))[0][0]


PROMPTS = [
    [5, 17, 33, 8, 41, GMASK, SOP],
    [12, 7, GMASK, SOP],
    [30, 31, 32, 33, 34, 35, 36, 37, GMASK, SOP],
]


def test_config_and_knobs(checkpoint):
    model = llamakin.load(checkpoint[0])
    c = model.config
    assert (c.family, c.rope_layout, c.norm_type, c.mlp_type, c.prefix_lm) == (
        "chatglm",
        "glm2d",
        "layernorm",
        "gelu_tanh",
        True,
    )
    assert c.normed_residual_alpha == math.sqrt(56)  # whatever the depth (2 layers here)
    assert (c.rope_inv_freq_dtype, c.rope_table_dtype) == ("float16", "model")


@torch.no_grad()
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_logits_match_the_reference(checkpoint, prompt):
    directory, w = checkpoint
    model = llamakin.load(directory)
    got = model(torch.tensor([prompt]))[0]
    assert (got - reference_logits(directory, prompt)).abs().max() < 1e-5


@torch.no_grad()
def test_generation_follows_the_2d_position_protocol(checkpoint):
    """Greedy decoding with the cache equals the reference re-run on the growing sequence."""
    directory, w = checkpoint
    model = llamakin.load(directory)
    for prompt in PROMPTS:
        run = GenerationRun(
            model, _NoText(), [prompt], SamplingParams(max_new_tokens=6, ignore_eos=True)
        )
        for _ in run:
            pass
        sequence = list(prompt)
        for _ in range(6):
            sequence.append(int(reference_logits(directory, sequence)[-1].argmax()))
        assert run.results[0].token_ids == sequence[len(prompt) :]


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
    assert (
        main(["arch-diff", str(checkpoint[0]), "chatglm2", "qwen", "internlm2", "diff-transformer"])
        == 0
    )
    out = capsys.readouterr().out
    assert "prefix LM" in out and "2-D (two position streams)" in out and "pair-norm weight" in out


# -- against the original's own cache, padding, depth and dtypes (issue 11) ------------------------------
@pytest.fixture
def own_trace_cache(monkeypatch):
    """A fresh trace cache: the process-wide recording budget may be spent by earlier test files,
    and then the "traced" steps below would silently run eagerly."""
    from llamakin.speed import decode_trace as decode

    monkeypatch.setattr(decode, "TRACES", decode.TraceCache(8))


def _step_diff(got, expected):
    return max((g - e).abs().max().item() for g, e in zip(got, expected))


def _llamakin_steps(model, prompts, new_tokens):
    """GenerationRun's prefill and (traced) decode steps, recording the logits of each step."""
    from llamakin.model.positions import position_tracker
    from llamakin.speed.decode_trace import Decoder

    T = max(len(p) for p in prompts)
    ids = torch.tensor([[3] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    padded = bool((mask == 0).any())
    cache = model.new_cache(len(prompts), T + new_tokens)
    tracker = position_tracker(model.config)
    positions, _ = tracker.prompt(ids, mask.bool() if padded else None)
    with torch.inference_mode():
        steps = [
            model(
                ids,
                attention_mask=mask if padded else None,
                position_ids=positions,
                cache=cache,
                last_only=True,
            )[:, -1]
        ]
        decoder = Decoder(model, cache)
        assert decoder._graph is not None, "the decode step was not traced"
        for _ in range(new_tokens):
            steps.append(decoder.step(steps[-1].argmax(-1)[:, None], tracker.step()))
    return steps


@torch.no_grad()
def test_decoding_with_the_cache_and_padding_matches_the_original(checkpoint, own_trace_cache):
    directory, _ = checkpoint
    model = llamakin.load(directory)
    expected = ChatGLM6B(directory).greedy(PROMPTS, 6)
    assert _step_diff(_llamakin_steps(model, PROMPTS, 6), expected) < 1e-5


@torch.no_grad()
def test_residual_alpha_is_sqrt_56_at_every_depth(tmp_path, own_trace_cache):
    """Item 4: GLMBlock's num_layers defaults to 28 and the model never passes its own depth."""
    directory, _ = make_checkpoint(tmp_path / "three", layers=3, seed=1)
    model = llamakin.load(directory)
    assert model.config.normed_residual_alpha == math.sqrt(56)
    prompt = PROMPTS[0]
    assert (
        model(torch.tensor([prompt]))[0] - reference_logits(directory, prompt)
    ).abs().max() < 1e-5
    assert (
        _step_diff(_llamakin_steps(model, PROMPTS, 4), ChatGLM6B(directory).greedy(PROMPTS, 4))
        < 1e-5
    )


@torch.no_grad()
def test_float32_tables_from_float16_frequencies_on_a_long_prompt(checkpoint):
    """Item 3: 150 tokens, where a float16 table is 1.7e-3 off the float32 original."""
    directory, _ = checkpoint
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(4, 80, (150,), generator=g).tolist() + [GMASK, SOP]
    got = llamakin.load(directory)(torch.tensor([prompt]))[0]
    assert (got - reference_logits(directory, prompt)).abs().max() < 3e-5  # logits up to ~30


@torch.no_grad()
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_runs_build_tables_in_that_dtype(checkpoint, dtype, tol):
    """The original's inv_freq buffer follows the model's dtype: fp16/bf16 products and tables.
    Tolerance relative to the largest logit (~30 here): a few units in the last place of that dtype
    (fp16: 2^-11, bf16: 2^-8), since the two compute the same ops in a different order (SDPA vs
    baddbmm and a float32 softmax)."""
    directory, _ = checkpoint
    model = llamakin.load(directory, dtype=dtype)
    for prompt in PROMPTS:
        got = model(torch.tensor([prompt]))[0].float()
        expected = reference_logits(directory, prompt, dtype).float()
        assert (got - expected).abs().max() / expected.abs().max() < tol


def test_export_is_read_by_the_original_and_refuses_another_alpha(checkpoint, tmp_path):
    directory, _ = checkpoint
    model = llamakin.load(directory)
    model.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    # THUDM/chatglm-6b's config.json, less _name_or_path/transformers_version
    released = {
        "architectures",
        "auto_map",
        "bos_token_id",
        "eos_token_id",
        "mask_token_id",
        "gmask_token_id",
        "pad_token_id",
        "hidden_size",
        "inner_hidden_size",
        "layernorm_epsilon",
        "max_sequence_length",
        "model_type",
        "num_attention_heads",
        "num_layers",
        "position_encoding_2d",
        "torch_dtype",
        "use_cache",
        "vocab_size",
    }
    assert released <= set(written), released - set(written)
    with torch.no_grad():
        assert (
            model(torch.tensor([PROMPTS[1]]))[0] - reference_logits(tmp_path / "out", PROMPTS[1])
        ).abs().max() < 1e-5
    other = llamakin.Transformer(model.config.replace(normed_residual_alpha=2.0))
    with pytest.raises(llamakin.LlamakinError, match="sqrt\\(56\\)"):
        other.save_pretrained(tmp_path / "bad", family="chatglm")


class _Letters(_NoText):
    """One character per token id, so the served text can be compared, not only the ids."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(0x100 + i) for i in ids)


def test_the_server_serves_it_with_the_text_of_generate(checkpoint):
    """The prefix LM through the server's continuous batch (rows of different lengths in one step,
    one of them n=2 samples sharing a prefill) gives what llamakin.generate gives for each alone."""
    import asyncio

    from llamakin.generation import derive_seed
    from llamakin.serve.engine import Engine, new_request

    model = llamakin.load(checkpoint[0])
    tok = _Letters()
    # (a repetition penalty: the tied random model repeats its last token otherwise)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True, repetition_penalty=5.0)
    sampled = SamplingParams(
        max_new_tokens=6, ignore_eos=True, repetition_penalty=5.0, temperature=1.0, seed=3
    )
    expected = [
        llamakin.generate(model, tok, p, max_new_tokens=6, ignore_eos=True, repetition_penalty=5.0)
        for p in PROMPTS
    ]
    expected += [
        llamakin.generate(
            model,
            tok,
            PROMPTS[1],
            max_new_tokens=6,
            ignore_eos=True,
            repetition_penalty=5.0,
            temperature=1.0,
            seed=derive_seed(3, i),
        )
        for i in range(2)
    ]
    assert all(expected) and expected[3] != expected[4]

    async def serve():
        engine = Engine(model, tok, max_batch=8, context=64)
        assert not engine.prefix_caching  # not exact for a prefix LM (its prompt attends both ways)
        requests = [new_request(p, greedy) for p in PROMPTS] + [
            new_request(PROMPTS[1], sampled, n=2)
        ]
        for request in requests:
            engine.submit(request)
        results = await finished_results(requests[:3] + [requests[3], *requests[3].forks])
        engine.stop()
        return [r.text for r in results]

    assert asyncio.run(serve()) == expected


@torch.no_grad()
def test_the_cores_decode_positions_follow_the_original(checkpoint):
    """Every step's logits through the generation core (what generate and the server run) equal
    the original's on the growing sequence; a repetition penalty keeps the random model from
    repeating one token, so the sequence really grows."""
    directory, _ = checkpoint
    model = llamakin.load(directory)
    for prompt in PROMPTS[:2]:
        logits = []
        run = GenerationRun(
            model,
            _NoText(),
            [prompt],
            SamplingParams(max_new_tokens=5, ignore_eos=True, repetition_penalty=5.0),
            processors=[
                [lambda generated, row_logits: logits.append(row_logits.clone()) or row_logits]
            ],
        )
        list(run)
        sequence = list(prompt) + run.results[0].token_ids
        assert len(set(run.results[0].token_ids)) > 2
        for step, got in enumerate(logits):
            want = reference_logits(directory, sequence[: len(prompt) + step])[-1]
            assert (got - want).abs().max() < 1e-5, step
