"""The chat page (GET /): self-contained, and used for real in headless Chromium over the DevTools protocol."""

from __future__ import annotations

import io
import json
import re

import httpx
import pytest
import torch

import llamakin
from cdp import Browser, find_chromium
from test_server import MODEL, Server, slow_down_steps, tiny, wait_until  # noqa: F401 - tiny is a fixture

SYSTEM = "You answer in one sentence."


@pytest.fixture(scope="module")
def talkative(tiny):  # noqa: F811
    """A tiny random model whose greedy answers are visible words: with tied embeddings (``tiny``)
    the greedy answer to a chat is the template's last token, a newline, repeated."""
    _, tok = tiny
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = llamakin.Transformer(config).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0, 1.0)
    return model, tok


def test_page_is_one_self_contained_file(tiny):  # noqa: F811
    s = Server(*tiny, context=256)
    try:
        r = httpx.get(s.url + "/")
    finally:
        s.close()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    html = re.sub(r"<!--.*?-->", "", r.text, flags=re.S)  # comments may cite specifications
    assert "<script" in html and "<style" in html
    # nothing loaded from elsewhere: no external script, stylesheet, font, image or absolute URL
    for pattern in (
        r"<script[^>]*\ssrc=",
        r"<link\b",
        r"@import",
        r"url\(",
        r"https?://",
        r"<img\b",
        r"<iframe\b",
    ):
        assert not re.search(pattern, html, flags=re.I), pattern


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
        )
    b = Browser(executable, tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


def answers(browser) -> list[str]:
    return browser.evaluate(
        "[...document.querySelectorAll('.msg.assistant .content')].map(e => e.textContent)"
    )


def set_setting(browser, element_id: str, value) -> None:
    browser.evaluate(
        f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); "
        f"e.value = {json.dumps(str(value))}; e.dispatchEvent(new Event('input')); "
        "e.dispatchEvent(new Event('change')); })()"
    )


def spy_on_fetch(browser) -> None:
    """Record in ``window.sent`` every request body the page sends, then let it through."""
    browser.evaluate(
        "window.sent = []; const realFetch = window.fetch; window.fetch = (url, options) => {"
        " if (options && options.body) window.sent.push(JSON.parse(options.body));"
        " return realFetch(url, options); }; true"
    )


def send(browser, text: str, turn: int) -> None:
    """Type ``text`` into the message box, press Enter, wait for the whole answer."""
    browser.type_text("#input", text)
    browser.press_enter()
    browser.wait_for(
        f"window.sent.length === {turn} && document.body.dataset.state === 'idle'", timeout=120
    )


@pytest.mark.slow
def test_chat_in_chromium(talkative, browser, tmp_path, monkeypatch):
    """Stream two turns with a system prompt, temperature 0 and max tokens set on the page, compare the
    text in the DOM with llamakin.generate, copy an answer, stop a long answer, start a new chat."""
    from PIL import Image

    model, tok = talkative
    s = Server(model, tok, max_batch=4, context=512)
    try:
        browser.open(s.url + "/")
        browser.wait_for(f"document.getElementById('model').textContent === {json.dumps(MODEL)}")
        spy_on_fetch(browser)
        set_setting(browser, "system", SYSTEM)
        set_setting(browser, "temperature-value", 0)
        set_setting(browser, "max-tokens", 24)

        send(browser, "Hello there", turn=1)
        first = browser.evaluate("window.sent[0]")
        assert first["stream"] is True and first["model"] == MODEL
        assert first["temperature"] == 0 and first["max_tokens"] == 24
        conversation = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hello there"},
        ]
        assert first["messages"] == conversation
        expected = llamakin.generate(model, tok, conversation, max_new_tokens=24)
        assert expected.strip(), "the tiny model's greedy answer should not be blank"
        assert answers(browser) == [expected]  # every streamed piece reached the DOM, in order

        png = browser.screenshot()
        (tmp_path / "chat-page.png").write_bytes(png)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert image.size == (browser.width, browser.height)
        colors = image.getcolors(maxcolors=1 << 20)
        assert len(colors) > 20, "the screenshot is blank"

        send(browser, "And then?", turn=2)
        conversation += [
            {"role": "assistant", "content": expected},
            {"role": "user", "content": "And then?"},
        ]
        assert browser.evaluate("window.sent[1]")["messages"] == conversation
        second = llamakin.generate(model, tok, conversation, max_new_tokens=24)
        assert answers(browser) == [expected, second]

        # copy the first answer to the clipboard
        browser.call(
            "Browser.grantPermissions",
            origin=s.url,
            permissions=["clipboardReadWrite", "clipboardSanitizedWrite"],
        )
        browser.click(".msg.assistant .copy")
        browser.wait_for("document.querySelector('.msg.assistant .copy').textContent !== 'copy'")
        assert (
            browser.evaluate("document.querySelector('.msg.assistant .copy').textContent")
            == "copied"
        )
        assert browser.evaluate("navigator.clipboard.readText()") == expected

        # stop: a 300-token answer at >= 30 ms a token is stopped after its first text
        slow_down_steps(s.engine, 0.03, monkeypatch)
        before = s.engine.status()["generated_tokens"]
        set_setting(browser, "max-tokens", 300)
        browser.type_text("#input", "Tell me a long story")
        browser.press_enter()
        browser.wait_for(
            "document.body.dataset.state === 'streaming' && "
            "document.querySelectorAll('.msg.assistant .content')[2].textContent.length > 0"
        )
        browser.click("#stop")
        browser.wait_for("document.body.dataset.state === 'idle'", timeout=10)
        assert (
            browser.evaluate("document.querySelectorAll('.msg.assistant .note')[2].textContent")
            == "stopped"
        )
        assert wait_until(lambda: s.engine.status()["running"] == 0, seconds=5), (
            "the server kept generating"
        )
        assert s.engine.status()["generated_tokens"] - before < 200
        partial = answers(browser)[2]
        assert browser.evaluate("history.length") == 6
        # the stopped answer stays in the conversation
        assert browser.evaluate("history[5].content") == partial

        browser.click("#reset")
        assert browser.evaluate("document.querySelectorAll('.msg').length") == 0
        assert browser.evaluate("history.length") == 0
    finally:
        s.close()


@pytest.mark.slow
def test_chat_page_asks_for_the_api_key(talkative, browser):
    s = Server(*talkative, context=256, api_key="sesame")
    try:
        browser.open(s.url + "/")
        browser.wait_for("document.getElementById('model').textContent === 'not connected'")
        assert "API key" in browser.evaluate("document.getElementById('status').textContent")
        set_setting(browser, "api-key", "sesame")
        browser.wait_for(f"document.getElementById('model').textContent === {json.dumps(MODEL)}")
        set_setting(browser, "max-tokens", 8)
        spy_on_fetch(browser)
        send(browser, "Hi", turn=1)
        assert answers(browser)[0].strip()
        # a request the server refuses: its message on the page, the question back in the box to edit
        set_setting(browser, "max-tokens", 100000)
        send(browser, "Too long", turn=2)
        note = browser.evaluate("document.querySelectorAll('.msg.assistant .note')[1].textContent")
        assert note.startswith("failed: ") and "context" in note
        assert browser.evaluate("document.getElementById('input').value") == "Too long"
        # the refused question is not part of the conversation
        assert browser.evaluate("history.length") == 2
    finally:
        s.close()
