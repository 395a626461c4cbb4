"""Quantized models: module replacement on a built model, and loading checkpoints straight into it.

Modes (``llamakin.load(..., quantize=MODE)``):

* ``None`` / ``"none"`` - float weights in ``dtype`` (every quantized source dequantized).
* ``"int8"`` - every projection int8 per output channel; the embedding int8 in groups of 32.
* ``"int4"`` - every projection int4 in groups of ``group_size`` (32/64/128/256); the output head
  int8 (it decides every token: measured in the README); the embedding int8 in groups of 32.
* ``"auto"`` - a GGUF file keeps its quantization where it maps onto these layouts: Q4_0/Q4_1
  matrices become int4 group 32 exactly (:mod:`llamakin.quant.gguf_blocks`), Q8_0 ones int8 per
  channel (requantized from the Q8_0 values: one scale per row instead of per 32 weights, error
  measured in the README), a Q8_0 embedding stays Q8_0 (exact int8 groups of 32); F32/F16/BF16
  and other types (K-quants, Q5_x) load as float in ``dtype``. Other checkpoints load as float.

Everything not a projection or the embedding (norms, RoPE, attention) stays in ``dtype``.
Tied heads: the head gets its own quantized matrix, the embedding keeps its own table.
Partial q/k/v biases (ChatGLM-style masks) are folded into the quantized module's bias.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import LlamakinError
from ..model.attention import Attention
from ..resident import large_allocations_mapped, release_freed_memory
from . import vnni
from .gguf_blocks import BLOCK, KEPT_TYPES, decode_q4, q4_to_int4
from .gguf_embedding import MappedQ8Embedding
from .linear import ExactInt8Linear, Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear
from .tensors import check_group_size, quantize_int4, quantize_int8

MODES = ("auto", "none", "int8", "int4")
HEAD = "lm_head"


def parse_mode(quantize: str | None) -> str | None:
    if quantize is None or quantize == "none":
        return None
    if quantize not in MODES:
        raise LlamakinError(f"unknown quantization {quantize!r}; use one of {', '.join(MODES)}.")
    return quantize


def projection_names(model: nn.Module) -> list[str]:
    """Names of the model's float projections (``nn.Linear`` modules), the head included if untied."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _bias_for(model: nn.Module, module_name: str, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the float model would apply it: a partial q/k/v bias masked, its mask retired."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if (
        bias is not None
        and child == "qkv"
        and isinstance(parent, Attention)
        and parent.partial_bias
    ):
        zeroed = torch.cat(
            [
                torch.full((n,), not f)
                for n, f in zip(
                    parent.split_sizes,
                    (parent.config.q_bias, parent.config.k_bias, parent.config.v_bias),
                )
            ]
        )
        bias = bias.masked_fill(zeroed.to(bias.device), 0.0)
        parent.qkv_bias_zeroed = None
    return bias


def _make_module(weight, bias, activation_dtype, device) -> QuantizedLinear:
    cls = Int4Linear if hasattr(weight, "group_size") else Int8Linear
    return cls(weight, bias, activation_dtype=activation_dtype, device=device)


def _float_to(kind: str, weight: torch.Tensor, group_size: int):
    return quantize_int8(weight) if kind == "int8" else quantize_int4(weight, group_size)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    mode: str = "int4",
    group_size: int = 32,
    head: str | None = None,
    embedding: bool = True,
    activation_dtype: torch.dtype | None = None,
    collect: dict | None = None,
    weights: dict | None = None,
) -> nn.Module:
    """Replace every projection of a float ``model`` (in place) by its ``mode`` (int8/int4) version.

    ``head``: the output head's kind (default: int8; ``"int4"`` or ``"none"`` possible). A tied
    head gets its own quantized copy. ``embedding``: the embedding table becomes int8 (groups of 32).
    ``weights``: quantized weights to use for some modules (by name, ``"lm_head"`` for the head)
    instead of rounding to nearest, e.g. GPTQ's (:func:`llamakin.quant.gptq.gptq_model`).
    """
    weights = weights or {}
    if mode not in ("int8", "int4"):
        raise LlamakinError(f"quantize_model takes mode 'int8' or 'int4', not {mode!r}.")
    head = head or "int8"
    device = model.device
    for name in projection_names(model):
        kind = head if name == HEAD else mode
        if kind == "none":
            continue
        linear = model.get_submodule(name)
        if kind == "int4":
            check_group_size(group_size, linear.in_features, f" ({name})")
        bias = _bias_for(model, name, linear.bias)
        weight = weights.get(name) or _float_to(kind, linear.weight, group_size)
        if collect is not None:
            collect[name] = weight
        model.set_submodule(name, _make_module(weight, bias, activation_dtype, device))
    if model.lm_head is None and head != "none":
        weight = weights.get(HEAD) or _float_to(head, model.embed.weight, group_size)
        if collect is not None:
            collect[HEAD] = weight
        model.lm_head = _make_module(weight, None, activation_dtype, device)
    # a tied head left in float reads the embedding's float table, so that table stays float too
    if embedding and isinstance(model.embed, nn.Embedding) and model.lm_head is not None:
        model.embed = Int8Embedding.from_float(model.embed.weight, BLOCK).to(device)
    return model


# -- loading -------------------------------------------------------------------------------------
def _gguf_kind(source, rule, mode: str) -> str | None:
    """What ``auto`` keeps a GGUF matrix as: 'q4' (exact int4), 'int8', or None (float)."""
    kinds = {source.quant_type(n) for n in rule.sources}
    if kinds <= {"Q4_0", "Q4_1"}:
        return "q4"
    if kinds == {"Q8_0"}:
        return "int8"
    return None


def _exact_q4(source, rule):
    parts = [decode_q4(source.raw(n), source.quant_type(n)) for n in rule.sources]
    q, d, m = (rule.to_canonical([p[i] for p in parts]) for i in range(3))
    return q4_to_int4(q, d, m)


def _float_tensor(source, rule) -> torch.Tensor:
    return rule.to_canonical([source.get(n) for n in rule.sources])


def load_quantized(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    mode: str,
    group_size: int = 32,
    activation_dtype: torch.dtype | None = None,
    head: str = "int8",
    collect: dict | None = None,
):
    """Build the model of checkpoint ``path`` with quantized projections read straight from the
    file: no float copy of a quantized matrix is ever allocated whole beyond one tensor at a time.
    ``head``: the head's kind in int8/int4 modes; ``collect``: receives each module's
    :class:`Int4Weight`/:class:`Int8Weight` (for writing files without unpacking the kernels' layouts).

    While loading, large allocations are served by their own mappings
    (:func:`large_allocations_mapped`), so each transient goes back to the OS when freed."""
    with large_allocations_mapped():
        return _load_quantized(
            path, dtype, device, mode, group_size, activation_dtype, head, collect
        )


def _load_quantized(path, dtype, device, mode, group_size, activation_dtype, head, collect):
    from .. import checkpoint as ck
    from ..io.gguf import GGUFFile
    from ..io.tensors import open_weights
    from ..model import Transformer
    from ..source import resolve_model
    from ..validation import check_plausible_size, stored_values

    device = torch.device(device)
    model_source = resolve_model(path)
    path = model_source.path
    gguf = model_source.is_gguf
    if gguf:
        source = GGUFFile(path)
        family, config = ck.read_gguf_config(source)
        where = str(path)
    else:
        directory = path
        family, config = ck.read_checkpoint_config(directory)
        source = open_weights(directory)
        where = str(directory)
    with source:
        # the size check of the float loader (checkpoint.load): a config the file cannot hold, or a model
        # the device cannot fit, is refused before anything is built; quantized weights take ~1 byte each
        check_plausible_size(
            config,
            where,
            stored_values(source),
            dtype if mode == "auto" and not gguf else torch.int8,
            device,
        )
        with torch.device("meta"):
            model = Transformer(config)
        model = model.to(dtype=dtype)
        rules = family.tensor_rules(config)
        params = dict(model.named_parameters())
        covered = {r.canonical for r in rules}
        if covered != set(params):
            raise AssertionError(
                f"{family.name} rules do not cover {sorted(set(params) ^ covered)}"
            )
        ck.check_tensors(rules, params, source, family, where, config.tie_word_embeddings)
        projections = set(projection_names(model))
        modules: dict[str, QuantizedLinear] = {}
        floats: dict[str, torch.Tensor] = {}
        embed_rule = None

        def build(name: str, weight) -> None:
            """The module now (packed, so the unpacked values are freed at once); biases come later."""
            if collect is not None:
                collect[name] = weight
            modules[name] = _make_module(weight, None, activation_dtype, device)

        release_pages = getattr(source, "release_pages", lambda: None)  # GGUFFile's
        with torch.no_grad():
            for rule in rules:
                module_name, _, leaf = rule.canonical.rpartition(".")
                if rule.canonical == "embed.weight":
                    embed_rule = rule
                    continue
                if leaf != "weight" or module_name not in projections:
                    floats[rule.canonical] = _float_tensor(source, rule)
                    continue
                kind = _choose(mode, module_name, source if gguf else None, rule, group_size, head)
                if kind is None:
                    floats[rule.canonical] = _float_tensor(source, rule)
                elif kind == "q4":
                    build(module_name, _exact_q4(source, rule))
                else:
                    in_features = params[rule.canonical].shape[1]
                    if kind == "int4":
                        check_group_size(group_size, in_features, f" ({module_name})")
                    build(module_name, _float_to(kind, _float_tensor(source, rule), group_size))
                release_pages()
            embed, tied_head = _embedding(
                mode, source, gguf, embed_rule, config, dtype, head, group_size
            )
            if tied_head is not None:
                build(HEAD, tied_head)
            release_pages()  # a table read in place (MappedQ8Embedding) keeps only rows looked up
        for name, module in modules.items():
            bias = floats.pop(name + ".bias", None)
            if bias is not None:
                module.bias = _bias_for(model, name, bias.to(device=device, dtype=dtype))
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, module)
        if embed is not None:
            model.embed = embed.to(device)
        else:
            floats["embed.weight"] = _float_tensor(source, embed_rule)
    for name, value in floats.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(
            module, leaf, nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
        )
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = torch.empty_like(buf, device=device)
    model.init_buffers()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # an adapter bug, not a user error
        raise AssertionError(f"parameters left unloaded: {leftover}")
    for p in model.parameters():
        p.requires_grad_(True)
    release_freed_memory()
    return model.eval()


def _choose(
    mode: str, module_name: str, gguf_source, rule, group_size: int, head: str
) -> str | None:
    """The kind of one projection: 'q4' (exact from Q4_0/Q4_1), 'int4', 'int8' or None (float)."""
    if mode == "auto":
        return _gguf_kind(gguf_source, rule, mode) if gguf_source is not None else None
    if module_name == HEAD:
        mode = None if head == "none" else head
    if (
        mode == "int4"
        and group_size == BLOCK
        and gguf_source is not None
        and _gguf_kind(gguf_source, rule, mode) == "q4"
    ):
        return "q4"
    return mode


def _embedding(
    mode: str, source, gguf: bool, rule, config, dtype: torch.dtype, head_kind: str, group_size: int
):
    """(quantized embedding or None, quantized tied head or None). A Q8_0 table is kept exactly;
    other tables are quantized to int8 groups of 32 (``auto``: only Q4_0/Q4_1 ones)."""
    kind = source.quant_type(rule.sources[0]) if gguf else None
    if mode == "auto" and kind not in KEPT_TYPES:
        return None, None
    if kind == "Q8_0":  # looked up in place in the file's mapping (gguf_embedding.py)
        embed = MappedQ8Embedding(source.mapped(rule.sources[0]), dtype)
    else:
        embed = Int8Embedding.from_float(_float_tensor(source, rule).to(dtype), BLOCK)
    head = None
    if config.tie_word_embeddings:
        if mode == "auto" and kind in ("Q4_0", "Q4_1"):
            head = _exact_q4(source, rule)
        elif mode == "auto" or head_kind == "int8":
            head = embed.to_int8_rows()
        elif head_kind == "int4":
            head = quantize_int4(_float_tensor(source, rule), group_size)
    return embed, head


def weights_summary(model: nn.Module) -> tuple[str, str]:
    """``(dtype, quantization)`` of the model's weights as they are held in memory, for the
    server's startup line, ``/metrics`` and ``eval --json``.

    llamakin's quantized layers are named with their layout (``int4 (group 32)``, ``int8``,
    ``int8 embedding``); any other integer weight or tensor subclass (how torchao's quantized
    weights look) is named by its type; ``"none"`` when every weight is a plain floating-point
    tensor. ``dtype`` lists the floating-point tensors outside the quantized layers (norms, biases,
    unquantized projections).
    """
    kinds, inside = set(), set()
    for module in model.modules():
        if isinstance(module, Int4Linear):
            kinds.add(f"int4 (group {module.group_size})")
        elif isinstance(module, QuantizedLinear) and module.kind == "int8":
            kinds.add("int8")
        elif isinstance(module, Int8Embedding):
            kinds.add("int8 embedding")
        else:
            continue
        inside.update(
            id(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        )
    dtypes, other = set(), set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in inside:
            continue
        data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
        if type(data) is not torch.Tensor:
            other.add(type(data).__name__)
        elif not data.is_floating_point():
            if data.dim() >= 2:  # integer buffers such as position ids are not weights
                other.add(str(data.dtype).removeprefix("torch."))
        else:
            dtypes.add(str(data.dtype).removeprefix("torch."))
    quantization = ", ".join([*sorted(kinds), *sorted(other)]) or "none"
    return "/".join(sorted(dtypes)) or "unknown", quantization


def use_exact_int8_head(model) -> None:
    """Give ``model`` (in place) an :class:`~llamakin.quant.linear.ExactInt8Linear` output head in
    place of an :class:`~llamakin.quant.linear.Int8Linear` one on CPU, where
    :func:`llamakin.quant.vnni.exact_int8_available` (what ``llamakin.load`` does)."""
    head = getattr(model, "lm_head", None)
    if (
        isinstance(head, Int8Linear)
        and head.qweight.device.type == "cpu"
        and vnni.exact_int8_available()
    ):
        # the packed copy (33-51 MB for SmolLM2-135M, by CPU) and the 28 MB int8 matrix it replaces as
        # mappings of their own, so the replaced one goes back to the system when freed
        with large_allocations_mapped():
            model.lm_head = ExactInt8Linear(head.quantized_weight(), head.bias)
            del head
        release_freed_memory()
