"""The core install stays lean: optional extras are refused in one sentence when missing, and
``import llamakin`` (with the CLI) loads none of them; library messages go through logging."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

from llamakin.cli import main
from llamakin.errors import LlamakinError
from llamakin.extras import require_extra


def pretend_missing(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a)
    )


def test_missing_serve_extra_is_one_sentence(monkeypatch, capsys):
    pretend_missing(monkeypatch, "fastapi")
    assert main(["serve", "--model", "does-not-matter"]) == 2
    err = capsys.readouterr().err
    assert "llamakin serve needs fastapi" in err and "pip install 'llamakin[serve]'" in err
    assert "Traceback" not in err


def test_missing_plot_extra_is_refused_before_any_work(monkeypatch, tmp_path):
    pretend_missing(monkeypatch, "matplotlib")
    with pytest.raises(LlamakinError, match=r"needs matplotlib.*llamakin\[plot\]"):
        require_extra("plot", "plotting training curves")
    from llamakin.train.experiment import diff_vs_baseline

    with pytest.raises(LlamakinError, match="needs matplotlib"):
        diff_vs_baseline(1000, tmp_path / "never-created")
    assert not (tmp_path / "never-created").exists()


def test_import_llamakin_loads_no_optional_dependency():
    code = (
        "import sys, llamakin, llamakin.cli; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'matplotlib', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_cli_shows_library_info_messages_on_stderr(capsys):
    main(["arch-diff", "llama", "llama"])  # any command sets up the handler
    capsys.readouterr()
    logging.getLogger("llamakin.catalog").info("pulling something")
    logging.getLogger("llamakin.catalog").debug("not shown")
    assert capsys.readouterr().err == "pulling something\n"
