"""llamakin as an lm-evaluation-harness model (``lm-eval`` 0.4.x): ``--model llamakin``.

    llamakin eval harness --model llamakin --model_args pretrained=PATH_OR_NAME,dtype=float32 \\
        --tasks my_task --include_path DIR_OF_TASK_YAMLS [--apply_chat_template] [--batch_size 8]
    python -m llamakin.harness ...        # the same

Why a wrapper: lm-eval 0.4.13 finds models only in its own registry, filled by its built-in
``lm_eval.models.MODEL_MAPPING`` or by importing a module that calls ``@register_model``
(``lm_eval/api/registry.py``: no entry-point group is read for models). Importing this module
registers ``llamakin``; the wrapper imports it and then runs lm-eval's own command line,
unchanged, with every argument passed through. From Python::

    import lm_eval, llamakin.harness  # registers "llamakin"
    lm_eval.simple_evaluate(model="llamakin", model_args="pretrained=...", tasks=[...])

The requests follow lm-eval's ``hf`` backend exactly, so numbers compare with it:
``loglikelihood`` through lm-eval's :class:`TemplateLM` (trailing context spaces move to the
continuation; context+continuation is tokenized whole and split at the context's length; an
empty context is replaced by the prefix token, BOS or else EOS), inputs left-truncated to the
model's context; ``loglikelihood_rolling`` over lm-eval's disjoint rolling windows; and
``generate_until`` greedy (or sampled when asked) in left-padded batches, stopping at the task's
``until`` strings and EOS. Scoring runs :func:`llamakin.evaluate.score_windows` (batched, logits
only at scored positions); generation runs :class:`llamakin.generate.GenerationRun`.
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401 - the built-in models first: get_model() fills the registry only while it is empty
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .evaluate import Window, score_windows


@register_model("llamakin")
class LlamakinLM(TemplateLM):
    """``--model_args pretrained=PATH_OR_NAME[,dtype=float32|bfloat16|float16|auto][,device=cpu]
    [,quantize=none|auto|int8|int4][,group_size=32][,batch_size=8][,max_length=N][,max_gen_toks=256]``.

    ``quantize`` defaults to ``none`` (float weights, comparable with lm-eval's ``hf`` backend);
    ``auto`` keeps a GGUF's quantization, ``int8``/``int4`` quantize float weights (README,
    "Quantization")."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        quantize: str = "none",
        group_size: int | str = 32,
        **unused: Any,
    ):
        super().__init__()
        import llamakin
        from .catalog import DEFAULT_MODEL, resolve
        from .errors import LlamakinError

        if unused:
            raise LlamakinError(
                f"unknown --model_args for llamakin: {', '.join(sorted(unused))}; known: pretrained, "
                "dtype, device, quantize, group_size, batch_size, max_length, max_gen_toks."
            )
        path = resolve(pretrained or DEFAULT_MODEL)
        self.model = llamakin.load(
            path,
            dtype="float32" if dtype == "auto" else dtype,
            device=device,
            quantize=None if quantize == "none" else quantize,
            group_size=int(group_size),
        )
        self.model.eval()
        self.tok = llamakin.load_tokenizer(path)
        self.pretrained = str(pretrained or DEFAULT_MODEL)
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self._max_length = (
            int(max_length) if max_length else self.model.config.max_position_embeddings
        )
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(
            lm_utils.simple_parse_args_string(arg_string), additional_config
        )

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval passes ``--batch_size``, ``--max_batch_size`` and ``--device`` here as well (``None``:
        unset). Its ``--device`` defaults to ``cuda``, taken only where CUDA exists (as its ``hf``
        backend does); ``--model_args`` win over these."""
        extra = {
            k: v
            for k, v in (additional_config or {}).items()
            if v is not None and k in ("batch_size", "device")
        }
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            extra.pop("device")
        return cls(**{**extra, **arg_dict})

    # -- what TemplateLM needs ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        # the tokenizer's own rule, unless the text already starts with BOS
        if add_special_tokens is None:
            add_special_tokens = not (self.tok.bos_token and string.startswith(self.tok.bos_token))
        return self.tok.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template not in (False, None) else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's template; without a generation prompt the last message is left open for the
        continuation (transformers' ``continue_final_message``)."""
        rendered = self.tok.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt
        )
        if not add_generation_prompt and chat_history:
            final = chat_history[-1]["content"].strip()
            cut = rendered.rfind(final) if final else -1
            if cut >= 0:
                rendered = rendered[: cut + len(final)]
        return rendered

    # -- scoring -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        windows = []
        for _, context_enc, continuation_enc in requests:
            ids = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            windows.append(Window(ids, len(ids) - len(continuation_enc) - 1))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
        bar = tqdm(total=len(windows), desc="llamakin loglikelihood", disable=disable_tqdm)
        for index, scores in score_windows(
            self.model, windows, self._batch_size, self.eot_token_id, progress=bar
        ):
            results[index] = (float(scores.logprobs.double().sum()), bool(scores.greedy.all()))
            key = requests[index][0]
            if key is not None and key[0] is not None:
                self.cache_hook.add_partial("loglikelihood", key, results[index])
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation --------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from .generate import GenerationRun, SamplingParams

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(n)
        eos_text = self.tok.decode([self.eot_token_id])
        bar = tqdm(total=len(requests), desc="llamakin generate_until", disable=disable_tqdm)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=float(kwargs.get("temperature") or 0.0)
                if kwargs.get("do_sample")
                else 0.0,
                top_p=float(kwargs.get("top_p") or 1.0),
                top_k=int(kwargs.get("top_k") or 0),
                seed=kwargs.get("seed"),
                stop=tuple(until),
            )
            encoded = {
                n: self.tok_encode(requests[n].args[0])[-(self.max_length - max_new) :]
                for n in members
            }
            order = sorted(members, key=lambda n: -len(encoded[n]))
            for start in range(0, len(order), self._batch_size):
                batch = order[start : start + self._batch_size]
                run = GenerationRun(self.model, self.tok, [encoded[n] for n in batch], params)
                for _ in run:
                    pass
                for n, row in zip(batch, run.results):
                    # as lm-eval's hf backend: the generated tokens decoded without special tokens, cut at stops
                    text = self.tok.decode(row.token_ids, skip_special_tokens=True)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_name": self.pretrained,
        }


def run_harness(argv: list[str]) -> int:
    """lm-eval's command line with ``llamakin`` registered; its exit status."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(run_harness(sys.argv[1:]))
