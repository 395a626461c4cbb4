"""The chat page (``GET /``): one self-contained HTML file shipped inside the package.

``chat.html`` holds its own style and script and loads nothing from elsewhere (the machines
that run it may be offline); the Content-Security-Policy sent with it makes the browser hold the
page to that: scripts and styles only inline, requests only to this server.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

PAGE_FILE = "chat.html"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


@lru_cache(maxsize=1)
def chat_page() -> str:
    """The page's HTML (read once from the installed package)."""
    return resources.files(__package__).joinpath(PAGE_FILE).read_text(encoding="utf-8")


def add_page_route(app) -> None:
    from fastapi.responses import HTMLResponse

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(
            chat_page(),
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "Cache-Control": "no-cache",
            },
        )
