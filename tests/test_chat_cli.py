"""``llamakin chat`` in a terminal: /system, /save, /load, /reset, and Ctrl-C stopping an answer, not the chat."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

import llamakin
from llamakin import cli
from llamakin.chat import read_conversation
from llamakin.errors import LlamakinError
from assets import smollm2_gguf


def tiny_model(context: int = 512):
    """A tiny random model whose greedy answers are words (untied: a tied one repeats newlines)."""
    tok = llamakin.load_tokenizer(smollm2_gguf())
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=context,
        tie_word_embeddings=False,
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0)
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def chat(monkeypatch, capsys, tiny, lines: list[str], *options: str) -> tuple[str, str]:
    monkeypatch.setattr(cli, "_open", lambda args: tiny)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert cli.main(["chat", "--temperature", "0", "--max-new-tokens", "8", *options]) == 0
    return capsys.readouterr()


def test_system_save_reset_load(tiny, tmp_path, monkeypatch, capsys):
    model, tok = tiny
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    out, err = chat(
        monkeypatch,
        capsys,
        tiny,
        [
            "/system You are brief.",
            "Hello",
            f"/save {first}",
            "/reset",
            f"/save {tmp_path / 'empty.json'}",
            f"/load {first}",
            "Go on",
            f"/save {second}",
            "/system",
            f"/save {tmp_path / 'nosystem.json'}",
            "/quit",
            "never read",
        ],
    )
    system = {"role": "system", "content": "You are brief."}
    hello = [system, {"role": "user", "content": "Hello"}]
    answer = llamakin.generate(model, tok, hello, max_new_tokens=8)
    saved = json.loads(first.read_text())["messages"]
    assert saved == hello + [{"role": "assistant", "content": answer}]
    # /reset keeps the system message
    assert json.loads((tmp_path / "empty.json").read_text())["messages"] == [system]
    # after /load the conversation goes on from the saved one
    go_on = saved + [{"role": "user", "content": "Go on"}]
    assert read_conversation(second) == go_on + [
        {"role": "assistant", "content": llamakin.generate(model, tok, go_on, max_new_tokens=8)}
    ]
    assert read_conversation(tmp_path / "nosystem.json") == read_conversation(second)[1:]
    assert (
        "[system message set]" in err
        and "[system message removed]" in err
        and "[3 messages loaded" in err
    )


def test_bad_commands_and_files_keep_the_chat_going(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "roles.json").write_text(
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]})
    )
    (tmp_path / "late_system.json").write_text(
        json.dumps([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    )
    out, err = chat(
        monkeypatch,
        capsys,
        tiny,
        [
            "/load",
            f"/load {tmp_path / 'missing.json'}",
            f"/load {tmp_path / 'bad.json'}",
            f"/load {tmp_path / 'roles.json'}",
            f"/load {tmp_path / 'late_system.json'}",
            f"/save {tmp_path}",
            "/frobnicate",
            "/help",
            "Hello",
        ],
    )
    assert "/load needs a file name" in err
    assert f"cannot read {tmp_path / 'missing.json'}" in err
    assert (
        "is not JSON" in err
        and "message 0 is not" in err
        and "only the first message may be one" in err
    )
    assert f"cannot write the conversation to {tmp_path}" in err
    assert "unknown command /frobnicate" in err and "/save FILE" in err
    assert out.strip()  # and it still answered


def test_a_conversation_file_in_the_bare_list_shape(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(
        json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    )
    assert read_conversation(path)[1] == {"role": "assistant", "content": "hello"}
    path.write_text(json.dumps({"messages": "nope"}))
    with pytest.raises(LlamakinError, match="holds no conversation"):
        read_conversation(path)


def test_ctrl_c_inside_a_reply_keeps_what_was_shown(tiny, monkeypatch):
    """The session side of Ctrl-C: a KeyboardInterrupt after some pieces stops the reply and keeps them."""
    from llamakin.chat import ChatSession
    from llamakin.generate import SamplingParams

    model, tok = tiny
    session = ChatSession(model, tok, SamplingParams(max_new_tokens=50))

    class Interrupting(io.StringIO):
        def write(self, text):
            super().write(text)
            if len(self.getvalue()) > 5:
                raise KeyboardInterrupt
            return len(text)

    shown = Interrupting()
    session.reply("Hello", shown)
    assert session.stopped and session.turns[-1] == {
        "role": "assistant",
        "content": shown.getvalue(),
    }
    session.reply("Again", None)  # the session still works
    assert not session.stopped and len(session.turns) == 4


def read_some(stream, seconds: float) -> bytes:
    """Bytes available on ``stream`` within ``seconds`` (at least one, or b'' on timeout)."""
    ready, _, _ = select.select([stream], [], [], seconds)
    return os.read(stream.fileno(), 65536) if ready else b""


@pytest.mark.slow
def test_sigint_stops_the_answer_not_the_program(tmp_path):
    """A real process and a real SIGINT (what Ctrl-C sends): the long answer stops, the chat goes on
    (a /save afterwards works) and the program leaves normally at /quit."""
    model, tok = tiny_model(context=8192)
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    saved = tmp_path / "chat.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llamakin.cli",
            "chat",
            "--model",
            str(tmp_path / "model"),
            "--temperature",
            "0",
            "--max-new-tokens",
            "8000",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # a terminal's Ctrl-C reaches a program whose SIGINT is at its default; a shell's background
        # job (`make test &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        process.stdin.write(b"Tell me everything\n")
        process.stdin.flush()
        shown = read_some(process.stdout, 120)
        assert shown, "no answer started within 120 s"
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.stdin.write(f"/save {saved}\n/quit\n".encode())
        process.stdin.flush()
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    err = err.decode()
    assert process.returncode == 0, err
    assert "[stopped]" in err and "Traceback" not in err
    messages = read_conversation(saved)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    answer = messages[1]["content"]
    assert answer and (shown + out).decode().startswith(answer)
    # stopped, far from its 8000 tokens
    assert len(tok.encode(answer, add_special_tokens=False)) < 7000
