"""``llamakin experiment diff-vs-baseline``: the Differential Transformer against its standard
twin, on the same data, seed and token budget; overlaid curves and a results table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..extras import require_extra
from .config import recipe
from .data import prepare
from .loop import train
from .plot import plot_runs, read_metrics

PAIR = ("baseline-paper-small", "diff-paper-small")


def diff_vs_baseline(budget_tokens: int, out: str | Path, overrides: list[str] = ()) -> dict:
    require_extra("plot", "the experiment's curves")  # before training, not after it
    out = Path(out).expanduser()
    first = recipe(PAIR[0], list(overrides))
    data = out / "data"
    if not (data / "meta.json").is_file():
        kind, _, value = first.tokenizer.partition(":")
        prepare(first.data, data, **({"train_vocab": int(value)} if kind == "train" else {"tokenizer": first.tokenizer}))
    rows = []
    for name in PAIR:
        cfg = recipe(name, [*overrides, f"budget_tokens={budget_tokens}", f"data={json.dumps(str(data))}"])
        run = out / name
        train(cfg, run)
        metrics = read_metrics(run)
        model_config = json.loads((run / "train_config.json").read_text())["model"]
        import torch

        from ..config import ModelConfig
        from ..model import Transformer

        with torch.device("meta"):
            params = sum(p.numel() for p in Transformer(ModelConfig.from_dict(model_config)).parameters())
        rows.append({"recipe": name, "parameters": params,
                     "final_val_loss": round(next(r["val_loss"] for r in reversed(metrics) if "val_loss" in r), 4),
                     "final_train_loss": round(metrics[-1]["loss"], 4),
                     "tokens": metrics[-1]["tokens"],
                     "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in metrics[1:] or metrics), 1)})
    plot_runs([out / n for n in PAIR], out / "curves.png", labels=["baseline", "differential"])
    table = ["| recipe | parameters | final validation loss | final train loss | tokens | tokens/s (median) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['recipe']} | {r['parameters']:,} | {r['final_val_loss']} | {r['final_train_loss']} | "
              f"{r['tokens']:,} | {r['tokens_per_s']} |" for r in rows]
    (out / "results.md").write_text("\n".join(table) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return {"rows": rows, "plot": str(out / "curves.png"), "table": "\n".join(table)}
