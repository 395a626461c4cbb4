"""Several LoRA adapters in one server, one chosen per request by ``model``: rows of one batch on
different adapters (and on none) each equal that adapter merged alone (float32); the server,
driven by the official openai client, lists the adapters and answers each request with its own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import llamakin
from llamakin import LlamakinError
from llamakin.cli import main
from llamakin.lora import LoraSettings, apply_lora, load_adapter, save_adapter
from llamakin.lora.multi import (
    MultiLoraLinear,
    attach_adapters,
    parse_adapter_options,
    select_rows,
    with_adapter,
)
from llamakin.speed.decode_trace import Decoder
from test_lora import randomize_adapters
from test_server import Server
from assets import smollm2_gguf
from conftest import tiny_model

openai = pytest.importorskip("openai")
MODEL = "tiny-test"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random model over SmolLM2's tokenizer saved as a Hugging Face directory, and two PEFT
    adapters of different ranks, scales and targets."""
    root = tmp_path_factory.mktemp("multi")
    tok = llamakin.load_tokenizer(smollm2_gguf())
    tiny_model(tok, max_position_embeddings=256).save_pretrained(root / "base", family="llama")
    tok.save(root / "base")
    for name, settings, seed in (
        ("bard", LoraSettings(rank=4, alpha=8, targets="q,v,down"), 1),
        ("pirate", LoraSettings(rank=2, alpha=6, targets="q,k,v,o,gate,up,down"), 2),
    ):
        model = llamakin.load(root / "base")
        apply_lora(model, settings)
        randomize_adapters(model, seed=seed, scale=2.0)
        save_adapter(model, root / name)
    return root, tok


def multi_model(root):
    model = llamakin.load(root / "base").eval()
    assert attach_adapters(model, {"bard": root / "bard", "pirate": root / "pirate"}) == [
        "bard",
        "pirate",
    ]
    return model


def test_rows_on_different_adapters_equal_each_adapter_merged_alone(setup):
    root, _ = setup
    model = multi_model(root)
    assert isinstance(model.layers[0].attn.qkv, MultiLoraLinear)
    bard = llamakin.load(root / "base", adapter=root / "bard")
    pirate = llamakin.load(root / "base", adapter=root / "pirate")
    base = llamakin.load(root / "base")
    ids = torch.randint(
        0, model.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        select_rows(model, [1, 2, 0, 1])
        out = model(ids)
        select_rows(model, None)
        # against each adapter merged alone: float32 rounding of (W + s B A) x against W x + s B (A x), on
        # logits of magnitude ~7 (the test model's widened embeddings): measured 3.5e-5, so 1e-4 absolute
        # (~1e-5 relative)
        assert (out[0] - bard(ids[:1])[0]).abs().max() < 1e-4
        assert (out[3] - bard(ids[3:])[0]).abs().max() < 1e-4
        assert (out[1] - pirate(ids[1:2])[0]).abs().max() < 1e-4
        # unmerged alone (LoraLinear: its own product order, per-part B, scale applied to A x): the same
        for row, name in ((0, "bard"), (1, "pirate")):
            alone = load_adapter(llamakin.load(root / "base"), root / name)
            assert (out[row] - alone(ids[row : row + 1])[0]).abs().max() < 1e-4, name
        assert torch.equal(out[2], base(ids)[2])  # no adapter: the base, bit for bit
        assert (
            bard(ids[:1]) - base(ids[:1])
        ).abs().max() > 1e-2  # the adapters do change the model
        assert torch.equal(model(ids), base(ids))  # nothing selected: the base
        assert (with_adapter(model, 2, model, ids[1:2]) - pirate(ids[1:2])).abs().max() < 1e-4


@pytest.mark.parametrize("traced", [True, False])
def test_decode_steps_carry_the_rows_adapters(setup, traced, monkeypatch):
    """The per-row indices are an input of the frozen decode trace, not a constant recorded in it."""
    from llamakin.speed import decode_trace as decode

    monkeypatch.setenv("LLAMAKIN_TRACE", "1" if traced else "0")
    # a fresh trace cache: the process-wide recording budget may be spent by earlier test files
    monkeypatch.setattr(decode, "TRACES", decode.TraceCache(4))
    root, _ = setup
    model = multi_model(root)
    merged = {
        1: llamakin.load(root / "base", adapter=root / "bard"),
        2: llamakin.load(root / "base", adapter=root / "pirate"),
        0: llamakin.load(root / "base"),
    }
    prompt = torch.randint(
        0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        for order in ([1, 2, 0], [0, 1, 2]):  # the same trace, other adapters per row
            cache = model.new_cache(3, 256)
            for row, adapter in enumerate(order):
                select_rows(model, [adapter])
                model(prompt, cache=cache.view(row), last_only=True)
            decoder = Decoder(model, cache)
            assert (decoder._graph is not None) == traced
            token = torch.tensor([[5], [5], [5]])
            lengths = torch.full((3,), prompt.shape[1])
            select_rows(model, order)
            logits = decoder.step_rows(token, lengths[:, None], lengths)
            expected = {
                a: m(torch.cat([prompt, token[:1]], dim=1))[0, -1] for a, m in merged.items()
            }
            for row, adapter in enumerate(order):
                # float32 rounding on logits of magnitude ~10 (measured 1e-4); another adapter is 1e-2+ away
                assert (logits[row] - expected[adapter]).abs().max() < 3e-4, (order, row)
                assert all(
                    (logits[row] - expected[other]).abs().max() > 1e-2
                    for other in expected
                    if other != adapter
                )


@pytest.fixture(scope="module")
def server(setup):
    root, tok = setup
    model = multi_model(root)
    s = Server(model, tok, max_batch=4, context=256, adapters=["bard", "pirate"])
    yield s
    s.close()


def test_server_lists_the_adapters_and_serves_each_request_with_its_own(server, setup):
    root, tok = setup
    client = server.client()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, "bard", "pirate"]
    assert models[1].model_extra.get("parent") == MODEL
    expected = {
        MODEL: llamakin.load(root / "base"),
        "bard": llamakin.load(root / "base", adapter=root / "bard"),
        "pirate": llamakin.load(root / "base", adapter=root / "pirate"),
    }
    expected = {
        name: llamakin.generate(m, tok, "Once upon a time", max_new_tokens=10, ignore_eos=True)
        for name, m in expected.items()
    }
    assert len(set(expected.values())) == 3  # three different models

    def ask(name):
        out = client.completions.create(
            model=name, prompt="Once upon a time", max_tokens=10, temperature=0
        )
        return out.model, out.choices[0].text

    names = [MODEL, "bard", "pirate"] * 2
    with ThreadPoolExecutor(6) as pool:  # concurrent: rows of one batch on different adapters
        answers = list(pool.map(ask, names))
    for name, (echoed, text) in zip(names, answers):
        assert echoed == name and expected[name].startswith(text) and text, (
            name,
            text,
            expected[name],
        )
    chat = client.chat.completions.create(
        model="pirate",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
    )
    assert chat.model == "pirate" and chat.choices[0].logprobs.content
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nobody", prompt="x", max_tokens=2)
    assert (
        caught.value.body["param"] == "model" and "'bard', 'pirate'" in caught.value.body["message"]
    )
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_logprobs_of_an_adapter_request_are_that_adapters(server, setup):
    root, tok = setup
    out = server.client().completions.create(
        model="bard", prompt="To be or not", max_tokens=0, echo=True, logprobs=0, temperature=0
    )
    ids = tok.encode("To be or not")
    bard = llamakin.load(root / "base", adapter=root / "bard")
    with torch.no_grad():
        logprobs = bard(torch.tensor([ids]))[0].log_softmax(-1)
    expected = [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert out.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_adapter_options(setup, capsys):
    root, _ = setup
    assert parse_adapter_options(["some/dir"]) == (["some/dir"], {})
    assert parse_adapter_options(["a=x", "b.2=y/z"]) == ([], {"a": "x", "b.2": "y/z"})
    assert parse_adapter_options(["./a=b"]) == (["./a=b"], {})  # a path with '=' in it
    with pytest.raises(LlamakinError, match="cannot be mixed"):
        parse_adapter_options(["a=x", "dir"])
    with pytest.raises(LlamakinError, match="only one can be merged"):
        parse_adapter_options(["x", "y"])
    with pytest.raises(LlamakinError, match="given twice"):
        parse_adapter_options(["a=x", "a=y"])
    assert (
        main(
            ["generate", "hi", "--model", str(root / "base"), "--adapter", f"bard={root / 'bard'}"]
        )
        == 2
    )
    assert "serves adapters by name" in capsys.readouterr().err
    assert (
        main(
            [
                "serve",
                "--model",
                str(root / "base"),
                "--adapter",
                f"{root / 'bard'}",
                "--adapter",
                f"p={root / 'pirate'}",
                "--port",
                "1",
            ]
        )
        == 2
    )
    assert "cannot be mixed" in capsys.readouterr().err
