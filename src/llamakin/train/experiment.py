"""``llamakin experiment diff-vs-baseline``: the Differential Transformer against its standard
twin, on the same data, seed and token budget; overlaid curves and a results table.

Quality is reported twice: the validation perplexity on the training corpus's held-out split
(``exp`` of the final validation loss), and the perplexity of both trained models on a second
corpus they never saw (default: the Wikipedia sample, see :mod:`llamakin.corpora`), measured by
:func:`llamakin.evaluate.perplexity` (sliding window of ``seq_len`` tokens, stride half of it,
the first ``eval_windows`` windows)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..extras import require_extra
from .config import recipe
from .data import prepare
from .plot import plot_runs, read_metrics
from .run import train

PAIR = ("baseline-paper-small", "diff-paper-small")


def held_out_perplexity(model_dir: Path, text: str, context: int, windows: int) -> float:
    """Perplexity of a trained model (exported HF directory with its tokenizer) on another text."""
    import llamakin
    from ..evaluate import perplexity

    model = llamakin.load(model_dir)
    return perplexity(
        model, llamakin.load_tokenizer(model_dir), text, context=context, max_chunks=windows
    ).perplexity


def _eval_text(eval_text: str) -> tuple[str, str]:
    """(name for the table, text) of a corpus name or a text file."""
    from ..corpora import CORPORA, corpus_file
    from ..evaluate import read_texts

    if eval_text in CORPORA:
        return eval_text, corpus_file(eval_text).read_text(encoding="utf-8")
    return Path(eval_text).name, read_texts([eval_text])[0]


def diff_vs_baseline(
    budget_tokens: int,
    out: str | Path,
    overrides: list[str] = (),
    eval_text: str = "wikipedia",
    eval_windows: int = 64,
) -> dict:
    require_extra("plot", "the experiment's curves")  # before training, not after it
    out = Path(out).expanduser()
    eval_name, eval_body = _eval_text(eval_text)
    first = recipe(PAIR[0], list(overrides))
    data = out / "data"
    if not (data / "meta.json").is_file():
        kind, _, value = first.tokenizer.partition(":")
        prepare(
            first.data,
            data,
            **({"train_vocab": int(value)} if kind == "train" else {"tokenizer": first.tokenizer}),
        )
    rows = []
    for name in PAIR:
        cfg = recipe(
            name, [*overrides, f"budget_tokens={budget_tokens}", f"data={json.dumps(str(data))}"]
        )
        run = out / name
        train(cfg, run)
        metrics = read_metrics(run)
        model_config = json.loads((run / "train_config.json").read_text())["model"]
        import torch

        from ..config import ModelConfig
        from ..model import Transformer

        with torch.device("meta"):
            params = sum(
                p.numel() for p in Transformer(ModelConfig.from_dict(model_config)).parameters()
            )
        val_loss = next(r["val_loss"] for r in reversed(metrics) if "val_loss" in r)
        rows.append(
            {
                "recipe": name,
                "parameters": params,
                "final_val_loss": round(val_loss, 4),
                "val_ppl": round(math.exp(min(val_loss, 700.0)), 2),
                "eval_text": eval_name,
                "eval_ppl": round(
                    held_out_perplexity(run / "model", eval_body, cfg.seq_len, eval_windows), 2
                ),
                "final_train_loss": round(metrics[-1]["loss"], 4),
                "tokens": metrics[-1]["tokens"],
                "tokens_per_s": round(
                    statistics.median(r["tokens_per_s"] for r in metrics[1:] or metrics), 1
                ),
            }
        )
    plot_runs([out / n for n in PAIR], out / "curves.png", labels=["baseline", "differential"])
    table = [
        "| recipe | parameters | final validation loss | validation perplexity | "
        f"perplexity on {eval_name} (unseen) | final train loss | tokens | tokens/s (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['recipe']} | {r['parameters']:,} | {r['final_val_loss']} | {r['val_ppl']} | {r['eval_ppl']} | "
        f"{r['final_train_loss']} | {r['tokens']:,} | {r['tokens_per_s']} |"
        for r in rows
    ]
    (out / "results.md").write_text("\n".join(table) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return {"rows": rows, "plot": str(out / "curves.png"), "table": "\n".join(table)}
