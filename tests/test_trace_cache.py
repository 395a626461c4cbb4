"""The decode-trace cache is bounded: recording a trace allocates no second KV cache, the cache
keeps at most its capacity (least recently used out), and what it evicts is traced again with
the same results. RSS over a sweep of the real model is measured in ``benchmarks/bench_soak.py``.
"""

from __future__ import annotations

import collections
import gc
import itertools
import threading
import weakref

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
        # the step attends to the slots filled so far (Decoder.step's span)
        key_valid = eager_cache.valid[:, : step + 1]
        eager = model.decode_step(tokens, positions, slots, key_valid, eager_cache)
        assert torch.equal(traced, eager)
        tokens = traced.argmax(-1, keepdim=True)
    assert seen == [False] * 4
    assert torch._C._get_graph_executor_optimize()  # restored after each call


# -- the step traced as a function -----------------------------------------------------------


class _FrozenModuleStep(torch.nn.Module):
    """The decode step as it used to be recorded: a module holding the model (so a TorchScript
    type per submodule), traced, then ``torch.jit.freeze``. The function trace must equal it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, slot, key_valid, keys: list[torch.Tensor], values, alpha):
        holder = decode._Holder()
        holder.keys, holder.values, holder.rope_alpha = keys, values, alpha
        return self.model.decode_step(tokens, positions, slot, key_valid, holder)


def _frozen_module_trace(model, example):
    traced = torch.jit.trace(_FrozenModuleStep(model), example, check_trace=False)
    return torch.jit.freeze(traced.eval())


def _family_model(name: str):
    """A tiny model of one family (test_decode_step's features), float32; or bfloat16; or int4
    with an int8 head and biases."""
    from llamakin.quant.model import quantize_model
    from test_decode_step import BASE, FEATURES, randomized

    if name == "plain bf16":
        return randomized(llamakin.ModelConfig(**BASE), torch.bfloat16)
    if name == "int4, int8 head":
        config = dict(BASE, hidden_size=64, num_heads=4, q_bias=True)
        return quantize_model(randomized(llamakin.ModelConfig(**config), torch.float32), "int4", 32)
    return randomized(llamakin.ModelConfig(**BASE, **FEATURES[name]), torch.float32)


# every family traced (dynamic NTK, "keys cached before RoPE", is decoded eagerly, never traced)
FAMILIES = [
    "plain",
    "window on some layers",
    "differential",
    "qk-norm, interleaved partial rotary",
    "logn scale",
    "ChatGLM-6B (2-D RoPE, LayerNorm, GELU)",
    "plain bf16",
    "int4, int8 head",
]


def _model_storages(model) -> set[int]:
    return {
        t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())
    }


def _prefilled_caches(model, batch, length, prompt, padded_row, padding, seed):
    """Three caches of ``length`` slots holding the same left-padded prompt (``padding`` pads on
    row ``padded_row``), and its attention mask."""
    ids = torch.randint(
        0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed)
    )
    mask = torch.ones(batch, prompt, dtype=torch.long)
    mask[padded_row, :padding] = 0
    caches = [model.new_cache(batch, length) for _ in range(3)]
    for cache in caches:
        model(ids, attention_mask=mask, cache=cache)
    return caches, mask


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_function_trace_equals_the_frozen_module_trace_and_eager(traces, name):
    """Bit for bit, step after step, padded rows included: the traced function, the frozen module
    trace it replaced, and ``decode_step`` in Python."""
    model = _family_model(name)
    batch, length = 2, 16
    caches, mask = _prefilled_caches(model, batch, length, 6, padded_row=0, padding=2, seed=1)
    function = Decoder(model, caches[0])
    assert isinstance(function._graph, torch.jit.ScriptFunction)
    reference, scratch = caches[1], model.new_cache(batch, length)  # recorded on a scratch cache
    glm = model.config.rope_layout == "glm2d"
    zeros = torch.zeros(batch, 1, dtype=torch.long)
    example = (zeros, torch.zeros(batch, 2, 1, dtype=torch.long) if glm else zeros)
    example += (torch.full((batch,), length - 1), scratch.valid, list(scratch.keys))
    example += (list(scratch.values), scratch.rope_alpha)
    frozen = _frozen_module_trace(model, example)
    for t in range(5):
        tokens = torch.randint(0, model.config.vocab_size, (batch, 1))
        real = mask.sum(-1, keepdim=True) + t
        positions = torch.stack((real, torch.zeros_like(real)), 1) if glm else real
        slots = torch.full((batch,), 6 + t)
        traced = function.step_rows(tokens, positions, slots)
        with torch.jit.optimized_execution(False):
            module = frozen(
                tokens,
                positions,
                slots,
                reference.valid,
                reference.keys,
                reference.values,
                reference.rope_alpha,
            )
        eager = model.decode_step(tokens, positions, slots, caches[2].valid, caches[2])
        assert torch.equal(traced, module) and torch.equal(traced, eager), (name, t)
    for a, b, c in zip(
        caches[0].keys + caches[0].values,
        reference.keys + reference.values,
        caches[2].keys + caches[2].values,
    ):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_one_trace_attends_to_any_span_of_slots_like_eager(traces, name):
    """The span of slots attended to is read from ``key_valid``'s width inside the trace (a size,
    not a constant): one trace, recorded over the whole cache, serves spans that grow with the
    rows and spans with room to spare, bit for bit as eager at the same span, and within float32
    summation order of attending to the whole masked cache."""
    model = _family_model(name)
    batch, length = 2, 24
    caches, mask = _prefilled_caches(model, batch, length, 5, padded_row=1, padding=3, seed=2)
    decoder = Decoder(model, caches[0])
    assert decoder._graph is not None
    glm = model.config.rope_layout == "glm2d"
    tolerance = 2e-2 if name == "plain bf16" else 1e-5
    for t, extra in enumerate((0, 0, 7, 0, 3)):  # the span: the filled slots, or more
        tokens = torch.randint(0, model.config.vocab_size, (batch, 1))
        real = mask.sum(-1, keepdim=True) + t
        positions = torch.stack((real, torch.zeros_like(real)), 1) if glm else real
        slots = torch.full((batch,), 5 + t)
        span = 5 + t + 1 + extra
        traced = decoder.step_rows(tokens, positions, slots, span=span)
        eager = model.decode_step(tokens, positions, slots, caches[1].valid[:, :span], caches[1])
        whole = model.decode_step(tokens, positions, slots, caches[2].valid, caches[2])
        assert torch.equal(traced, eager), (name, t)
        assert torch.allclose(traced.float(), whole.float(), atol=tolerance, rtol=0), (name, t)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        assert torch.equal(a, b)


def test_the_span_applies_on_cpu_only():
    """Other devices run TorchScript's optimising executor, which specialises on shapes: they
    attend to the whole cache at every step (one width)."""
    from llamakin.speed.decode_trace import attended_slots

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert attended_slots(9, 256, cpu) == 9
    assert attended_slots(None, 256, cpu) == 256
    assert attended_slots(300, 256, cpu) == 256
    assert attended_slots(9, 256, cuda) == 256


@pytest.mark.parametrize("name", ["plain", "plain bf16", "int4, int8 head"])
@torch.no_grad()
def test_function_trace_holds_the_models_own_weights_not_copies(traces, name):
    """Weights become constants of the traced graph as the model's own tensors (shared storage):
    every tensor constant larger than a shape-sized table (the key positions ``arange``) is one of
    the model's parameters or buffers."""
    model = _family_model(name)
    cache = model.new_cache(2, 16)
    graph = Decoder(model, cache)._graph.graph
    constants = [
        node.output().toIValue()
        for node in graph.nodes()
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType"
    ]
    own = _model_storages(model)
    copies = [c for c in constants if c.untyped_storage().data_ptr() not in own]
    assert len(constants) - len(copies) >= sum(1 for _ in model.parameters())
    assert all(c.numel() <= 16 for c in copies), [(c.shape, c.dtype) for c in copies]


@torch.no_grad()
def test_a_kept_trace_does_not_keep_its_model_alive(traces):
    """The cache holds models weakly: a trace must not refer to its model (``torch.jit.trace``
    keeps the traced Python function, a closure over the model, unless it is dropped)."""
    model = small_model()
    Decoder(model, model.new_cache(1, 32))
    assert len(traces) == 1
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and len(traces) == 0


@torch.no_grad()
def test_recording_leaves_nothing_in_torchscripts_global_compilation_unit(traces):
    """``torch.jit.trace`` of a function files it in TorchScript's global compilation unit for
    good (with the weights its graph holds as constants); the decoder's trace lives in its own, so
    an evicted trace, or a dropped model's, frees its memory."""
    before = len(torch.jit._state._python_cu.get_functions())
    model = small_model()
    graph = Decoder(model, model.new_cache(1, 32))._graph
    assert len(torch.jit._state._python_cu.get_functions()) == before
    assert graph.name == "decode_step"


def test_a_model_collected_while_the_cache_is_locked_goes_at_the_next_call():
    """Garbage collection may free a model inside the cache's own locked section (any allocation
    can run it): the weak reference's callback must not wait for the lock (a deadlock, so the
    test runs in a thread it can give up on)."""
    lru = TraceCache(2)

    def collect_while_locked():
        model = small_model()
        lru.put(model, ("x",), (), "gx")
        with lru._lock:
            del model
            gc.collect()  # the callback runs here, with the lock held

    worker = threading.Thread(target=collect_while_locked, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the callback waited for the lock held by its own thread"
    assert lru.keys() == []


def _step_logits(batch, monkeypatch) -> list[torch.Tensor]:
    """Every decode step's logits of ``batch`` from now on (recorded around ``Decoder.step_rows``)."""
    seen: list[torch.Tensor] = []
    step_rows = Decoder.step_rows
    monkeypatch.setattr(
        Decoder,
        "step_rows",
        lambda self, *a, **k: seen.append(step_rows(self, *a, **k)) or seen[-1],
    )
    return seen


@torch.no_grad()
@pytest.mark.parametrize("traced", [True, False])
def test_row_batch_keeps_its_decoder_and_retraces_weights_changed_before_an_admission(
    traces, monkeypatch, traced
):
    """A batch makes its Decoder (and so checks the weights stamp, a walk over every tensor) once
    per shape between admissions, not every step; weights changed before a new row is admitted
    (a long-lived server batch) are traced again, so the traced steps equal eager decoding."""
    from llamakin.generation.batch import RowBatch

    monkeypatch.setenv("LLAMAKIN_TRACE", "1" if traced else "0")
    model = small_model()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]
    run = GenerationRun(
        model, _NoTokenizer(), prompts, SamplingParams(max_new_tokens=8, ignore_eos=True)
    )
    rows = run._rows(collections.deque())
    batch = RowBatch(model, (), 4, 64)
    logits = _step_logits(batch, monkeypatch)
    made = []
    monkeypatch.setattr(
        "llamakin.generation.batch.Decoder",
        lambda *a, **kw: made.append(a) or Decoder(*a, **kw),
    )
    batch.admit(rows[:3])  # 3 rows: the batch's bucket is 4 rows, as it stays with the fourth
    for _ in range(3):
        batch.step()
    assert len(made) == 1  # one Decoder for three steps of one shape
    model.layers[0].mlp.down.weight.mul_(-1.0)  # in place, between two admissions
    batch.admit(rows[3:])
    batch.step()
    assert len(made) == 2
    after = logits[-1]
    monkeypatch.setenv("LLAMAKIN_TRACE", "0")
    eager = Decoder(model, batch.cache.view(slice(0, 4), 64))
    assert eager._graph is None
    # the same step again, eagerly, on the cache as it was: rows at their lengths before the step
    for row in batch.rows:
        row.length -= 1
    tokens = torch.tensor([[r.fed[-1]] for r in batch.rows])
    positions = torch.tensor([[r.length - r.pad] for r in batch.rows])  # left padding: not counted
    slots = torch.tensor([r.length for r in batch.rows])
    span = max(r.length for r in batch.rows) + 1
    assert torch.allclose(
        eager.step_rows(tokens, positions, slots, span=span), after, atol=1e-5, rtol=0
    )


@torch.no_grad()
def test_kept_traces_carry_no_source_text(traces):
    """The tracer's per-node Python call stacks (~1 KB a node) are dropped after recording; the
    graph computes the same (the equality tests above run on such graphs)."""
    model = small_model()
    cache = model.new_cache(1, 16)
    model(torch.arange(4).view(1, 4), cache=cache)
    graph = Decoder(model, cache)._graph.graph
    nodes = list(graph.nodes())
    assert len(nodes) > 50 and all(node.sourceRange() == "" for node in nodes)


def test_cache_lengths_come_in_few_sizes_and_short_generations_hold_small_caches():
    """Powers of two from 64 up to 256, then multiples of 256, never past the context."""
    from llamakin.speed.decode_trace import cache_length_for

    lengths = {n: cache_length_for(n, 4096) for n in (1, 64, 65, 72, 128, 129, 256, 257, 600)}
    assert lengths == {
        1: 64,
        64: 64,
        65: 128,
        72: 128,
        128: 128,
        129: 256,
        256: 256,
        257: 512,
        600: 768,
    }
    assert cache_length_for(72, 100) == 100 and cache_length_for(5000, 4096) == 4096


@torch.no_grad()
def test_a_short_run_steps_eagerly_until_its_shape_has_earned_a_trace(traces, monkeypatch):
    """``Decoder(steps=N)`` with N at most ``LLAMAKIN_TRACE_AFTER``: no recording at first; each
    eager step of the shape is counted across decoders, and after that many the trace is recorded
    and used, with the same logits as the eager steps. Without ``steps``, or with more steps than
    that, the trace is recorded at once."""
    monkeypatch.setenv("LLAMAKIN_TRACE_AFTER", "3")
    model = small_model()
    cache = model.new_cache(1, 32)
    model(torch.arange(4).view(1, 4), cache=cache)

    def step(decoder):
        out = decoder.step(torch.full((1, 1), 7), torch.full((1, 1), cache.length))
        cache.length -= 1  # every step at the same slot: comparable logits
        return out

    first = Decoder(model, cache, steps=3)
    assert first._graph is None and traces.traced == 0
    eager = [step(first) for _ in range(2)]
    second = Decoder(model, cache, steps=3)  # the same shape: its count goes on
    assert second._graph is None
    eager.append(step(second))
    assert traces.traced == 0 and traces.eager_steps(model, second._key) == 3
    traced = step(second)  # the fourth step of the shape records the trace
    assert traces.traced == 1 and second._graph is not None
    assert torch.equal(traced, eager[0]) and all(torch.equal(e, eager[0]) for e in eager)
    assert Decoder(model, cache, steps=3)._graph is second._graph  # kept: no more eager steps

    traces.clear()
    assert Decoder(model, cache, steps=4)._graph is not None  # more steps than 3: at once
    traces.clear()
    assert Decoder(model, cache)._graph is not None  # steps unknown: at once
    monkeypatch.setenv("LLAMAKIN_TRACE_AFTER", "0")
    traces.clear()
    assert Decoder(model, cache, steps=1)._graph is not None


@torch.no_grad()
def test_the_batch_engine_gives_a_short_generation_eager_steps_and_a_long_one_a_trace(
    traces, monkeypatch
):
    """``generate`` through the batch engine: 8 new tokens in a 64-slot cache record nothing, 100
    new tokens (a 128-slot cache: more slots than LLAMAKIN_TRACE_AFTER) record one trace; the
    greedy tokens are the same either way."""
    model = small_model()
    monkeypatch.setenv("LLAMAKIN_TRACE_AFTER", "64")
    run = GenerationRun(
        model, _NoTokenizer(), [[1, 2, 3]], SamplingParams(max_new_tokens=8, ignore_eos=True)
    )
    for _ in run:
        pass
    assert traces.traced == 0
    short_tokens = run.results[0].token_ids
    run = GenerationRun(
        model, _NoTokenizer(), [[1, 2, 3]], SamplingParams(max_new_tokens=100, ignore_eos=True)
    )
    for _ in run:
        pass
    assert traces.traced == 1
    assert run.results[0].token_ids[:8] == short_tokens
