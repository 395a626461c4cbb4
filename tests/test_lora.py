"""LoRA: the layer's arithmetic and initialisation (as PEFT), per-part adapters on fused matrices,
PEFT's format both ways against peft + transformers (llama, qwen2, a model with q/k/v biases, an
interleaved-RoPE base), merging, training runs (frozen base, adapter-only checkpoints, exact
resume, export) and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import llamakin
from llamakin import ConfigError, LlamakinError
from llamakin.cli import main
from llamakin.lora import (
    LoraLinear,
    LoraSettings,
    apply_lora,
    hf_family,
    load_adapter,
    lora_layers,
    merge,
    module_names,
    save_adapter,
)
from llamakin.model.linear import Linear
from llamakin.train import recipe, train
from llamakin.train.loop import param_groups
from conftest import crash_and_resume, metrics_losses
from hf_cases import CASES, save_case
from test_train import corpus  # noqa: F401 - the shared prepared corpus fixture

ALL = "q,k,v,o,gate,up,down"


def case(name):
    return next(c for c in CASES if c.name == name)


def randomize_adapters(model, seed=0, scale=0.5):
    """Non-zero B (PEFT starts from B = 0, which would hide every mistake in B's layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for part in layer.adapted:
                for p in (layer.lora_A[part], layer.lora_B[part]):
                    p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1]))


# -- the layer -----------------------------------------------------------------------------------------
def test_layer_computes_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = Linear(12, 10, bias=True)
    layer = LoraLinear(
        base, (("a", 6), ("b", 4)), ranks={"a": 3, "b": 2}, scales={"a": 2.0, "b": 0.5}
    )
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), base(x))  # B = 0 at initialisation: the base model exactly
    # kaiming_uniform(a=sqrt(5)) on fan_in 12, PEFT's (and nn.Linear's) default
    bound = 1 / math.sqrt(12)
    assert layer.lora_A["a"].abs().max() <= bound and layer.lora_A["a"].abs().max() > 0.5 * bound
    with torch.no_grad():
        layer.lora_B["a"].normal_()
        layer.lora_B["b"].normal_()
    expected = (
        x @ base.weight.T
        + base.bias
        + torch.cat(
            (
                2.0 * x @ layer.lora_A["a"].T @ layer.lora_B["a"].T,
                0.5 * x @ layer.lora_A["b"].T @ layer.lora_B["b"].T,
            ),
            -1,
        )
    )
    assert (layer(x) - expected).abs().max() < 1e-5
    assert layer.weight is base.weight  # shared, not copied


def test_untargeted_parts_keep_the_base_rows_and_dropout_hits_the_adapter_input_only():
    torch.manual_seed(0)
    base = Linear(8, 9, bias=False)
    layer = LoraLinear(
        base,
        (("q", 3), ("k", 3), ("v", 3)),
        ranks={"q": 2, "v": 2},
        scales={"q": 1.0, "v": 1.0},
        dropout=0.5,
    )
    with torch.no_grad():
        layer.lora_B["q"].normal_()
        layer.lora_B["v"].normal_()
    x = torch.randn(4, 8)
    layer.train()
    y = layer(x)
    assert torch.equal(y[:, 3:6], base(x)[:, 3:6])
    layer.eval()
    assert not torch.equal(y[:, :3], layer(x)[:, :3])  # dropout active in training only
    assert set(dict(layer.named_parameters())) == {
        "weight",
        "lora_A.q",
        "lora_A.v",
        "lora_B.q",
        "lora_B.v",
    }


def tiny_model(**knobs):
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        **knobs,
    )
    return llamakin.Transformer(config)


def test_fused_matrices_get_one_adapter_per_projection_and_the_base_is_frozen():
    model = tiny_model()
    apply_lora(model, LoraSettings(rank=4, alpha=8, targets="q,v,up,lm_head"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {
        f"layers.{i}.{m}.lora_{ab}.{p}"
        for i in range(2)
        for ab in "AB"
        for m, p in (("attn.qkv", "q"), ("attn.qkv", "v"), ("mlp.gate_up", "up"))
    } | {f"lm_head.lora_{ab}.lm_head" for ab in "AB"}
    assert model.layers[0].attn.qkv.lora_B["q"].shape == (4 * 8, 4)
    assert model.layers[0].attn.qkv.lora_B["v"].shape == (2 * 8, 4)
    optimized = {id(p) for group in param_groups(model, 0.0) for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in trained}


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        apply_lora(model, LoraSettings(rank=4, alpha=8))
        randomize_adapters(model)
        model.gradient_checkpointing = checkpointing
        model.train()
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        model(ids).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) < 1e-6


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_matrices_held_in_bfloat16_train_exactly_as_autocast_casts_them(tied):
    """Under bf16 autocast every product casts its float32 weight to bf16 anyway; holding the
    frozen matrices in bf16 must give the same loss and adapter gradients, bit for bit (the eager
    and the fused-loss paths, the first block's product on a no-grad input included)."""
    from llamakin.lora.model import hold_frozen_matrices_in
    from llamakin.train.loss import token_loss_sum

    results = []
    for held in (False, True):
        model = tiny_model(tie_word_embeddings=tied)
        apply_lora(model, LoraSettings(rank=4, alpha=8, targets="q,v,up"))
        randomize_adapters(model)
        if held:
            freed = hold_frozen_matrices_in(model, torch.bfloat16)
            matrices = [m.weight for m in model.modules() if isinstance(m, Linear)]
            assert freed == sum(w.numel() * 2 for w in matrices)  # 4 bytes -> 2 each
            assert all(w.dtype == torch.bfloat16 for w in matrices)
            # the embedding (a tied head's table too), norms and adapters stay float32
            assert model.embed.weight.dtype == torch.float32
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            assert all(
                m.weight.dtype == torch.float32
                for m in model.modules()
                if "Norm" in type(m).__name__
            )
        model.train()
        g = torch.Generator().manual_seed(1)
        x, y = (
            torch.randint(0, 64, (2, 12), generator=g),
            torch.randint(0, 64, (2, 12), generator=g),
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = token_loss_sum(model, x, y) / y.numel()
            logits = model(x)
        (loss + logits.float().square().mean()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), logits.detach(), grads))
    (loss0, logits0, grads0), (loss1, logits1, grads1) = results
    assert torch.equal(loss0, loss1) and torch.equal(logits0, logits1)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[n], grads1[n]) for n in grads0)


# -- PEFT's format, both ways --------------------------------------------------------------------------
def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def peft_logits(hf_dir, adapter_dir, ids):
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(hf_model(hf_dir), str(adapter_dir)).eval()(ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen2-window", "granite-code-bias-llama3", "qwen3"])
def test_exported_adapter_gives_the_same_logits_in_peft(name, tmp_path):
    save_case(case(name), tmp_path / "hf")
    ours = llamakin.load(tmp_path / "hf")
    targets = ALL + (",lm_head" if ours.lm_head is not None else "")
    apply_lora(ours, LoraSettings(rank=4, alpha=12, targets=targets))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "hf"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    } | ({"lm_head"} if ours.lm_head is not None else set())
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
    got = peft_logits(tmp_path / "hf", tmp_path / "adapter", ids)
    assert (got - expected).abs().max() < 1e-5
    base = hf_model(tmp_path / "hf")(ids).logits.detach()
    assert (base - expected).abs().max() > 1e-2  # the adapter matters


def test_adapter_made_by_peft_loads_with_rank_and_alpha_patterns(tmp_path):
    peft = pytest.importorskip("peft")
    save_case(case("qwen2-window"), tmp_path / "hf")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        init_lora_weights=False,
        lora_dropout=0.1,
    )
    torch.manual_seed(0)
    made = peft.get_peft_model(hf_model(tmp_path / "hf"), config).eval()
    made.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 128, (1, 11))
    with torch.no_grad():
        expected = made(ids).logits
        merged = llamakin.load(tmp_path / "hf", adapter=tmp_path / "adapter")
        assert (merged(ids) - expected).abs().max() < 1e-5
        separate = load_adapter(llamakin.load(tmp_path / "hf"), tmp_path / "adapter").eval()
        assert (separate(ids) - expected).abs().max() < 1e-5
    qkv = separate.layers[0].attn.qkv
    assert qkv.adapted == ("q", "v") and qkv.lora_A["v"].shape[0] == 2 and qkv.scales["v"] == 8 / 2
    assert separate.layers[0].mlp.down.scales["down"] == 3 / 4
    # and out again: llamakin writes the per-module ranks and alphas as PEFT's patterns
    save_adapter(separate, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (
        written["r"] == 4
        and set(written["rank_pattern"].values()) == {2}
        and written["alpha_pattern"]
    )
    assert (peft_logits(tmp_path / "hf", tmp_path / "again", ids) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["llama", "granite-code-bias-llama3"])
def test_interleaved_rope_base_permutes_the_adapter_q_k_rows(name, tmp_path):
    hf = save_case(case(name), tmp_path / "hf")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "hf"),
                str(tmp_path / "inter"),
                "--rope-layout",
                "interleaved",
            ]
        )
        == 0
    )
    inter = llamakin.load(tmp_path / "inter")
    assert inter.config.rope_layout == "interleaved"
    targets = ALL + (",lm_head" if inter.lm_head is not None else "")
    apply_lora(inter, LoraSettings(rank=4, alpha=8, targets=targets))
    randomize_adapters(inter)
    save_adapter(inter, tmp_path / "adapter")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = inter(ids)
    assert (peft_logits(tmp_path / "hf", tmp_path / "adapter", ids) - expected).abs().max() < 1e-5
    # and back: the PEFT adapter on the interleaved base, unmerged and merged
    back = load_adapter(llamakin.load(tmp_path / "inter"), tmp_path / "adapter").eval()
    merged = llamakin.load(tmp_path / "inter", adapter=tmp_path / "adapter")
    with torch.no_grad():
        assert (back(ids) - expected).abs().max() < 1e-5
        assert (merged(ids) - expected).abs().max() < 1e-5
        # control: the file's q/k rows taken as they are (HF order on an interleaved base) are another model
        from safetensors.torch import load_file

        stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        for i, layer in enumerate(back.layers):
            for part in ("q", "k"):
                layer.attn.qkv.lora_B[part].copy_(
                    stored[f"base_model.model.model.layers.{i}.self_attn.{part}_proj.lora_B.weight"]
                )
        assert (back(ids) - expected).abs().max() > 1e-3
        assert (hf(ids).logits - expected).abs().max() > 1e-3  # and the adapter matters


def test_merge_equals_the_separate_adapter_and_exports_to_transformers(tmp_path):
    save_case(case("granite-code-bias-llama3"), tmp_path / "hf")
    model = llamakin.load(tmp_path / "hf")
    apply_lora(model, LoraSettings(rank=4, alpha=8))
    randomize_adapters(model)
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        expected = model(ids)
        merged = merge(model)
        assert not lora_layers(merged) and type(merged.layers[0].attn.qkv) is Linear
        assert (merged(ids) - expected).abs().max() < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    assert (hf_model(tmp_path / "merged")(ids).logits.detach() - expected).abs().max() < 1e-5


def test_module_names_come_from_the_family_rules():
    model = tiny_model(q_bias=True, k_bias=True, v_bias=True)
    family, permute = hf_family(model.config)
    names = module_names(model, family)
    assert not permute and family.name == "qwen2"
    assert names[("layers.1.attn.qkv", "k")] == "model.layers.1.self_attn.k_proj"
    assert names[("layers.0.mlp.gate_up", "up")] == "model.layers.0.mlp.up_proj"
    assert names[("lm_head", "lm_head")] == "lm_head"


# -- training runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(corpus, tmp_path_factory):  # noqa: F811
    """A small random llama (HF directory with the corpus's tokenizer) to adapt."""
    directory = tmp_path_factory.mktemp("base")
    torch.manual_seed(3)
    model = llamakin.Transformer(
        llamakin.ModelConfig(
            vocab_size=400,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    model.save_pretrained(directory, family="llama")
    llamakin.load_tokenizer(corpus[0] / "tokenizer").save(directory)
    return directory


LORA_RUN = [
    "seq_len=32",
    "micro_batch=4",
    "grad_accum=2",
    "warmup_steps=2",
    "eval_interval=3",
    "eval_batches=2",
    "save_interval=2",
    "lr=1e-2",
    "lora.rank=4",
    "lora.alpha=8",
    f"lora.targets={ALL}",
    "lora.dropout=0.1",
]


def lora_cfg(corpus, base, *extra):  # noqa: F811
    return recipe(
        "lora-sft",
        [
            *LORA_RUN,
            f"init_from={json.dumps(str(base))}",
            f"data={json.dumps(str(corpus[0]))}",
            *extra,
        ],
    )


def test_lora_run_trains_adapters_only_and_exports_a_peft_adapter(corpus, tiny_base, tmp_path):  # noqa: F811
    last = train(
        lora_cfg(corpus, tiny_base, "max_steps=6", "gradient_checkpointing=true"),
        tmp_path / "run",
        progress=False,
    )
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 7)) and "val_loss" in rows[2]
    assert last["loss"] < rows[0]["loss"]
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    # adapters only
    assert state["model"] and all(".lora_A." in n or ".lora_B." in n for n in state["model"])
    assert len(state["model"]) == 2 * 2 * 7
    # the export is PEFT's: transformers + peft give llamakin's logits with the trained adapter
    from llamakin.lora.train import run_model

    model, _, _ = run_model(tmp_path / "run")
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        expected = model(ids)
        base_logits = llamakin.load(tiny_base)(ids)
    assert (expected - base_logits).abs().max() > 1e-4  # it trained
    assert (peft_logits(tiny_base, tmp_path / "run" / "adapter", ids) - expected).abs().max() < 1e-5
    # the base was frozen: the run's model minus its adapters is the base, bit for bit
    base_state = llamakin.load(tiny_base).state_dict()
    for name, value in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(value, base_state[name]), name
    # --merge writes a Hugging Face model that transformers runs with the same logits
    assert main(["export-adapter", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge"]) == 0
    assert (hf_model(tmp_path / "merged")(ids).logits.detach() - expected).abs().max() < 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert main(["export-adapter", str(tmp_path / "run"), str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    # generate --adapter: the base with the adapter merged, greedy, is the adapted model's continuation
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamakin.cli",
            "generate",
            "To be",
            "--model",
            str(tiny_base),
            "--adapter",
            str(tmp_path / "run" / "adapter"),
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    tok = llamakin.load_tokenizer(tiny_base)
    expected_text = llamakin.generate(model, tok, "To be", max_new_tokens=6)
    assert out.stdout == "To be" + expected_text + "\n"


def test_lora_resume_after_a_crash_is_exact(corpus, tiny_base, tmp_path):  # noqa: F811
    settings = [
        *LORA_RUN,
        f"init_from={json.dumps(str(tiny_base))}",
        f"data={json.dumps(str(corpus[0]))}",
        "max_steps=6",
    ]
    train(recipe("lora-sft", settings), tmp_path / "whole", progress=False)
    losses = crash_and_resume("lora-sft", tmp_path / "cut", list(settings))
    assert losses == metrics_losses(tmp_path / "whole")  # bit for bit, dropout included


def test_bfloat16_lora_run_holds_its_frozen_base_in_bfloat16_and_logs_the_same_losses(
    corpus,  # noqa: F811
    tiny_base,
    tmp_path,
    monkeypatch,
):
    from llamakin.lora import train as lora_train
    from llamakin.lora.model import hold_frozen_matrices_in

    settings = [
        *LORA_RUN,
        f"init_from={json.dumps(str(tiny_base))}",
        f"data={json.dumps(str(corpus[0]))}",
        "max_steps=3",
        "precision=bfloat16",
    ]
    held = []

    def holding(model, dtype):
        held.append(hold_frozen_matrices_in(model, dtype))
        return held[-1]

    monkeypatch.setattr(lora_train, "hold_frozen_matrices_in", holding)
    train(recipe("lora-sft", settings), tmp_path / "held", progress=False)
    assert held and held[0] > 0
    monkeypatch.setattr(lora_train, "hold_frozen_matrices_in", lambda model, dtype: 0)
    train(recipe("lora-sft", settings), tmp_path / "cast", progress=False)
    assert metrics_losses(tmp_path / "held") == metrics_losses(tmp_path / "cast")
    # the exported adapter is the trained one, whatever the base was held in
    from llamakin.lora.train import run_model

    model, _, _ = run_model(tmp_path / "held")
    assert all(p.dtype == torch.float32 for p in model.parameters())


# -- bad input -----------------------------------------------------------------------------------------
def test_settings_errors(corpus, tiny_base):  # noqa: F811
    with pytest.raises(ConfigError, match="unknown LoRA target 'qq'"):
        lora_cfg(corpus, tiny_base, "lora.targets=q,qq")
    with pytest.raises(ConfigError, match="lora.rank must be a positive integer"):
        lora_cfg(corpus, tiny_base, "lora.rank=0")
    with pytest.raises(ConfigError, match="unknown LoRA setting lora.ranks"):
        lora_cfg(corpus, tiny_base, "lora.ranks=4")
    with pytest.raises(ConfigError, match="set init_from=MODEL"):
        recipe("shakespeare-tiny", ["lora.rank=4"])
    with pytest.raises(ConfigError, match="ties its output head"):
        apply_lora(tiny_model(tie_word_embeddings=True), LoraSettings(targets="q,lm_head"))


def test_bad_adapters_are_refused_in_one_sentence(tmp_path, capsys):
    save_case(case("llama"), tmp_path / "hf")
    model = llamakin.load(tmp_path / "hf")
    apply_lora(model, LoraSettings(rank=2, alpha=4, targets="q,v"))
    save_adapter(model, tmp_path / "good")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(
            (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
        )
        (d / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return d

    with pytest.raises(LlamakinError, match="uses DoRA"):
        llamakin.load(tmp_path / "hf", adapter=variant("dora", use_dora=True))
    with pytest.raises(LlamakinError, match="is a IA3 adapter"):
        llamakin.load(tmp_path / "hf", adapter=variant("ia3", peft_type="IA3"))
    with pytest.raises(
        LlamakinError, match="has no adapter_config.json; it is not a PEFT adapter directory"
    ):
        llamakin.load(tmp_path / "hf", adapter=tmp_path / "hf")
    other = tmp_path / "other"
    save_case(case("llama-mha-tied"), other)
    with pytest.raises(LlamakinError, match="trained for another model"):
        llamakin.load(other, adapter=tmp_path / "good")
    assert (
        main(
            [
                "generate",
                "hi",
                "--model",
                str(tmp_path / "hf"),
                "--adapter",
                str(tmp_path / "nowhere"),
            ]
        )
        == 2
    )
    assert "is not a directory" in capsys.readouterr().err
    assert main(["export-adapter", str(tmp_path / "hf"), str(tmp_path / "x")]) == 2
    assert "is not a finished or checkpointed training run" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_sft_recipe_on_the_default_model_and_its_shipped_example(tmp_path):
    """``--recipe lora-sft`` as shipped: SmolLM2-135M-Instruct, the example chats, loss on the
    assistant's tokens only; one short step and its exported adapter."""
    from llamakin.train.config import CHAT_EXAMPLE
    from assets import smollm2_gguf

    gguf = smollm2_gguf()
    lines = [json.loads(line) for line in open(CHAT_EXAMPLE)]
    assert len(lines) >= 40 and all(m["messages"][-1]["role"] == "assistant" for m in lines)
    cfg = recipe(
        "lora-sft",
        [
            f"init_from={json.dumps(str(gguf))}",
            "max_steps=1",
            "seq_len=64",
            "micro_batch=1",
            "grad_accum=1",
            "eval_interval=1",
            "eval_batches=1",
            "save_interval=1",
        ],
    )
    last = train(cfg, tmp_path / "sft", progress=False)
    meta = json.loads((tmp_path / "sft" / "data" / "meta.json").read_text())
    assert meta["sft"] and meta["documents"] == len(lines)
    mask = torch.from_numpy(
        __import__("numpy").fromfile(
            tmp_path / "sft" / "data" / "train_mask_000.bin", dtype="uint8"
        )
    )
    assert 0.2 < mask.float().mean() < 0.8  # prompts and templates are masked out, answers are not
    assert math.isfinite(last["loss"]) and math.isfinite(last["val_loss"])
    adapter = tmp_path / "sft" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and len(config["target_modules"]) == 7


@pytest.mark.slow
def test_lora_under_torchrun_equals_one_process(corpus, tiny_base, tmp_path):  # noqa: F811
    """2 CPU processes (gloo) at the same global batch as one process: DDP gives the same losses and
    adapters, FSDP2 the same losses."""

    def command(out, processes, *extra):
        launcher = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={processes}",
            ]
            if processes > 1
            else [sys.executable]
        )
        args = launcher + ["-m", "llamakin.cli", "train", "--recipe", "lora-sft", "--out", str(out)]
        for item in [
            *LORA_RUN,
            f"init_from={json.dumps(str(tiny_base))}",
            f"data={json.dumps(str(corpus[0]))}",
            "max_steps=3",
            "micro_batch=2",
            "lora.dropout=0",
            *extra,
        ]:
            args += ["--set", item]
        return args

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        command(tmp_path / "one", 1, "grad_accum=2"), capture_output=True, text=True, env=env
    )
    assert one.returncode == 0, one.stderr
    ddp = subprocess.run(
        command(tmp_path / "ddp", 2, "grad_accum=1"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr

    def losses(run):
        return [
            json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    a, b = (
        torch.load(run / "ckpt.pt", weights_only=True)["model"]
        for run in (tmp_path / "one", tmp_path / "ddp")
    )
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
    fsdp = subprocess.run(
        command(tmp_path / "fsdp", 2, "grad_accum=1", 'parallel="fsdp"'),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    # FSDP2 shards blocks that hold frozen and trained tensors
    assert fsdp.returncode == 0, fsdp.stderr
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-4)
    assert (tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors").is_file()
