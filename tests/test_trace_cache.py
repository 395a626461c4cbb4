"""The decode-trace cache is bounded: recording a trace allocates no second KV cache, the cache
keeps at most its capacity (least recently used out), and what it evicts is traced again with
the same results. RSS over a sweep of the real model is measured in ``benchmarks/bench_soak.py``.
"""

from __future__ import annotations

import gc

import pytest
import torch

import llamakin
import llamakin.speed.decode_trace as decode
from llamakin.generate import GenerationRun, SamplingParams
from llamakin.model.cache import KVCache
from llamakin.speed.decode_trace import Decoder, TraceCache


def small_model():
    torch.manual_seed(0)
    config = llamakin.ModelConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return llamakin.Transformer(config).eval()


@pytest.fixture
def traces(monkeypatch):
    """A fresh process-wide trace cache of capacity 2 for the test."""
    monkeypatch.setenv("LLAMAKIN_TRACE", "1")
    cache = TraceCache(2, budget=100)
    monkeypatch.setattr(decode, "TRACES", cache)
    return cache


@torch.no_grad()
def test_recording_allocates_no_second_cache_and_leaves_the_cache_untouched(traces, monkeypatch):
    model = small_model()
    cache = model.new_cache(4, 32)
    for k, v in zip(cache.keys, cache.values):  # every slot holds something, the last ones included
        k.normal_()
        v.normal_()
    before = [t.clone() for t in cache.keys + cache.values]
    created = []
    real_init = KVCache.__init__
    monkeypatch.setattr(
        KVCache,
        "__init__",
        lambda self, *a, **kw: (created.append(a), real_init(self, *a, **kw))[1],
    )
    decoder = Decoder(model, cache)
    assert decoder._graph is not None and created == []
    assert all(torch.equal(a, b) for a, b in zip(before, cache.keys + cache.values))


def test_least_recently_used_out_and_dead_models_forgotten():
    lru = TraceCache(2)
    a, b = small_model(), small_model()
    lru.put(a, ("x",), (), "gx")
    lru.put(a, ("y",), (), "gy")
    assert lru.get(a, ("x",), ()) == "gx"  # x is now the most recently used
    lru.put(b, ("z",), (), "gz")  # evicts y, the least recently used
    assert lru.keys() == [("x",), ("z",)] and lru.evicted == 1
    assert lru.get(a, ("y",), ()) is None
    assert lru.get(a, ("x",), ("other weights",)) is None  # stale weights never replay
    assert lru.keys(b) == [("z",)]
    del b
    gc.collect()
    assert lru.keys() == [("x",)]


@torch.no_grad()
def test_a_bounded_cache_retraces_with_identical_results(traces, monkeypatch):
    """Five shapes through a cache of two: never more than two traces, every step bit-identical
    to the eager step, and a shape evicted and used again is traced again."""
    model = small_model()
    shapes = [(1, 32), (2, 32), (4, 64), (1, 64), (2, 32)]
    for batch, length in shapes:
        for trace in ("1", "0"):
            monkeypatch.setenv("LLAMAKIN_TRACE", trace)
            cache = model.new_cache(batch, length)
            model(torch.arange(3 * batch).view(batch, 3) % 97, cache=cache)
            step = Decoder(model, cache).step(torch.full((batch, 1), 5), torch.full((batch, 1), 3))
            if trace == "1":
                traced = step
        assert torch.equal(traced, step)
        assert len(traces) <= 2
    # (2, 32) was evicted by (4, 64), then traced again
    assert traces.traced == 5 and traces.evicted == 3


def test_generate_goes_through_the_bounded_cache(traces):
    """Three batch sizes through ``GenerationRun`` (what ``llamakin.generate`` runs): three traces
    recorded, two kept."""
    model = small_model()
    for rows in (1, 2, 3):
        run = GenerationRun(
            model,
            _NoTokenizer(),
            [list(range(1, 6))] * rows,
            SamplingParams(max_new_tokens=3, ignore_eos=True),
        )
        for _ in run:
            pass
    assert len(traces) == 2 and traces.traced == 3


class _NoTokenizer:
    """Just enough tokenizer for GenerationRun on ids."""

    eos_token_ids: list[int] = []

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def test_counts_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLAMAKIN_TRACE_CACHE", "5")
    assert decode._count_from_environment("LLAMAKIN_TRACE_CACHE", 8) == 5
    monkeypatch.setenv("LLAMAKIN_TRACE_CACHE", "many")
    with pytest.warns(UserWarning, match="LLAMAKIN_TRACE_CACHE"):
        assert decode._count_from_environment("LLAMAKIN_TRACE_CACHE", 8) == 8


@torch.no_grad()
def test_once_the_recording_budget_is_spent_new_shapes_run_eagerly(monkeypatch):
    """TorchScript keeps part of every recording for good, so recordings are budgeted: past the
    budget a shape without a kept trace runs eagerly, with the same logits, and nothing is recorded."""
    monkeypatch.setenv("LLAMAKIN_TRACE", "1")
    budgeted = TraceCache(1, budget=2)
    monkeypatch.setattr(decode, "TRACES", budgeted)
    model = small_model()
    results = {}
    for batch in (1, 2, 1, 2):
        cache = model.new_cache(batch, 32)
        model(torch.arange(3 * batch).view(batch, 3) % 97, cache=cache)
        decoder = Decoder(model, cache)
        results.setdefault(batch, []).append(
            decoder.step(torch.full((batch, 1), 5), torch.full((batch, 1), 3))
        )
    assert budgeted.traced == 2 and len(budgeted) == 1
    # the batch-2 trace is kept; the second batch-1 step ran eagerly
    assert budgeted.keys()[0][0] == 2
    assert all(torch.equal(a, b) for a, b in results.values())


@torch.no_grad()
def test_cpu_graph_runs_without_the_reoptimising_executor_and_equals_eager(traces):
    """The frozen graph runs with TorchScript's profile-guided re-optimisation off on CPU (its
    second-call pass cost tens of seconds on the int4 model for no speed), with eager's logits."""
    model = small_model()
    tokens = torch.tensor([[3], [7]])
    cache, eager_cache = model.new_cache(2, 32), model.new_cache(2, 32)
    decoder = Decoder(model, cache)
    graph, seen = decoder._graph, []

    def recording_graph(*inputs):
        seen.append(torch._C._get_graph_executor_optimize())
        return graph(*inputs)

    decoder._graph = recording_graph
    for step in range(4):
        positions = torch.full((2, 1), step)
        traced = decoder.step(tokens, positions)
        slots = torch.full((2,), step)
        eager = model.decode_step(tokens, positions, slots, eager_cache.valid, eager_cache)
        assert torch.equal(traced, eager)
        tokens = traced.argmax(-1, keepdim=True)
    assert seen == [False] * 4
    assert torch._C._get_graph_executor_optimize()  # restored after each call
