"""Take docs/chat-page.png: `llamakin serve` with the default model, its chat page in headless
Chromium (the test suite's DevTools-protocol driver, tests/cdp.py), one question, the answer.

    .venv/bin/python docs/chat_page_screenshot.py [--out docs/chat-page.png] [--model NAME]

Needs Debian's `chromium` and the test extra (websocket-client).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from cdp import Browser, find_chromium  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three famous landmarks there."]
SYSTEM = "You are a helpful assistant. Answer briefly."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "chat-page.png"))
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    executable = find_chromium()
    if executable is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    port = free_port()
    command = [sys.executable, "-m", "llamakin.cli", "serve", "--port", str(port)]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as profile:
            browser = Browser(executable, Path(profile) / "profile", width=1000, height=820)
            try:
                browser.open(url + "/")
                browser.wait_for("document.getElementById('model').textContent !== 'connecting…'")
                browser.evaluate(
                    f"document.getElementById('system').value = {json.dumps(SYSTEM)}; "
                    "document.getElementById('settings-box').open = true; "
                    "document.getElementById('temperature-value').value = '0'; "
                    "document.getElementById('temperature').value = '0'; "
                    "document.getElementById('max-tokens').value = '96'; true"
                )
                for turn, question in enumerate(QUESTIONS, 1):
                    browser.type_text("#input", question)
                    browser.press_enter()
                    browser.wait_for(
                        f"document.querySelectorAll('.msg.assistant').length === {turn} && "
                        "document.body.dataset.state === 'idle'",
                        timeout=300,
                    )
                Path(args.out).write_bytes(browser.screenshot())
            finally:
                browser.close()
        print("wrote", args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
