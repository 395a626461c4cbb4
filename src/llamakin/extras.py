"""Optional dependencies: features whose packages the core install leaves out.

``pip install llamakin`` installs what loading, converting, generating and training need;
``llamakin[serve]`` adds fastapi and uvicorn (``llamakin serve``), ``llamakin[plot]`` adds
matplotlib (``llamakin plot``, the experiment's curves). A missing one is one sentence naming
the extra, not an ImportError deep inside.
"""

from __future__ import annotations

import importlib.util

from .errors import LlamakinError

EXTRAS = {"serve": ("fastapi", "uvicorn", "prometheus_client"), "plot": ("matplotlib",)}


def require_extra(extra: str, feature: str) -> None:
    """Raise ``LlamakinError`` when a package of ``extra`` is not installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise LlamakinError(
            f"{feature} needs {' and '.join(missing)}, which the core install leaves out; "
            f"install it with: pip install 'llamakin[{extra}]'."
        )
