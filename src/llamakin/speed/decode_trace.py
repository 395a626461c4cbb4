"""The decoding step, run as a TorchScript trace when that is possible.

A decode step is ~40 small tensor operations per layer; on a 2-core CPU the Python around them
costs about as much as the arithmetic, so :class:`Decoder` records
:meth:`Transformer.decode_step` once per (batch size, cache length, dtype, device, mode,
adapters, whether the head is traced) and replays it, with bit-identical logits (speed:
README). Every shape in ``decode_step`` is fixed by the trace's key except the span of cache
slots attended to, which the step reads from its ``key_valid`` input's width (recorded as a
size: :func:`attended_slots`), and its only state is the KV cache, mutated in place, so a trace
is exact: everything a step reads that can change between generations is an input of the trace
(the cache's tensors, Qwen v1's per-row NTK alpha fixed at prefill, a multi-adapter model's row
indices), never a constant recorded while tracing. Models whose RoPE frequencies depend on the
current length (``dynamic`` NTK: a base that grows with every step) run the same step eagerly.
``LLAMAKIN_TRACE=0`` turns tracing off.

When a trace pays. Recording one costs ~0.5 s on the default model (more on slower CPUs); a
traced step saves ~3 ms against the eager one (7.2 vs 10.3 ms, Zen 5 EPYC, README), so a
generation of a few dozen tokens finishes sooner, and peaks lower, without a trace. A caller that
knows how many steps a decoder can run at most (``Decoder(..., steps=N)``: the batch engine passes
the cache slots left) gets eager steps when ``N`` is at most ``LLAMAKIN_TRACE_AFTER`` (default
:data:`DEFAULT_TRACE_AFTER`) and no trace of the shape is kept; the shape's eager steps are
counted per process, and once they reach that number the trace is recorded after all (many
short generations of one shape: a server, the evaluation harness). ``LLAMAKIN_TRACE_AFTER=0``
records at once, as callers that pass no ``steps`` always do.

How a step is recorded. ``decode_step`` is traced as a plain function of those inputs
(:func:`_step_function`), not as a module holding the model: tracing a module registers a
TorchScript type and a traced ``forward`` per submodule in TorchScript's global compilation
unit, for the life of the process (41 MB on the int4 default model), and reads every attribute
``dir()`` lists on each module (a function trace reads none). The tensors the step reads
without taking them as inputs, the weights, become constants of the graph: the model's own
tensors, shared, not copied (tested), as ``torch.jit.freeze`` made them for the module trace;
the passes freezing ran are run on the graph (:func:`_optimize_as_frozen`), so the graph
computes what the frozen module trace did, bit for bit (tested on tiny models of every traced
family, int4 included). Tracing refuses a constant that requires grad, so ``requires_grad`` is
off while recording. The function is made from the traced graph in a compilation unit of its
own (:func:`_traced_graph`), so a dropped trace frees its memory. Constants do not follow later
changes to the weights, so a trace is keyed by a stamp of every parameter and buffer (identity
and in-place version counter): training or loading new weights between generations retraces.

On CPU the graph runs under ``torch.jit.optimized_execution(False)``: TorchScript's profiling
executor otherwise re-optimises a graph on its second call, which bought nothing here (the same
steady-state step time, ``benchmarks/bench_decode_step.py``) but cost 3-58 s on that call for
the int4 default model on a loaded 2-core AVX2 EPYC. The graph is the same either way, so the
logits are identical. Other devices keep the optimising executor (its fusers work there).

Memory (the int4 default model; README, "Where the memory of ``llamakin generate`` goes"). A
trace is recorded on the caller's own KV cache (the one slot the recording run writes is saved
and restored), never on a scratch cache as large as the real one. A kept trace holds ~12 MB
once it has run (graph and executor; 17 MB while it kept its source text); recording it peaks
~16-29 MB higher (the graph as traced, before the passes: 7,729 nodes,
each with the Python call stack it was recorded from as text, dropped right after recording:
:func:`_drop_source_text`); a dropped trace frees all of it.
Two bounds, set by the environment and shared by every model in the process:

* ``LLAMAKIN_TRACE_CACHE`` (default :data:`DEFAULT_TRACE_CACHE`): traces kept, least recently
  used out (:class:`TraceCache`);
* ``LLAMAKIN_TRACE_BUDGET`` (default :data:`DEFAULT_TRACE_BUDGET`): recordings per process (each
  takes ~0.5 s on the default model, idle, and much longer under load). An evicted shape is
  recorded again while the budget lasts; after that, a shape without a kept trace runs the same
  step eagerly (identical logits, slower).
"""

from __future__ import annotations

import collections
import inspect
import os
import threading
import warnings
import weakref

import torch
from torch import nn

from ..model.cache import KVCache

CACHE_BUCKET = 256  # cache lengths are rounded up to this, so traces are shared between requests
SMALLEST_CACHE = 64  # below CACHE_BUCKET, powers of two from this


def cache_length_for(needed: int, context: int) -> int:
    """The KV cache length to allocate for ``needed`` slots, capped at the context: a power of two
    from :data:`SMALLEST_CACHE` up to :data:`CACHE_BUCKET`, then a multiple of it. Traces are keyed
    by the cache length, so lengths come in few sizes; a short generation does not hold a
    256-slot cache (5.9 MB of float32 keys and values for SmolLM2-135M at 128 slots instead of 11.8
    at 256). On CPU a step attends to the filled slots only (:func:`attended_slots`), so the
    allocated length costs memory, not time."""
    if needed <= CACHE_BUCKET:
        length = max(SMALLEST_CACHE, 1 << max(needed - 1, 0).bit_length())
    else:
        length = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
    return min(length, context)


class _Holder:
    """What ``decode_step`` sees as its cache while tracing: only the key/value lists it writes."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rope_alpha: torch.Tensor


def head_is_traced(model) -> bool:
    """Whether the traced step ends with the output head: not when the head holds something a
    trace cannot (an fbgemm-packed int8 head, ``traceable = False``:
    :class:`~llamakin.quant.linear.ExactInt8Linear`); the step then returns the last hidden
    state and :class:`Decoder` applies ``model.head`` eagerly."""
    return getattr(getattr(model, "lm_head", None), "traceable", True)


def _step_function(model, holder: _Holder):
    """``decode_step`` as a plain function of the cache's tensors, which tracing requires. A
    function, not a module: tracing a module registers a TorchScript type and a traced ``forward``
    for every submodule in a global compilation unit, kept for the life of the process."""
    hidden_only = not head_is_traced(model)
    selection = getattr(model, "adapter_selection", None)

    def step(
        tokens,
        positions,
        slot,
        key_valid,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        rope_alpha: torch.Tensor,
        *adapter_ids: torch.Tensor,
    ):
        holder.keys, holder.values, holder.rope_alpha = keys, values, rope_alpha
        # several LoRA adapters chosen per row (llamakin.lora.multi): the indices are an input
        if adapter_ids:
            selection.ids = adapter_ids[0]
        return model.decode_step(tokens, positions, slot, key_valid, holder, hidden_only)

    return step


def _adapter_inputs(model, batch: int, device) -> tuple[torch.Tensor, ...]:
    """The per-row adapter indices a multi-adapter model's trace takes (zeros: the base), else nothing."""
    selection = getattr(model, "adapter_selection", None)
    if selection is None:
        return ()
    ids = selection.ids
    return (ids if ids is not None else torch.zeros(batch, dtype=torch.long, device=device),)


DEFAULT_TRACE_CACHE = 8  # traces kept: the shapes a server uses most (batch sizes x cache lengths)
DEFAULT_TRACE_BUDGET = 16  # recordings per process (time spent recording when shapes churn)
DEFAULT_TRACE_AFTER = 64  # steps a short generation runs eagerly before its shape is traced


class TraceCache:
    """Decode traces, least recently used first out, at most ``capacity`` in all.

    Keyed by model (held weakly: a model that is garbage-collected takes its traces along) and by
    the trace key of :class:`Decoder`. ``capacity`` 0 keeps nothing (every step runs a fresh
    trace, so use ``LLAMAKIN_TRACE=0`` instead to run eagerly).
    """

    def __init__(self, capacity: int, budget: int | None = None):
        self.capacity = capacity
        self.budget = 2 * capacity if budget is None else budget  # recordings allowed in all
        self._entries: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._dead: list[weakref.ref] = []  # models collected while the lock was held
        self.traced = 0  # traces recorded so far (a measure of the retracing that eviction costs)
        self.evicted = 0
        # eager steps per (model, key) of shapes not recorded yet: (model's weak reference, count)
        self._eager: dict[tuple, tuple[weakref.ref, int]] = {}

    def get(self, model: nn.Module, key: tuple, stamp: tuple):
        """The trace of ``model`` for ``key`` recorded at weights ``stamp``, or None."""
        with self._lock:
            self._drop_dead()
            entry = self._entries.get((id(model), key))
            if entry is None or entry[0]() is not model or entry[1] != stamp:
                return None
            self._entries.move_to_end((id(model), key))
            return entry[2]

    def count_eager(self, model: nn.Module, key: tuple) -> int:
        """Count one eager step of ``model`` at ``key``; the steps counted so far."""
        with self._lock:
            self._drop_dead()
            ident = (id(model), key)
            ref, count = self._eager.get(ident, (None, 0))
            if ref is None or ref() is not model:
                ref, count = weakref.ref(model, self._forget), 0
            self._eager[ident] = (ref, count + 1)
            return count + 1

    def eager_steps(self, model: nn.Module, key: tuple) -> int:
        """The eager steps counted for ``model`` at ``key``."""
        with self._lock:
            ref, count = self._eager.get((id(model), key), (None, 0))
            return count if ref is not None and ref() is model else 0

    def may_record(self) -> bool:
        """Whether the recording budget allows another trace."""
        return self.traced < self.budget

    def put(self, model: nn.Module, key: tuple, stamp: tuple, graph) -> None:
        with self._lock:
            self._drop_dead()
            self.traced += 1
            ident = (id(model), key)
            self._entries.pop(ident, None)
            self._entries[ident] = (weakref.ref(model, self._forget), stamp, graph)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evicted += 1

    def _forget(self, ref: weakref.ref) -> None:
        """A model's weak reference died. Garbage collection can run this inside any allocation,
        this cache's own locked sections included (then waiting for the lock would deadlock): the
        model's traces go now if the lock is free, else at the cache's next call."""
        self._dead.append(ref)
        if self._lock.acquire(blocking=False):
            try:
                self._drop_dead()
            finally:
                self._lock.release()

    def _drop_dead(self) -> None:
        while self._dead:
            ref = self._dead.pop()
            for ident in [i for i, entry in self._entries.items() if entry[0] is ref]:
                del self._entries[ident]
            for ident in [i for i, entry in self._eager.items() if entry[0] is ref]:
                del self._eager[ident]

    def keys(self, model: nn.Module | None = None) -> list[tuple]:
        """The cached trace keys (of ``model`` only, if given), least recently used first."""
        with self._lock:
            self._drop_dead()
            return [
                key
                for (owner, key), entry in self._entries.items()
                if model is None or (owner == id(model) and entry[0]() is model)
            ]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._eager.clear()


def _count_from_environment(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        warnings.warn(f"{name}={raw!r} is not a count; using {default}.")
        value = default
    return value


TRACES = TraceCache(
    _count_from_environment("LLAMAKIN_TRACE_CACHE", DEFAULT_TRACE_CACHE),
    _count_from_environment("LLAMAKIN_TRACE_BUDGET", DEFAULT_TRACE_BUDGET),
)


def trace_after() -> int:
    """``LLAMAKIN_TRACE_AFTER``: how many steps a decoder that expects no more may run eagerly
    (module docstring), read at each use."""
    return _count_from_environment("LLAMAKIN_TRACE_AFTER", DEFAULT_TRACE_AFTER)


def _traceable(model) -> bool:
    if os.environ.get("LLAMAKIN_TRACE", "1") == "0":
        return False
    return model.config.rope_scaling.type != "dynamic"


def _weights_stamp(model: nn.Module) -> tuple:
    """Changes when any parameter, buffer or submodule is replaced or a tensor is modified in
    place: (identity, in-place version) of every tensor, read from each module's own dicts.

    Every :class:`Decoder` computes it (a generation batch makes one per shape and admission,
    ``generation/batch.py``), so it is a plain walk over the modules'
    ``_parameters``/``_buffers``/``_modules`` (0.22 ms for the 546 tensors of SmolLM2-135M int4,
    against 0.96 ms through ``parameters()``/``buffers()``' generators).
    A tensor shared by two modules is listed twice, which changes nothing for a comparison."""
    stamp, pending = [], [model]
    while pending:
        module = pending.pop()
        for tensors in (module._parameters, module._buffers):
            stamp += [(id(t), t._version) for t in tensors.values() if t is not None]
        pending += [m for m in module._modules.values() if m is not None]
    return tuple(stamp)


def _traced_graph(function, example: tuple) -> torch._C.Graph:
    """The graph ``torch.jit.trace(function, example)`` records (strict, no in-place rewriting),
    without what it keeps: ``torch.jit.trace`` of a function files the result in TorchScript's
    global compilation unit, for the life of the process, whatever ``_compilation_unit`` says
    (``_create_function_from_trace``), and pins the traced Python function on it (here a closure
    over the model), so neither the graph nor the weights it holds as constants would ever go."""
    argument_names = list(inspect.signature(function).parameters)
    graph, _ = torch._C._create_graph_by_tracing(
        function, list(example), lambda _value: "", True, False, None, argument_names
    )
    _drop_source_text(graph)
    return graph


def _drop_source_text(graph: torch._C.Graph) -> None:
    """Forget where each node was recorded: the tracer gives every node the Python call stack it
    came from as text (~1 KB each, 7.5 MB for the 7,729 nodes the int4 default model's step
    records), which a kept trace and its executor carried for nothing but error messages.
    Measured on that model: 17.2 -> 12.1 MB in use per kept trace after its first step."""
    blank = graph.create("prim::Constant")  # never inserted: a node without any source range
    for node in graph.nodes():
        node.copyMetadata(blank)
    blank.destroy()


def _optimize_as_frozen(graph: torch._C.Graph) -> None:
    """The passes ``torch.jit.freeze`` runs on a module's graph once its weights are constants
    (``torch/csrc/jit/passes/freeze_module.cpp``: ``runOptimization`` without loop unrolling,
    then ``OptimizeFrozenGraph``), run on the traced function's graph, whose weights already are.
    The peephole pass is told not to fold the inputs' traced sizes into constants: a module's
    traced graph has no sizes on its inputs, a function's has, and one input's size varies between
    calls (a multi-adapter model's row indices: one for all rows, or one per row)."""
    torch._C._jit_pass_dce(graph)
    torch._C._jit_pass_cse(graph)
    torch._C._jit_pass_peephole(graph, True)
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_constant_pooling(graph)
    torch._C._jit_pass_cse(graph)
    torch._C._jit_pass_optimize_frozen_graph(graph, True)


def attended_slots(span: int | None, cache_length: int, device: torch.device) -> int:
    """How many cache slots a decode step attends to: on CPU only the ``span`` filled so far,
    elsewhere the whole cache. Attention over a cache is memory-bound, so on CPU its cost follows
    the slots read: measured on the int4 default model, batch 1, a 2-core AVX-512 EPYC, the traced
    step took 10.1 ms over a 256-slot cache and 9.2 over a 64-slot one (README, "Attention over the
    filled slots only"). A trace takes the span from its ``key_valid`` input's width, so one trace
    serves every span; other devices keep one width so TorchScript's optimising executor, which
    they run, sees the same shapes at every step."""
    if span is None or device.type != "cpu":
        return cache_length
    return min(max(span, 1), cache_length)


def _optimize_graph(device: torch.device) -> bool:
    """Whether TorchScript's executor may re-optimise the graph (not on CPU: see above)."""
    return device.type != "cpu"


class Decoder:
    """Runs decode steps of ``model`` on ``cache``: ``step(tokens [B, 1], positions [B, 1]) -> logits [B, V]``.

    ``steps``: the most steps this decoder will run, when the caller knows it; a short run steps
    eagerly until its shape has earned a trace (module docstring, "When a trace pays")."""

    def __init__(self, model, cache: KVCache, steps: int | None = None):
        self.model, self.cache = model, cache
        self._graph = None
        self._deferred = False  # eager for now; recorded once the shape's eager steps pay for it
        if not _traceable(model):
            return
        self._key, self._stamp = self._trace_key(), _weights_stamp(model)
        self._graph = TRACES.get(model, self._key, self._stamp)
        if self._graph is not None:
            return
        self._trace_after = trace_after()
        self._deferred = (
            steps is not None
            and steps <= self._trace_after
            and TRACES.eager_steps(model, self._key) < self._trace_after
        )
        if not self._deferred:
            self._graph = self._record_if_allowed()

    def _record_if_allowed(self):
        graph = None
        if TRACES.may_record():
            graph = self._record()
            TRACES.put(self.model, self._key, self._stamp, graph)
        return graph  # None: the budget is spent, this shape runs eagerly

    def _trace_key(self) -> tuple:
        cache = self.cache
        return (
            cache.batch_size,
            cache.max_len,
            cache.keys[0].dtype,
            cache.keys[0].device,
            self.model.training,
            getattr(self.model, "adapter_selection", None) is not None,
            head_is_traced(self.model),
        )

    def _record(self):
        """Trace and freeze ``decode_step`` on this cache's own tensors. The recording run writes
        every row's last slot; that slot is saved first and put back after."""
        cache = self.cache
        B, last = cache.batch_size, cache.max_len - 1
        device = cache.keys[0].device
        saved = [
            (k[:, :, last].clone(), v[:, :, last].clone()) for k, v in zip(cache.keys, cache.values)
        ]
        position_shape = (B, 2, 1) if self.model.config.rope_layout == "glm2d" else (B, 1)
        example = (
            torch.zeros(B, 1, dtype=torch.long, device=device),
            torch.zeros(position_shape, dtype=torch.long, device=device),
            torch.full((B,), last, dtype=torch.long, device=device),
            cache.valid,
            list(cache.keys),
            list(cache.values),
            cache.rope_alpha,
            *_adapter_inputs(self.model, B, device),
        )
        # tracing makes every tensor the step reads and does not take as an input a constant of
        # the graph (the model's own tensor, not a copy), which it refuses for one that requires grad
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in trainable:
                p.requires_grad_(False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _traced_graph(_step_function(self.model, _Holder()), example)
            _optimize_as_frozen(graph)
            # a compilation unit of its own, so the graph (and the weights it holds) goes with it
            traced = torch._C._create_function_from_graph("decode_step", graph)
            return traced
        finally:
            for p in trainable:
                p.requires_grad_(True)
            for (k, v), (saved_k, saved_v) in zip(zip(cache.keys, cache.values), saved):
                k[:, :, last] = saved_k
                v[:, :, last] = saved_v

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """All rows at the cache's current length (one generation's batch); advances the cache."""
        cache = self.cache
        if cache.length >= cache.max_len:
            raise RuntimeError("decode step past the end of the KV cache")
        slots = torch.full((tokens.shape[0],), cache.length, device=tokens.device)
        logits = self.step_rows(tokens, positions, slots, span=cache.length + 1)
        cache.advance(1)
        return logits

    def step_rows(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        span: int | None = None,
    ) -> torch.Tensor:
        """Rows at their own lengths: row b writes slot ``slots[b]``; the caller tracks lengths.
        ``span``: slots attended to, past every row's slot (default: the whole cache); used on
        CPU only (:func:`attended_slots`)."""
        cache = self.cache
        key_valid = cache.valid[:, : attended_slots(span, cache.max_len, tokens.device)]
        if self._deferred and TRACES.count_eager(self.model, self._key) > self._trace_after:
            self._deferred = False
            self._graph = self._record_if_allowed()
        if self._graph is not None:
            with torch.jit.optimized_execution(_optimize_graph(tokens.device)):
                out = self._graph(
                    tokens,
                    positions,
                    slots,
                    key_valid,
                    cache.keys,
                    cache.values,
                    cache.rope_alpha,
                    *_adapter_inputs(self.model, tokens.shape[0], tokens.device),
                )
            return out if head_is_traced(self.model) else self.model.head(out)
        return self.model.decode_step(tokens, positions, slots, key_valid, cache)
