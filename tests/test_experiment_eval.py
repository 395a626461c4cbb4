"""Held-out quality in training and the diff-vs-baseline experiment: validation perplexity, and the
perplexity of both trained models on a second text they were not trained on."""

from __future__ import annotations

import json
import math

import pytest

import llamakin
from eval_assets import TEXT
from llamakin.evaluate import perplexity
from llamakin.train.experiment import diff_vs_baseline

TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=64",
    "model.max_position_embeddings=64",
    "seq_len=32",
    "micro_batch=2",
    "warmup_steps=1",
    "eval_interval=2",
    "eval_batches=1",
    "save_interval=4",
    'tokenizer="train:300"',
]


@pytest.mark.slow
def test_experiment_reports_validation_and_unseen_text_perplexity(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "sonnet.txt").write_text(TEXT[:700] * 6)
    (tmp_path / "unseen.txt").write_text(TEXT[700:] * 4)
    data = json.dumps([str(tmp_path / "texts")])
    result = diff_vs_baseline(
        32 * 2 * 4,
        tmp_path / "exp",
        [*TINY, f"data={data}"],
        eval_text=str(tmp_path / "unseen.txt"),
        eval_windows=3,
    )
    assert (
        "validation perplexity" in result["table"]
        and "perplexity on unseen.txt (unseen)" in result["table"]
    )
    for row in result["rows"]:
        run = tmp_path / "exp" / row["recipe"]
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in metrics if "val_loss" in m][-1]
        assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))  # train reports it too
        assert row["val_ppl"] == pytest.approx(math.exp(row["final_val_loss"]), rel=1e-3)
        model, tok = llamakin.load(run / "model"), llamakin.load_tokenizer(run / "model")
        expected = perplexity(
            model, tok, (tmp_path / "unseen.txt").read_text(), context=32, max_chunks=3
        )
        assert row["eval_ppl"] == pytest.approx(expected.perplexity, abs=0.01)
        assert 1 < row["eval_ppl"] < 1000
