"""What loading holds in memory: no torch._dynamo import, GGUF pages released tensor by tensor
(the peak RSS itself is measured by benchmarks/bench_memory.py, not asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import llamakin
from llamakin.gguf_export import save_gguf
from llamakin.io.gguf import GGUFFile
from test_quant import tiny


@pytest.mark.parametrize("quantize", ["auto", None])
def test_loading_does_not_import_torch_dynamo(tmp_path, quantize):
    """Building the model on ``meta`` runs no op whose meta kernel is a Python decomposition
    (random init, torch.cat): the first one imports torch._dynamo (~830 modules, 68 MB resident
    on the default model)."""
    save_gguf(tiny(tied=True), tmp_path / "m.gguf", quant="Q4_1")
    code = (
        "import sys, llamakin\n"
        f"llamakin.load({str(tmp_path / 'm.gguf')!r}, quantize={quantize!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _resident_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_gguf_pages_released_and_read_again(tmp_path):
    """After release_pages the file's pages leave the resident set, and reading again gives the
    same values (the mapping is read-only: the pages come back from the file)."""
    model = llamakin.Transformer(
        llamakin.ModelConfig(
            vocab_size=4096, hidden_size=512, num_layers=1, num_heads=4, intermediate_size=512
        )
    )
    save_gguf(model, tmp_path / "m.gguf", quant="Q8_0")
    with GGUFFile(tmp_path / "m.gguf") as f:
        before = _resident_file_kb()
        first = f.raw("token_embd.weight").copy()  # 4096 x 512 Q8_0: ~2.2 MB of pages
        touched = _resident_file_kb()
        f.release_pages()
        released = _resident_file_kb()
        assert touched - before > 1500 and touched - released > 1500, (before, touched, released)
        assert (f.raw("token_embd.weight") == first).all()
        assert torch.equal(f.get("token_embd.weight"), f.get("token_embd.weight"))
