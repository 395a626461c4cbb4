"""The server's ``logprobs`` / ``echo``: token log-probabilities equal the model's own, in OpenAI's
shapes, and lm-evaluation-harness's ``local-completions`` model scores tasks through the server
exactly as the in-process ``llamakin`` lm-eval model does."""

from __future__ import annotations

import httpx
import pytest
import torch

import llamakin
from eval_assets import tiny_llama_dir
from test_harness import offline_env, write_tasks
from test_server import MODEL, Server, post

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-logprobs")
    path = tiny_llama_dir(root, bos=True)
    model, tok = llamakin.load(path), llamakin.load_tokenizer(path)
    server = Server(model, tok, max_batch=4, context=96)
    yield path, model, tok, server, root
    server.close()


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def test_echo_with_max_tokens_0_gives_the_prompt_logprobs(setup):
    _, model, tok, server, _ = setup
    ids = tok.encode("Shall I compare thee to a summer's day?")
    r = post(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    table = direct_logprobs(model, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = [table[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    assert lp["tokens"] == [tok.decode([i]) for i in ids] and choice["text"] == tok.decode(ids)
    assert lp["text_offset"][:3] == [
        0,
        len(lp["tokens"][0]),
        len(lp["tokens"][0]) + len(lp["tokens"][1]),
    ]
    best = table[0].topk(3)
    # token text -> logprob; ids that decode alike (byte pieces) keep the best
    top = lp["top_logprobs"][1]
    assert 1 <= len(top) <= 3 and list(top.values())[0] == pytest.approx(
        best.values[0].item(), abs=1e-5
    )
    assert all(any(abs(v - b) < 1e-5 for b in best.values.tolist()) for v in top.values())
    assert r.json()["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
    }


def test_generated_tokens_logprobs_in_both_shapes(setup):
    _, model, tok, server, _ = setup
    out = server.client().completions.create(
        model=MODEL, prompt="And God said", max_tokens=5, temperature=0, logprobs=2
    )
    choice = out.choices[0]
    from llamakin.generate import GenerationRun, SamplingParams

    ids = tok.encode("And God said")
    run = GenerationRun(model, tok, [ids], SamplingParams(max_new_tokens=5))
    for _ in run:
        pass
    full = ids + run.results[0].token_ids
    assert choice.logprobs.tokens == [tok.decode([i]) for i in run.results[0].token_ids]
    table = direct_logprobs(model, full)
    expected = [table[t - 1, full[t]].item() for t in range(len(ids), len(full))]
    assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert all(
        max(top.values()) == pytest.approx(lp, abs=1e-6)  # greedy: each token is the most likely
        for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs)
    )
    chat = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6) for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_a_batch_of_token_prompts(setup):
    _, model, tok, server, _ = setup
    prompts = [tok.encode("So long as men"), tok.encode("In the beginning God created the heaven")]
    r = post(
        server,
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": prompts,
            "max_tokens": 1,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
        },
    )
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, c in zip(prompts, choices):
        table = direct_logprobs(model, ids)
        assert len(c["logprobs"]["token_logprobs"]) == len(ids) + 1
        assert c["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(
            [table[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-5
        )


@pytest.mark.slow
def test_lm_eval_local_completions_through_the_server_matches_the_direct_model(setup):
    path, _, _, server, root = setup
    env = offline_env(root)
    import os

    os.environ.update(
        {k: env[k] for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")}
    )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import llamakin.harness  # noqa: F401 - registers "llamakin"

    tasks = write_tasks(root)
    manager = TaskManager(include_path=str(tasks))
    runs = {}
    for name, args in (
        (
            "local-completions",
            f"base_url={server.url}/v1/completions,model={MODEL},"
            f"tokenizer_backend=huggingface,tokenizer={path},max_length=90,add_bos_token=True",
        ),
        # lm-eval's API models keep max_length - 1 (one for the generated token) and cut rolling
        # windows one shorter again; the same windows in-process come from max_length 88
        ("llamakin", f"pretrained={path},max_length=88"),
    ):
        out = simple_evaluate(
            model=name,
            model_args=args,
            tasks=["lk_mc", "lk_rolling"],
            task_manager=manager,
            log_samples=True,
            batch_size=2,
            device="cpu",
        )
        runs[name] = {
            t: sorted(rows, key=lambda s: s["doc_id"]) for t, rows in out["samples"].items()
        }
    for task in ("lk_mc", "lk_rolling"):
        for a, b in zip(runs["local-completions"][task], runs["llamakin"][task]):
            ours = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in a["resps"]]
            theirs = [
                float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in b["resps"]
            ]
            assert ours == pytest.approx(theirs, abs=1e-4), task
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
