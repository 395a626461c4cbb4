"""Load checkpoints into the one model and save it back (``llamakin.load``, ``save_pretrained``).

Loading: read the checkpoint's config, let its family adapter build a :class:`ModelConfig`,
build the model on the ``meta`` device (no memory), allocate it on the target device, check every
source tensor's name and shape against the adapter's rules from file headers alone, then copy
tensors in one at a time. Peak memory is the model plus the largest single tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import ModelConfig
from .errors import CheckpointError
from .families import Family, TensorRule, detect_family, family_for_export, get_family
from .families.gguf import TENSOR_NAMES, gguf_family
from .io.gguf import GGUFFile
from .io.tensors import TensorSource, open_weights, write_json, write_safetensors, write_torch
from .model import Transformer
from .source import ModelSource, resolve_model
from .validation import (
    check_plausible_size,
    check_raw_config,
    is_weight_dtype,
    parse_device,
    stored_values,
    translated,
)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return _DTYPES[dtype]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} does not exist; a checkpoint directory needs its config file."
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); restore it from the original checkpoint."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """A model with allocated but uninitialised parameters (built on ``meta``, then placed)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_buffers()
    return model


def check_tensors(
    rules: list[TensorRule],
    params: dict[str, torch.Tensor],
    source: TensorSource,
    family: Family,
    where: str,
    tied: bool,
) -> None:
    """Refuse missing, unexpected and misshaped tensors before reading any data."""
    available = set(source.names())
    needed = [s for r in rules for s in r.sources]
    missing = [n for n in needed if n not in available]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{where} lacks tensor {missing[0]!r}{more}, which a {family.name} model with this config needs; "
            "the checkpoint is incomplete or its config does not match its weights."
        )
    extra = sorted(n for n in available - set(needed) if not family.is_ignored(n, tied))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{where} has tensor {extra[0]!r}{more} that a {family.name} model with this config does not use; "
            "check that the config matches the weights."
        )
    for rule in rules:
        # the expected shapes from a one-byte CPU stand-in (freed at once): on ``meta``, torch.cat
        # runs a Python decomposition that imports torch._dynamo (~68 MB resident, measured)
        stand_in = torch.empty(params[rule.canonical].shape, dtype=torch.uint8)
        expected = rule.from_canonical(stand_in)
        for name, want in zip(rule.sources, expected):
            got = source.shape(name)
            if got != tuple(want.shape):
                raise CheckpointError(
                    f"{where}: tensor {name!r} has shape {list(got)} but the config implies {list(want.shape)}; "
                    "the config does not match the weights."
                )
            if not is_weight_dtype(source.dtype(name)):
                raise CheckpointError(
                    f"{where}: tensor {name!r} holds {source.dtype(name)} values, not floating-point "
                    "weights; the checkpoint is corrupt or not a model."
                )


def load_weights(
    model: Transformer,
    rules: list[TensorRule],
    source: TensorSource,
    family: Family,
    where: str,
    progress: bool | None = None,
) -> None:
    params = dict(model.named_parameters())
    covered = {r.canonical for r in rules}
    if covered != set(params):  # an adapter bug, not a user error
        raise AssertionError(f"{family.name} rules do not cover {sorted(set(params) ^ covered)}")
    check_tensors(rules, params, source, family, where, model.config.tie_word_embeddings)
    total = sum(p.numel() for p in params.values())
    show = total > 50_000_000 if progress is None else progress
    with torch.no_grad():
        for rule in tqdm(rules, desc="loading", unit="tensor", disable=not show, leave=False):
            value = rule.to_canonical([source.get(n) for n in rule.sources])
            params[rule.canonical].copy_(value)
            # freed before the next rule's tensors are read: one source tensor alive at a time
            del value


def read_checkpoint_config(directory: Path) -> tuple[Family, ModelConfig]:
    """The family and knobs of a checkpoint directory (``config.json``, else Meta's ``params.json``)."""
    config_path = directory / "config.json"
    if config_path.is_file():
        raw = read_json(config_path)
        check_raw_config(raw, str(config_path))
        family = translated(lambda r: detect_family(r, str(config_path)), raw, str(config_path))
    elif (directory / "params.json").is_file():
        config_path = directory / "params.json"
        raw = read_json(config_path)
        # Meta writes -1; the adapter says what to do
        check_raw_config(raw, str(config_path), skip=("vocab_size",))
        family = get_family("meta")
    else:
        raise CheckpointError(
            f"{directory} has no config.json (or Meta params.json); llamakin needs the checkpoint's config "
            "to build the model."
        )
    return family, translated(family.config_from_checkpoint, raw, str(config_path))


def stored_dtype(path: str | Path | ModelSource) -> str:
    """The dtype a checkpoint stores its weights in (that of the first floating tensor)."""
    model_source = resolve_model(path)
    if model_source.is_gguf:
        with GGUFFile(model_source.path) as source:
            if not source.names():
                raise CheckpointError(
                    f"{model_source.path} holds no tensors; it is not a model checkpoint."
                )
            return source.dtype(source.names()[-1])
    with open_weights(model_source.path) as source:
        for tensor in source.names():
            name = source.dtype(tensor)
            if name in ("float32", "float16", "bfloat16"):
                return name
    return "float32"


def read_gguf_config(gguf: GGUFFile) -> tuple[Family, ModelConfig]:
    meta = {**gguf.metadata, TENSOR_NAMES: gguf.names()}
    family = gguf_family(meta, str(gguf.path))
    check_raw_config(gguf.metadata, f"{gguf.path} (GGUF metadata)", prefix=f"{family.arch}.")
    return family, translated(family.config_from_checkpoint, meta, f"{gguf.path} (GGUF metadata)")


def read_model_config(path: str | Path | ModelSource) -> tuple[Family, ModelConfig]:
    """The family and knobs of any model :func:`~llamakin.source.resolve_model` names; reads no weights."""
    model_source = resolve_model(path)
    if model_source.is_gguf:
        with GGUFFile(model_source.path) as gguf:
            return read_gguf_config(gguf)
    return read_checkpoint_config(model_source.path)


def load(
    path: str | Path | ModelSource,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> Transformer:
    """Load float weights of a checkpoint: a ``.gguf`` file (dequantized), a Hugging Face directory
    (config.json + safetensors or pytorch_model.bin), a Meta/Mistral native directory (params.json +
    consolidated.*), llamakin's own float format, or the name of a catalog model; see
    :mod:`llamakin.source`. ``llamakin.load`` (:mod:`llamakin.loading`) adds quantization and
    adapters on top of this."""
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    model_source = resolve_model(path)
    path = model_source.path
    if model_source.is_gguf:
        with GGUFFile(path) as source:
            family, config = read_gguf_config(source)
            # refused from headers alone before anything is built (item: plausible size)
            check_plausible_size(config, str(path), stored_values(source), dtype, device)
            model = empty_model(config, dtype, device)
            load_weights(model, family.tensor_rules(config), source, family, str(path))
    else:
        directory = path
        family, config = read_checkpoint_config(directory)
        with open_weights(directory) as source:
            check_plausible_size(config, str(directory), stored_values(source), dtype, device)
            model = empty_model(config, dtype, device)
            load_weights(model, family.tensor_rules(config), source, family, str(directory))
    return model.eval()


def export_tensors(model: Transformer, family: Family) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``family`` for the model's parameters (views where possible)."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for rule in family.tensor_rules(model.config):
        out.update(zip(rule.sources, rule.from_canonical(state[rule.canonical].detach())))
    return out


def save_pretrained(
    model: Transformer,
    directory: str | Path,
    family: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write ``config.json`` + safetensors (or Meta's files) in the layout of ``family`` (default:
    the family the model was loaded from, else the first format that expresses its knobs exactly)."""
    directory = Path(directory).expanduser()
    fam = family_for_export(model.config, family)
    tensors = export_tensors(model, fam)
    config = fam.config_to_checkpoint(model.config)
    if fam.weights_format == "torch":
        written = [directory / "consolidated.00.pth"]
        write_torch(tensors, written[0])
    else:
        dtype_name = str(model.dtype).removeprefix("torch.")
        config.update({"dtype": dtype_name, "torch_dtype": dtype_name})
        written = write_safetensors(tensors, directory, max_shard_bytes)
    written.append(directory / fam.config_file)
    write_json(config, written[-1])
    remove_stale_checkpoint_files(directory, keep=written)
    return directory


def _save_pretrained_method(
    self: Transformer, directory: str | Path, family: str | None = None, **options
) -> Path:
    """``model.save_pretrained(directory)``: the same as ``llamakin.save_pretrained(model, directory)``."""
    return save_pretrained(self, directory, family=family, **options)


# Kept for API compatibility. The model module does not import checkpoint code (that would be an
# import cycle, model -> checkpoint -> families -> model); this module, which depends on the model,
# attaches the method instead. ``import llamakin`` always imports this module first.
Transformer.save_pretrained = _save_pretrained_method


_CHECKPOINT_FILES = (
    "config.json",
    "params.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "consolidated.*",
)


def remove_stale_checkpoint_files(directory: Path, keep: list[Path]) -> None:
    """Saving into a directory replaces the checkpoint there: weight and config files of another
    layout or shard count left behind would be read instead of (or mixed with) the new ones."""
    keep_names = {p.name for p in keep}
    for pattern in _CHECKPOINT_FILES:
        for stale in directory.glob(pattern):
            if stale.name not in keep_names and stale.is_file():
                stale.unlink()
