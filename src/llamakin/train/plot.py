"""Loss and gradient-norm curves of one or more runs (``llamakin plot DIR...``), as PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LlamakinError
from ..extras import require_extra


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise LlamakinError(f"{run} has no metrics.jsonl; point at a training output directory.")
    lines = [
        line
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip()
    ]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines):  # the last line torn by a kill mid-write: the steps before it stand
                break
            raise LlamakinError(f"{path}:{n} is not valid JSON; remove that line.") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("step"), int)
            or not all(
                isinstance(record.get(k), (int, float)) for k in ("loss", "tokens", "grad_norm")
            )
        ):
            raise LlamakinError(
                f"{path}:{n} is not a llamakin metrics record (step, loss, tokens, grad_norm)."
            )
        rows.append(record)
    if not rows:
        raise LlamakinError(
            f"{path} holds no complete step yet; plot again once the run has logged one."
        )
    # a resumed run appends: keep the last record of each step
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def plot_runs(runs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Training loss (and validation loss) against tokens, and the global gradient norm, overlaid."""
    require_extra("plot", "plotting training curves")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(r).name for r in runs]
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, label in zip(runs, labels):
        rows = read_metrics(run)
        tokens = [r["tokens"] / 1e6 for r in rows]
        (line,) = ax_loss.plot(
            tokens, [r["loss"] for r in rows], alpha=0.5, linewidth=1, label=f"{label} train"
        )
        val = [(r["tokens"] / 1e6, r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax_loss.plot(
                *zip(*val), marker="o", color=line.get_color(), label=f"{label} validation"
            )
        ax_norm.plot(tokens, [r["grad_norm"] for r in rows], alpha=0.7, linewidth=1, label=label)
    ax_loss.set(xlabel="tokens (millions)", ylabel="cross-entropy (nats/token)", title="loss")
    ax_norm.set(
        xlabel="tokens (millions)",
        ylabel="global gradient norm (before clipping)",
        title="gradient norm",
        yscale="log",
    )
    for ax in (ax_loss, ax_norm):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
