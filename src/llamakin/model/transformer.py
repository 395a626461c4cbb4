"""The one configurable decoder-only transformer (docs/variants.md §1, with the knobs of §11)."""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig
from ..errors import LlamakinError
from ..token_ids import check_token_ids
from .attention import DifferentialAttention, make_attention
from .cache import KVCache, SlotWriter
from .linear import Linear, linear
from .masks import AttentionMask, build_mask, decode_masks
from .mlp import make_mlp
from .norm import make_norm
from .positions import position_tracker, positions_from_valid
from .rope import Rope, RotaryEmbedding, qwen_ntk_alpha


class Block(nn.Module):
    """Pre-norm block: ``x + r * f(norm(x))`` for attention then MLP (docs/variants.md §1).

    ``r`` is Granite's ``residual_multiplier`` (docs/variants.md §4). With ``post_sublayer_norms`` each branch
    output is normalised again before the residual add (GLM-4's sandwich norms, docs/variants.md §6.3). With
    ``normed_residual_alpha`` the residual is ``alpha * norm(x)`` instead of ``x`` (ChatGLM-6B, docs/variants.md §6.1).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.residual_multiplier = config.residual_multiplier
        self.normed_residual_alpha = config.normed_residual_alpha
        self.window = config.window_for_layer(layer_idx)
        self.attn_norm = make_norm(config)
        self.attn = make_attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)
        if config.post_sublayer_norms:
            self.attn_out_norm = make_norm(config)
            self.mlp_out_norm = make_norm(config)
        else:
            self.attn_out_norm = self.mlp_out_norm = None

    def _residual(
        self, base: torch.Tensor, branch: torch.Tensor, out_norm: nn.Module | None
    ) -> torch.Tensor:
        if out_norm is not None:
            branch = out_norm(branch)
        if self.residual_multiplier != 1.0:
            branch = branch * self.residual_multiplier
        return base + branch

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        masks: dict[int | None, AttentionMask],
        cache: KVCache | None,
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        x = self._residual(
            self._base(x, h), self.attn(h, rope, masks[self.window], cache), self.attn_out_norm
        )
        h = self.mlp_norm(x)
        return self._residual(self._base(x, h), self.mlp(h), self.mlp_out_norm)

    def _base(self, x: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """What the residual adds to: the input, or ChatGLM-6B's ``alpha * norm(x)`` (docs/variants.md §6.1)."""
        return x if self.normed_residual_alpha is None else normed * self.normed_residual_alpha


class Transformer(nn.Module):
    """Embeddings, ``num_layers`` blocks, final norm and output head, driven by a :class:`ModelConfig`.

    ``model(input_ids)`` returns logits ``[B, T, vocab]`` in the model's dtype. For incremental
    decoding pass a :class:`KVCache` from :meth:`new_cache`; for a batch of prompts of different
    lengths, left-pad them and pass ``attention_mask`` (1 = real token, 0 = padding) covering the
    cached and the new tokens, as in transformers.

    The model knows no checkpoint format: ``llamakin.save_pretrained(model, directory)`` writes
    one (``model.save_pretrained(directory)`` is the same call, attached by ``llamakin.checkpoint``).
    """

    # Recompute each block during backward instead of storing its activations (training only):
    # memory for one block's activations instead of all of them, for about a third more compute.
    gradient_checkpointing: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # On ``meta`` (a model to be loaded into) no random init: the first random op on a meta
        # tensor imports torch._dynamo for its Python decomposition (~830 modules, 68 MB resident, measured with
        # benchmarks/bench_memory.py); elsewhere nn.Embedding's own init, as always.
        on_meta = torch.get_default_device().type == "meta"
        self.embed = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size) if on_meta else None,
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_norm = make_norm(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rope = RotaryEmbedding(config)
        self.init_weights()

    # -- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Training initialisation: N(0, std) matrices and embeddings, zero biases, unit norms,
        N(0, 0.1) differential lambdas (docs/variants.md §7.1), output projections scaled by 1/sqrt(2 * layers)."""
        # built on ``meta`` to be loaded into: no values (see __init__)
        if self.embed.weight.is_meta:
            return
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("o_proj", "down"))
                nn.init.normal_(module.weight, 0.0, residual_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, DifferentialAttention):
                module.reset_lambdas()
            elif getattr(module, "weight", None) is not None and module.weight.dim() == 1:  # norms
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def init_buffers(self) -> None:
        """Rebuild non-persistent buffers, e.g. after ``to_empty()`` on a model built on ``meta``."""
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        # not the embedding's: it may be quantized (llamakin.quant)
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    # -- inference ----------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A static KV cache for ``batch_size`` rows of up to ``max_len`` tokens (default: the context)."""
        max_len = self.config.max_position_embeddings if max_len is None else max_len
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` (``[B, 1, vocab]`` with ``last_only``).

        With ``hidden_only`` the last block's output ``[B, T, hidden]`` instead: :meth:`head` turns
        any subset of its positions into logits (scoring needs only some positions' logits).

        ``attention_mask`` ``[B, past + T]`` (or ``[B, T]``) marks real tokens with 1 and padding
        with 0. Without ``position_ids``, positions count real tokens only, continuing the cache
        (for a prefix LM they follow its 2-D scheme, see :mod:`llamakin.model.positions`).
        """
        if input_ids.dim() != 2:
            raise LlamakinError(
                f"input_ids must have shape [batch, tokens], got {tuple(input_ids.shape)}."
            )
        if not torch.jit.is_tracing():
            check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None:
            if cache.batch_size != B:
                raise LlamakinError(
                    f"the KV cache was made for batch size {cache.batch_size}, not {B}."
                )
            cache.reserve(T, attention_mask)
            key_valid = cache.valid[:, : past + T] if cache.padded else None
        elif attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask[:, -T:].to(torch.bool)
        else:
            key_valid = None

        prefix_end = None
        if self.config.prefix_lm and past == 0:
            derived, prefix_end = position_tracker(self.config).prompt(input_ids, key_valid)
            position_ids = derived if position_ids is None else position_ids
        elif position_ids is None:
            if self.config.prefix_lm:
                raise LlamakinError(
                    "a prefix-LM model decoding from a cache needs explicit position_ids "
                    "(llamakin.generate computes them)."
                )
            if key_valid is not None:
                position_ids = positions_from_valid(key_valid, past)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        key_positions = None
        # keys cached before RoPE: rotate them all
        if cache is not None and self.config.rope_cached_keys:
            key_positions = (
                positions_from_valid(key_valid, 0)
                if key_valid is not None
                else torch.arange(past + T, device=input_ids.device)[None].expand(B, -1)
            )
        ntk_alpha = self._ntk_alpha(B, T, key_valid, past, cache)
        masks = {
            w: build_mask(key_valid, past, T, w, input_ids.device, prefix_end)
            for w in self._windows()
        }
        return self._logits(
            input_ids,
            self._rope(position_ids, ntk_alpha, key_positions),
            masks,
            cache,
            last_only,
            hidden_only,
        )

    def _ntk_alpha(
        self, B: int, T: int, key_valid: torch.Tensor | None, past: int, cache: KVCache | None
    ) -> torch.Tensor | None:
        """Qwen v1's dynamic-NTK alpha per row ``[B]`` (docs/variants.md §5.1): measured on each row's real
        tokens when a sequence starts (``QWenModel.forward``'s prefill branch: one alpha per row
        from its attention mask) and kept in the cache for every later call of that generation."""
        s = self.config.rope_scaling
        if s.type != "qwen_dynamic" or self.training:
            return None
        if past > 0:
            return cache.rope_alpha
        lengths = key_valid[:, -T:].sum(-1).tolist() if key_valid is not None else [T] * B
        device = self.embed.weight.device
        alpha = torch.tensor(
            [float(qwen_ntk_alpha(max(n, 1), s.original_max_position_embeddings)) for n in lengths],
            dtype=torch.float32,
            device=device,
        )
        if cache is not None:
            cache.rope_alpha.copy_(alpha)  # in place: views of a server's cache share it
        return alpha

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        key_valid: torch.Tensor,
        cache: KVCache,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """One decoding step, traceable (:mod:`llamakin.speed.decode_trace`): logits ``[B, vocab]``.

        ``tokens`` ``[B, 1]``; ``positions`` ``[B, 1]`` (``[B, 2, 1]`` for 2-D RoPE); ``slots`` ``[B]``
        the cache slot each row writes; ``key_valid`` ``[B, S]`` which of the cache's first ``S``
        slots hold real tokens (``S <= max_len``, past every row's slot). Attention covers those
        ``S`` slots through a mask; ``S`` is read from ``key_valid``'s shape, so a trace of this
        step records it as a size, not a constant, and serves every ``S``. The caller advances
        the cache. ``hidden_only``: the last block's output ``[B, hidden]`` instead (``head``
        gives the logits).
        """
        masks = decode_masks(key_valid, slots, self._windows(), self.dtype)
        key_positions = positions_from_valid(key_valid, 0) if self.config.rope_cached_keys else None
        rope = self._rope(positions, cache.rope_alpha, key_positions)
        writer = SlotWriter(cache, slots, key_valid.shape[1])
        return self._logits(tokens, rope, masks, writer, True, hidden_only)[:, -1]

    def _windows(self) -> set[int | None]:
        return {block.window for block in self.layers}

    def _rope(
        self,
        positions: torch.Tensor,
        ntk_alpha: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
    ) -> Rope:
        """cos/sin tables (and those of every cached key when keys are cached before RoPE), and
        Qwen v1's logn factor on q when it applies (inference only, docs/variants.md §5.1)."""
        if self.config.rope_layout == "glm2d" and positions.dim() == 2:
            positions = torch.stack((positions, torch.zeros_like(positions)), 1)
        key_cos = key_sin = None
        if key_positions is not None:
            cos, sin, key_cos, key_sin = self.rope(
                positions, self.dtype, ntk_alpha, key_positions=key_positions
            )
        else:
            cos, sin = self.rope(positions, self.dtype, ntk_alpha)
        q_scale = None
        trained = self.config.logn_attention_length
        if trained is not None and not self.training:
            p = (positions[:, 0] if positions.dim() == 3 else positions).float() + 1
            q_scale = torch.where(p > trained, p.log() / math.log(trained), torch.ones_like(p))
            q_scale = q_scale.to(self.dtype)[:, None, :, None]
        return Rope(cos, sin, q_scale, key_cos, key_sin)

    def _logits(
        self,
        input_ids: torch.Tensor,
        rope: Rope,
        masks: dict[int | None, AttentionMask],
        cache: KVCache | SlotWriter | None,
        last_only: bool,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if checkpointed:  # keep only each block's input; recompute its inside during backward
                x = torch.utils.checkpoint.checkpoint(
                    block, x, rope, masks, cache, use_reentrant=False
                )
            else:
                x = block(x, rope, masks, cache)
        if isinstance(cache, KVCache):
            cache.advance(input_ids.shape[1])
        if last_only:
            x = x[:, -1:]
        return x if hidden_only else self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the last block's output ``x`` ``[..., hidden]``: final norm, output projection,
        Granite's logits scaling (docs/variants.md §4)."""
        x = self.final_norm(x)
        # a head module when untied, or a quantized one (llamakin.quant), else the tied embedding
        logits = self.lm_head(x) if self.lm_head is not None else linear(x, self.embed.weight)
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits
