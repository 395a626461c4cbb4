"""Fuzzing of hostile files (issue 12): mutated GGUF and safetensors headers and config.json fields
load or are refused with a LlamakinError, within a time and memory bound (see fuzz_files.py).

The budget here is short (``LLAMAKIN_FUZZ_EXAMPLES`` per target, default 25, derandomized so
``make test`` is repeatable); ``benchmarks/fuzz_files.py`` runs thousands of random cases."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fuzz_files as fz

EXAMPLES = int(os.environ.get("LLAMAKIN_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fz.make_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_fuzz_gguf_headers(seeds, tmp_path, quant):
    original = seeds[quant].read_bytes()
    fz.check_load(seeds[quant], "gguf")  # the seed itself loads

    @FUZZ
    @given(st.data())
    def case(data):
        mutated, what = data.draw(fz.gguf_mutations(original), label="mutation")
        path = tmp_path / "m.gguf"
        path.write_bytes(mutated)
        fz.check_load(path, "gguf")

    case()


def test_fuzz_safetensors_headers(seeds, tmp_path):
    original = (seeds["hf"] / "model.safetensors").read_bytes()

    @FUZZ
    @given(st.data())
    def case(data):
        mutated, what = data.draw(fz.safetensors_mutations(original), label="mutation")
        fz.write_case(seeds["hf"], tmp_path / "ckpt")
        (tmp_path / "ckpt" / "model.safetensors").write_bytes(mutated)
        fz.check_load(tmp_path / "ckpt", "safetensors")

    case()


def test_fuzz_config_json(seeds, tmp_path):
    config = json.loads((seeds["hf"] / "config.json").read_text())

    @FUZZ
    @given(st.data())
    def case(data):
        mutated, what = data.draw(fz.config_mutations(config), label="mutation")
        fz.write_case(seeds["hf"], tmp_path / "ckpt")
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(mutated))
        fz.check_load(tmp_path / "ckpt", "config.json")

    case()


def test_the_bounds_catch_a_hang_and_an_allocation():
    """The runner's own guards work: a case that sleeps or maps too much fails instead of hanging."""
    import time

    import torch

    with pytest.raises(TimeoutError), fz.bounded(seconds=1):
        time.sleep(5)
    with pytest.raises((MemoryError, RuntimeError)), fz.bounded():
        torch.empty(fz.MEMORY_HEADROOM * 2, dtype=torch.uint8)
