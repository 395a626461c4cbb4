"""What loading holds in memory: no torch._dynamo import, GGUF pages released tensor by tensor
(the peak RSS itself is measured by benchmarks/bench_memory.py, not asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import llamakin
from llamakin import resident
from llamakin.gguf_export import save_gguf
from llamakin.io.gguf import GGUFFile
from llamakin.quant.gguf_blocks import decode_q4, decode_q8_0, q4_to_int4
from llamakin.quant.gguf_embedding import MappedQ8Embedding
from llamakin.quant.linear import Int8Embedding
from llamakin.quant.tensors import compact_scales, expand_scales
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


def _q8_0_model(tmp_path, vocab=4096, hidden=512):
    model = llamakin.Transformer(
        llamakin.ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=1,
            num_heads=4,
            intermediate_size=512,
            tie_word_embeddings=True,
        )
    )
    save_gguf(model, tmp_path / "m.gguf", quant="Q8_0")
    return tmp_path / "m.gguf"


def _mapped_files(address: int) -> list[str]:
    """The files whose mapping holds ``address`` (from /proc/self/maps)."""
    found = []
    for line in open("/proc/self/maps"):
        parts = line.split(maxsplit=5)  # lo-hi perms offset device inode [path]
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= address < hi:
            found.append(parts[5].strip() if len(parts) == 6 else "")
    return found


def test_q8_0_embedding_looked_up_in_the_file(tmp_path):
    """A GGUF Q8_0 embedding is the file's own mapping (no resident copy), and everything read from
    it equals the table decoded up front (the tied head's int8 rows, lookups, files)."""
    path = _q8_0_model(tmp_path)
    model = llamakin.load(path, quantize="auto")
    embed = model.embed
    assert isinstance(embed, MappedQ8Embedding)
    assert _mapped_files(embed.q_blocks.data_ptr()) == [str(path)]
    assert _mapped_files(embed.d_blocks.data_ptr()) == [str(path)]
    with GGUFFile(path) as f:
        reference = Int8Embedding(*decode_q8_0(f.raw("token_embd.weight")), torch.float32)
    ids = torch.tensor([[0, 4095, 17, 17], [5, 6, 7, 2048]])
    assert torch.equal(embed(ids), reference(ids))
    assert torch.equal(embed.dequantize(100, 1200), reference.dequantize(100, 1200))
    assert torch.equal(embed.qweight, reference.qweight)
    assert torch.equal(embed.scales, reference.scales)
    head, expected = embed.to_int8_rows(), reference.to_int8_rows()
    assert torch.equal(head.qweight, expected.qweight) and torch.equal(head.scales, expected.scales)
    # the tied head built from it (held packed for exact integer products on a VNNI CPU)
    assert torch.equal(model.lm_head.quantized_weight().qweight, expected.qweight)


def test_tracing_does_not_read_the_whole_mapped_table(tmp_path):
    """``torch.jit.trace`` reads every attribute ``dir()`` lists; the table's decoded views
    (``qweight``/``scales``) must not be among them, or the whole table becomes resident."""
    model = llamakin.load(_q8_0_model(tmp_path, vocab=16384), quantize="auto")  # 8.9 MB of Q8_0
    assert "qweight" not in dir(model.embed) and "scales" not in dir(model.embed)
    ids = torch.tensor([[1, 2]])
    torch.jit.trace(nn.Embedding(4, 8), ids % 4, check_trace=False)  # torch's own pages, once
    before = _resident_file_kb()
    torch.jit.trace(model.embed, ids, check_trace=False)
    assert _resident_file_kb() - before < 2048  # the table: 8.9 MB


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return []


def test_table_advised_as_read_at_random(tmp_path):
    """The mapped table carries ``MADV_RANDOM`` (``rr`` in smaps): a lookup's page fault reads no
    read-ahead around it (measured on the default model, Linux 6.18: 50 random lookups made 23.5 MB
    of the file resident without it, 3.1 MB with it)."""
    model = llamakin.load(_q8_0_model(tmp_path), quantize="auto")
    for tensor in (model.embed.q_blocks, model.embed.d_blocks):
        assert "rr" in _vm_flags(tensor.data_ptr())
        assert "rr" in _vm_flags(tensor.data_ptr() + tensor.untyped_storage().nbytes() - 1)


def test_release_pages_leaves_anonymous_memory_alone():
    """Dropping pages of anonymous memory would zero them: ``release_pages`` only acts inside a
    file mapping."""
    table = torch.arange(1 << 20, dtype=torch.int32)  # 4 MB of heap
    address, length = resident.mapped_span(table)
    assert not resident.in_file_mapping(address, length)
    resident.release_pages(address, length)
    assert torch.equal(table, torch.arange(1 << 20, dtype=torch.int32))


def test_building_the_tied_head_drops_the_table_pages_as_it_goes(tmp_path):
    """``to_int8_rows`` reads the whole table once; each slice's pages leave the resident set once
    read, so the table is never resident whole (the default model's load peak: -29 MB)."""
    model = llamakin.load(_q8_0_model(tmp_path, vocab=32768), quantize="auto")
    before = _resident_file_kb()
    head = model.embed.to_int8_rows()
    assert _resident_file_kb() - before < 1024  # KB; the table is 17.8 MB
    assert torch.equal(head.qweight, model.lm_head.quantized_weight().qweight)


def test_int4_scales_kept_as_exact_halves(tmp_path):
    """A Q4_1 file's int4 scales and zeros are held as fp16 bits (half of float32) and read back
    bit for bit; scales that fp16 would round stay float32."""
    save_gguf(tiny(tied=True), tmp_path / "m.gguf", quant="Q4_1")
    model = llamakin.load(tmp_path / "m.gguf", quantize="auto")
    with GGUFFile(tmp_path / "m.gguf") as f:
        q, d, m = decode_q4(f.raw("blk.0.ffn_down.weight"), "Q4_1")
    down = model.layers[0].mlp.down
    assert down.stored_scales.dtype == torch.int16 and down.stored_zeros.dtype == torch.int16
    exact = q4_to_int4(q, d, m)
    bits = lambda t: t.view(torch.int32)  # noqa: E731  (bit for bit: -0.0 is not 0.0)
    assert torch.equal(bits(down.scales), bits(exact.scales))
    assert torch.equal(bits(down.zeros), bits(exact.zeros))
    back = down.quantized_weight()
    assert torch.equal(back.q, exact.q) and torch.equal(bits(back.zeros), bits(exact.zeros))
    rounded = torch.full((4, 2), 0.1)  # 0.1 is not a float16
    kept = compact_scales(rounded, rounded)
    assert kept[0].dtype == torch.float32 and torch.equal(expand_scales(*kept)[1], rounded)


def test_writing_into_a_table_read_in_place_changes_neither_the_file_nor_crashes(tmp_path):
    """The mapping is copy-on-write: load_state_dict into a MappedQ8Embedding writes this
    process's copy of the pages (a read-only mapping would end the process with SIGSEGV)."""
    import gguf
    import numpy as np

    from llamakin.io.gguf import GGUFFile
    from llamakin.quant.gguf_embedding import MappedQ8Embedding

    path = tmp_path / "table.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    values = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("t", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = path.read_bytes()
    embedding = MappedQ8Embedding(GGUFFile(path).mapped("t"), torch.float32)
    state = {k: torch.zeros_like(v) for k, v in embedding.state_dict().items()}
    embedding.load_state_dict(state, strict=False)
    assert not embedding.q_blocks.any()
    assert path.read_bytes() == before
