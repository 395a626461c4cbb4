"""A headless Chromium driven through the Chrome DevTools Protocol (over a websocket).

Only what the chat-page test needs: open a page, run JavaScript, type, press keys, click,
grant permissions, take a screenshot. Protocol reference: https://chromedevtools.github.io/devtools-protocol/
(Page.navigate, Runtime.evaluate, Input.insertText, Input.dispatchKeyEvent, Input.dispatchMouseEvent,
Browser.grantPermissions, Page.captureScreenshot). Chromium writes the port it chose for
``--remote-debugging-port=0`` to ``DevToolsActivePort`` in its profile directory.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page, closed by :meth:`close`."""

    def __init__(
        self,
        executable: str,
        profile: Path,
        width: int = 1000,
        height: int = 760,
        timeout: float = 60.0,
    ):
        import websocket  # websocket-client

        self.log = open(profile.parent / f"{profile.name}-chromium.log", "wb")
        self.process = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--mute-audio",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.width, self.height, self.next_id = width, height, 0
        try:
            port = self._port(profile / "DevToolsActivePort", timeout)
            targets = json.load(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout)
            )
            page = next(t for t in targets if t["type"] == "page")
            # no Origin header: Chromium refuses websocket clients from origins it was not told to allow
            self.ws = websocket.create_connection(
                page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True
            )
            self.call("Page.enable")
            self.call("Runtime.enable")
            # a headless page counts as focused
            self.call("Emulation.setFocusEmulationEnabled", enabled=True)
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except Exception:
            self.close()
            raise

    def _port(self, path: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CDPError(
                    f"chromium exited with status {self.process.returncode}; see {self.log.name}"
                )
            if path.exists():
                first = path.read_text().split("\n")[0].strip()
                if first.isdigit():
                    return int(first)
            time.sleep(0.1)
        raise CDPError(
            f"chromium did not open its DevTools port within {timeout} s; see {self.log.name}"
        )

    def call(self, method: str, **params):
        """Send one command and wait for its answer (events in between are dropped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(
                f"{expression!r} threw: {details.get('exception', {}).get('description') or details}"
            )
        return result["result"].get("value")

    def open(self, url: str, timeout: float = 30.0) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(
            "document.readyState === 'complete' && location.href.startsWith("
            + json.dumps(url)
            + ")",
            timeout,
        )

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.05):
        """Poll a JavaScript expression until it is truthy; its value, or :class:`CDPError`."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"waited {timeout} s for {expression!r}")
            time.sleep(interval)

    def type_text(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                nativeVirtualKeyCode=13,
            )

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
