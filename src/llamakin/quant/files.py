"""llamakin's quantized checkpoint format (``llamakin quantize``), read back bit for bit.

A directory holding:

* ``config.json`` - llamakin's own config (``model_type: "llamakin"``, every knob under
  ``llamakin_config``) plus ``llamakin_quantization``: ``{"format": 1, "modules": {NAME: KIND}}``
  with ``KIND`` one of ``"int8"``, ``"int4-gN"`` (int4, group size N) and ``"embedding-int8-gN"``;
* ``model.safetensors`` (sharded like Hugging Face's when large) with, per quantized module ``NAME``:

  - int8: ``NAME.qweight`` int8 ``[N, K]``, ``NAME.scales`` float32 ``[N]``:
    ``W = qweight * scales[:, None]``;
  - int4: ``NAME.qweight`` uint8 ``[N, K / 2]`` (two values per byte, column ``2j`` in the low
    nibble), ``NAME.scales`` and ``NAME.zeros`` float32 ``[N, K / group]``:
    ``W[n, k] = (q[n, k] - 8) * scales[n, k // group] + zeros[n, k // group]``;
  - the embedding: ``embed.qweight`` int8 ``[V, D]``, ``embed.scales`` float32 ``[V, D / group]``;
  - ``NAME.bias`` in the model's float dtype when the projection has one;

  and every other parameter (norms, ...) under its canonical name in the model's float dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .linear import Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear
from .tensors import Int4Weight, Int8Weight, pack_nibbles, unpack_nibbles

KEY = "llamakin_quantization"
FORMAT = 1


def is_quantized_checkpoint(path: str | Path) -> bool:
    from ..checkpoint import read_json
    from ..source import resolve_model

    p = Path(path).expanduser()
    if not p.exists():
        return False
    config = resolve_model(p).path / "config.json"
    return config.is_file() and KEY in read_json(config)


def weight_tensors(
    name: str, weight, bias: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The file tensors and the kind string of one quantized matrix."""
    if isinstance(weight, Int8Weight):
        out, kind = (
            {f"{name}.qweight": weight.qweight, f"{name}.scales": weight.scales.float()},
            "int8",
        )
    else:
        out = {
            f"{name}.qweight": pack_nibbles(weight.q),
            f"{name}.scales": weight.scales.float(),
            f"{name}.zeros": weight.zeros.float(),
        }
        kind = f"int4-g{weight.group_size}"
    if bias is not None:
        out[f"{name}.bias"] = bias
    return out, kind


def save_quantized(
    model: nn.Module, directory: str | Path, weights: dict[str, object] | None = None
) -> Path:
    """Write ``model`` (with quantized modules) in the format above. ``weights`` may give the
    :class:`Int4Weight`/:class:`Int8Weight` of modules directly (as ``llamakin quantize`` does);
    otherwise they are recovered from the modules (exact, see :meth:`Int4Linear.quantized_weight`)."""
    from ..checkpoint import remove_stale_checkpoint_files
    from ..families.native import FAMILY
    from ..io.tensors import write_json, write_safetensors

    directory = Path(directory).expanduser()
    weights = weights or {}
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            weight = weights.get(name) or module.quantized_weight()
            part, modules[name] = weight_tensors(name, weight, module.bias)
            tensors.update(part)
        elif isinstance(module, Int8Embedding):
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = module.qweight, module.scales
            modules[name] = f"embedding-int8-g{module.group_size}"
    for name, p in model.named_parameters():
        tensors[name] = p.detach()
    config = FAMILY.config_to_checkpoint(model.config)
    config[KEY] = {
        "format": FORMAT,
        "dtype": str(model.dtype).removeprefix("torch."),
        "modules": modules,
    }
    written = write_safetensors(tensors, directory)
    written.append(directory / "config.json")
    write_json(config, written[-1])
    remove_stale_checkpoint_files(directory, keep=written)
    return directory


def load_quantized_checkpoint(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    dequantize: bool = False,
    activation_dtype: torch.dtype | None = None,
):
    """Read a checkpoint written by :func:`save_quantized` (``dequantize``: into a float model)."""
    from ..checkpoint import read_json
    from ..families.native import FAMILY
    from ..io.tensors import open_weights
    from ..model import Transformer
    from ..source import resolve_model

    directory = resolve_model(path).path
    raw = read_json(directory / "config.json")
    info = raw[KEY]
    if (
        not isinstance(info, dict)
        or info.get("format") != FORMAT
        or not isinstance(info.get("modules"), dict)
    ):
        raise CheckpointError(
            f"{directory}/config.json has a {KEY} entry of an unknown format; "
            f"this llamakin reads format {FORMAT}."
        )
    config = FAMILY.config_from_checkpoint(raw)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype)
    with open_weights(directory) as source:
        available = set(source.names())

        def get(name: str) -> torch.Tensor:
            if name not in available:
                raise CheckpointError(
                    f"{directory} lacks tensor {name!r}; the quantized checkpoint is incomplete."
                )
            return source.get(name)

        used: set[str] = set()
        for name, kind in info["modules"].items():
            keys = [
                k
                for k in (f"{name}.qweight", f"{name}.scales", f"{name}.zeros", f"{name}.bias")
                if k in available
            ]
            used.update(keys)
            bias = get(f"{name}.bias").to(dtype) if f"{name}.bias" in available else None
            if kind.startswith("embedding-int8"):
                module = Int8Embedding(get(f"{name}.qweight"), get(f"{name}.scales"), dtype)
                if dequantize:
                    module = nn.Embedding.from_pretrained(module.dequantize(), freeze=False)
            elif kind == "int8":
                weight = Int8Weight(get(f"{name}.qweight"), get(f"{name}.scales"))
                module = Int8Linear(weight, bias, activation_dtype, device)
            elif kind.startswith("int4-g"):
                weight = Int4Weight(
                    unpack_nibbles(get(f"{name}.qweight")),
                    get(f"{name}.scales"),
                    get(f"{name}.zeros"),
                    int(kind.removeprefix("int4-g")),
                )
                module = Int4Linear(weight, bias, activation_dtype, device)
            else:
                raise CheckpointError(
                    f"{directory}: module {name!r} has unknown quantization {kind!r}."
                )
            if dequantize and isinstance(module, QuantizedLinear):
                float_module = nn.Linear(
                    module.in_features, module.out_features, bias=bias is not None
                )
                from ..model.linear import Linear

                float_module.__class__ = Linear
                float_module.weight = nn.Parameter(weight.dequantize(dtype))
                if bias is not None:
                    float_module.bias = nn.Parameter(bias)
                module = float_module
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, module.to(device))
        for name, p in list(model.named_parameters()):
            if not p.is_meta:
                continue
            used.add(name)
            module_name, _, leaf = name.rpartition(".")
            setattr(
                model.get_submodule(module_name),
                leaf,
                nn.Parameter(get(name).to(device=device, dtype=dtype)),
            )
        extra = sorted(available - used)
        if extra:
            raise CheckpointError(
                f"{directory} has tensor {extra[0]!r} that this quantized model does not use; "
                "the checkpoint does not match its config."
            )
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = torch.empty_like(buf, device=device)
    model.init_buffers()
    return model.eval()
