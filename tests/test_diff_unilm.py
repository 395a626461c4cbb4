"""The Differential Transformer in microsoft/unilm's layout against a reference written from
spec §7.1 (multihead_flashdiff_2's mapping), exact conversion to HF DiffLlama, and one test per
known implementation mistake of §7.4 showing the reference would catch it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import llamakin
from llamakin.cli import main

V, E, LAYERS, FFN = 80, 64, 2, 96


def make_checkpoint(
    directory, pairs: int, kv_pairs: int, seed: int = 0, norm_eps: float = 1e-5
) -> dict:
    hd = E // pairs // 2
    n_rep = pairs // kv_pairs
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (
            scale if scale is not None else shape[-1] ** -0.5
        )

    w = {
        "tok_embeddings.weight": rand(V, E, scale=1.0),
        "norm.weight": 1 + rand(E, scale=0.2),
        "output.weight": rand(V, E),
    }
    for i in range(LAYERS):
        m = f"layers.{i}."
        w |= {
            m + "attention_norm.weight": 1 + rand(E, scale=0.2),
            m + "ffn_norm.weight": 1 + rand(E, scale=0.2),
            m + "attn.q_proj.weight": rand(E, E),
            m + "attn.k_proj.weight": rand(E // n_rep, E),
            m + "attn.v_proj.weight": rand(E // n_rep, E),
            m + "attn.out_proj.weight": rand(E, E),
            m + "attn.subln.weight": 1 + rand(2 * hd, scale=0.3),
            m + "feed_forward.w1.weight": rand(FFN, E),
            m + "feed_forward.w3.weight": rand(FFN, E),
            m + "feed_forward.w2.weight": rand(E, FFN),
        }
        w |= {m + f"attn.lambda_{n}": rand(hd, scale=0.1) for n in ("q1", "k1", "q2", "k2")}
    config = {
        "model_type": "diff_transformer",
        "vocab_size": V,
        "embed_dim": E,
        "num_layers": LAYERS,
        "num_heads": pairs,
        "num_kv_heads": kv_pairs,
        "ffn_dim": FFN,
        "norm_eps": norm_eps,
        "rope_theta": 10000.0,
        "max_positions": 64,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(w, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    return w


def reference(
    w: dict,
    ids: torch.Tensor,
    pairs: int,
    kv_pairs: int,
    mistake: str | None = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """unilm's model, attention as multihead_flashdiff_2 computes it (spec §7.1), one sequence.

    ``mistake`` switches in one of the errors of spec §7.4 to show this reference notices it.
    """
    hd = E // pairs // 2
    n_rep = pairs // kv_pairs
    T = ids.shape[0]
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(T).float(), inv)
    causal = torch.full((T, T), float("-inf")).triu(1)

    def rms(x, weight, eps=norm_eps):  # the container's norms use its norm_eps
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(x):  # interleaved pairs (2i, 2i+1) -- GPT-J style, as unilm's rotary
        x2 = x.view(T, hd // 2, 2)
        a, b = x2[..., 0], x2[..., 1]
        return torch.stack([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1).view(
            T, hd
        )

    def softmax_map(q, k):
        return (rope(q) @ rope(k).T / math.sqrt(hd) + causal).softmax(-1)

    h = w["tok_embeddings.weight"][ids]
    for layer in range(LAYERS):
        m = f"layers.{layer}."
        x = rms(h, w[m + "attention_norm.weight"])
        q = (x @ w[m + "attn.q_proj.weight"].T).view(T, 2 * pairs, hd)
        k = (x @ w[m + "attn.k_proj.weight"].T).view(T, 2 * kv_pairs, hd)
        v = (x @ w[m + "attn.v_proj.weight"].T).view(T, kv_pairs, 2 * hd)
        depth = layer + 1 if mistake == "one_based_lambda_init" else layer
        lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)
        lq1, lk1, lq2, lk2 = (w[m + f"attn.lambda_{n}"] for n in ("q1", "k1", "q2", "k2"))
        lam = torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + lambda_init
        heads = []
        for i in range(pairs):
            if mistake == "naive_gqa_mapping":  # query head 2i+t -> key head (2i+t)//n_rep
                k1, k2 = k[:, (2 * i) // n_rep], k[:, (2 * i + 1) // n_rep]
            else:  # flash mapping: pair i -> key heads 2(i//n_rep)+t
                k1, k2 = k[:, 2 * (i // n_rep)], k[:, 2 * (i // n_rep) + 1]
            q1, q2 = q[:, 2 * i], q[:, 2 * i + 1]
            if mistake == "feature_split":  # one 2hd-wide head cut in two along its features
                both = torch.cat([q1, q2], -1)
                q1, q2 = both[:, :hd].contiguous(), both[:, hd:].contiguous()
                q1, q2 = (
                    torch.cat([q1[:, : hd // 2], q2[:, : hd // 2]], -1),
                    torch.cat([q1[:, hd // 2 :], q2[:, hd // 2 :]], -1),
                )
            value = v[:, i // n_rep]
            if mistake == "subtract_before_softmax":
                s1 = rope(q1) @ rope(k1).T / math.sqrt(hd)
                s2 = rope(q2) @ rope(k2).T / math.sqrt(hd)
                out = (s1 - lam * s2 + causal).softmax(-1) @ value
            else:
                out = softmax_map(q1, k1) @ value - lam * (softmax_map(q2, k2) @ value)
            heads.append(out)
        o = torch.stack(heads, 1)  # [T, P, 2hd]
        if mistake == "norm_over_model_dim":
            o = rms(o.reshape(T, -1), w[m + "attn.subln.weight"].repeat(pairs), eps=1e-5).view(
                T, pairs, 2 * hd
            )
        else:
            # per pair over 2hd, after the difference; RMSNorm(2 * head_dim, eps=1e-5) in unilm
            o = rms(o, w[m + "attn.subln.weight"], eps=1e-5)
        o = o * (1 - lambda_init)
        h = h + o.reshape(T, -1) @ w[m + "attn.out_proj.weight"].T
        x = rms(h, w[m + "ffn_norm.weight"])
        gate, up = x @ w[m + "feed_forward.w1.weight"].T, x @ w[m + "feed_forward.w3.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[m + "feed_forward.w2.weight"].T
    return rms(h, w["norm.weight"]) @ w["output.weight"].T


@pytest.fixture(params=[(4, 4), (4, 2)], ids=["mha", "gqa"])
def unilm(request, tmp_path):
    pairs, kv_pairs = request.param
    w = make_checkpoint(tmp_path / "unilm", pairs, kv_pairs)
    return tmp_path, w, pairs, kv_pairs


@torch.no_grad()
def test_unilm_checkpoint_matches_the_reference(unilm):
    tmp_path, w, pairs, kv_pairs = unilm
    model = llamakin.load(tmp_path / "unilm")
    c = model.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (2 * pairs, 2 * kv_pairs, E // pairs // 2)
    assert (
        c.attention_kind == "differential" and c.diff_norm_affine and c.rope_layout == "interleaved"
    )
    ids = torch.randint(0, V, (13,))
    expected = reference(w, ids, pairs, kv_pairs)
    assert (model(ids[None])[0] - expected).abs().max() < 1e-5
    cache = model.new_cache(1, 16)
    steps = [model(ids[None, :5], cache=cache)] + [
        model(ids[None, t : t + 1], cache=cache) for t in range(5, 13)
    ]
    assert (torch.cat(steps, 1)[0] - expected).abs().max() < 1e-5


@torch.no_grad()
def test_exact_conversion_to_diffllama_and_back(unilm, capsys):
    tmp_path, w, pairs, kv_pairs = unilm
    transformers = pytest.importorskip("transformers")
    assert (
        main(["convert", str(tmp_path / "unilm"), str(tmp_path / "hf"), "--to", "diffllama"]) == 0
    )
    out = capsys.readouterr().out
    assert "folded into o_proj" in out and "rotate_half" in out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "DiffLlamaForCausalLM"
    ids = torch.randint(0, V, (11,))
    expected = reference(w, ids, pairs, kv_pairs)
    assert (hf(ids[None]).logits[0] - expected).abs().max() < 1e-5
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "diff_transformer"])
        == 0
    )
    back = llamakin.load(tmp_path / "back")
    assert (back(ids[None])[0] - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "mistake",
    [
        "feature_split",
        "subtract_before_softmax",
        "norm_over_model_dim",
        "one_based_lambda_init",
        "naive_gqa_mapping",
    ],
)
@torch.no_grad()
def test_each_known_mistake_would_be_caught(mistake, tmp_path):
    """spec §7.4: each mistake changes the logits far beyond the tolerance the tests above use."""
    pairs, kv_pairs = (4, 2)
    w = make_checkpoint(tmp_path / "unilm", pairs, kv_pairs, seed=1)
    ids = torch.randint(0, V, (12,))
    right = reference(w, ids, pairs, kv_pairs)
    assert (llamakin.load(tmp_path / "unilm")(ids[None])[0] - right).abs().max() < 1e-5
    assert (reference(w, ids, pairs, kv_pairs, mistake=mistake) - right).abs().max() > 1e-2


@torch.no_grad()
def test_mixing_the_pair_layouts_is_caught(tmp_path):
    """spec §7.4 item 5: reading unilm's adjacent pairs as if they were HF's halves is wrong."""
    pairs, kv_pairs = 4, 4
    w = make_checkpoint(tmp_path / "unilm", pairs, kv_pairs)
    model = llamakin.load(tmp_path / "unilm")
    state = model.state_dict()
    for i in range(LAYERS):  # undo the pair reordering: unilm's rows taken as they are
        m = f"layers.{i}."
        state[m + "attn.qkv.weight"] = torch.cat([w[m + f"attn.{p}_proj.weight"] for p in "qkv"])
    model.load_state_dict(state)
    ids = torch.randint(0, V, (10,))
    assert (model(ids[None])[0] - reference(w, ids, pairs, kv_pairs)).abs().max() > 1e-2


@torch.no_grad()
def test_subln_keeps_unilm_epsilon_whatever_the_container_norm_eps(tmp_path):
    """Item 8: unilm's subln is RMSNorm(2 * head_dim, eps=1e-5) whatever the blocks' norms use."""
    pairs, kv_pairs = 4, 2
    w = make_checkpoint(tmp_path / "unilm", pairs, kv_pairs, seed=2, norm_eps=1e-6)
    model = llamakin.load(tmp_path / "unilm")
    assert model.config.norm_eps == 1e-6 and model.config.diff_norm_eps == 1e-5
    ids = torch.randint(0, V, (12,))
    expected = reference(w, ids, pairs, kv_pairs, norm_eps=1e-6)
    assert (model(ids[None])[0] - expected).abs().max() < 1e-5
    model.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (written["norm_eps"], written["subln_eps"]) == (1e-6, 1e-5)
    assert (llamakin.load(tmp_path / "again")(ids[None])[0] - expected).abs().max() < 1e-5
    # HF DiffLlama's group norm shares rms_norm_eps, so this model has no exact DiffLlama form
    with pytest.raises(llamakin.LlamakinError, match="diff_norm_eps"):
        model.save_pretrained(tmp_path / "hf", family="diffllama")


@torch.no_grad()
def test_padded_batch_half_precision_and_export_read_by_the_reference(tmp_path):
    """The rest of issue 11's list for this family. unilm's model has no padding code (a causal
    mask over one sequence), so a left-padded row must give the logits of that row alone, also
    while decoding with the cache; fp16/bf16 runs round like the float32 reference; the export
    (unilm's tensor names) is read back by the reference itself."""
    from safetensors.torch import load_file

    pairs, kv_pairs = 4, 2
    w = make_checkpoint(tmp_path / "unilm", pairs, kv_pairs, seed=3)
    model = llamakin.load(tmp_path / "unilm")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (12, 7, 3)]
    T, new = 12, 5
    ids = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(T) >= T - len(r) for r in rows]).long()
    logits = model(ids, attention_mask=mask)
    for b, r in enumerate(rows):
        assert (logits[b, T - len(r) :] - reference(w, r, pairs, kv_pairs)).abs().max() < 1e-5
    # decoding the padded batch with the cache, a fixed continuation per row
    cont = torch.randint(0, V, (3, new), generator=g)
    cache = model.new_cache(3, T + new)
    model(ids, attention_mask=mask, cache=cache)
    for t in range(new):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        step = model(cont[:, t : t + 1], attention_mask=mask, cache=cache)
        for b, r in enumerate(rows):
            whole = torch.cat([r, cont[b, : t + 1]])
            expected = reference(w, whole, pairs, kv_pairs)[-1]
            assert (step[b, -1] - expected).abs().max() < 1e-5, (b, t)
    ids = rows[0]
    expected = reference(w, ids, pairs, kv_pairs)
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        half = llamakin.load(tmp_path / "unilm", dtype=dtype)
        assert (half(ids[None])[0].float() - expected).abs().max() < tol, dtype
    model.save_pretrained(tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert set(written) == set(w)
    assert (model(ids[None])[0] - reference(written, ids, pairs, kv_pairs)).abs().max() < 1e-5
