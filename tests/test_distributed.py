"""Multi-process training under torchrun on 2 CPU processes (gloo): DDP equals one process at
the same global batch, resume works under DDP, and FSDP2 trains the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_train import TINY, corpus  # noqa: F401 - the shared prepared corpus fixture

pytestmark = pytest.mark.slow


def command(prepared, out, *extra, processes: int = 1):
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
        if processes > 1
        else [sys.executable]
    )
    args = launcher + [
        "-m",
        "llamakin.cli",
        "train",
        "--recipe",
        "shakespeare-tiny",
        "--out",
        str(out),
    ]
    for item in [*TINY, f"data={json.dumps(str(prepared[0]))}", *extra]:
        args += ["--set", item]
    return args


def run(args, **env):
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=600,
    )
    return result


def losses(out):
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r["loss"]
    return [rows[s] for s in sorted(rows)]


def weights(out):
    return torch.load(out / "ckpt.pt", weights_only=True)["model"]


def test_ddp_step_equals_single_process_step(corpus, tmp_path):  # noqa: F811
    single = run(command(corpus, tmp_path / "one", "max_steps=3", "micro_batch=2", "grad_accum=2"))
    assert single.returncode == 0, single.stderr
    ddp = run(
        command(
            corpus, tmp_path / "ddp", "max_steps=3", "micro_batch=2", "grad_accum=1", processes=2
        )
    )
    assert ddp.returncode == 0, ddp.stderr
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((tmp_path / "ddp" / "train_config.json").read_text())["world_size"] == 2


def test_resume_under_ddp(corpus, tmp_path):  # noqa: F811
    settings = ["max_steps=6", "micro_batch=2"]
    whole = run(command(corpus, tmp_path / "whole", *settings, processes=2))
    assert whole.returncode == 0, whole.stderr
    crashed = run(
        command(corpus, tmp_path / "cut", *settings, processes=2), LLAMAKIN_DIE_AFTER_STEP="4"
    )
    assert crashed.returncode != 0
    resumed = run(command(corpus, tmp_path / "cut", *settings, processes=2) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_fsdp_trains_like_ddp(corpus, tmp_path):  # noqa: F811
    ddp = run(command(corpus, tmp_path / "ddp", "max_steps=3", "micro_batch=2", processes=2))
    fsdp = run(
        command(
            corpus,
            tmp_path / "fsdp",
            "max_steps=3",
            "micro_batch=2",
            'parallel="fsdp"',
            processes=2,
        )
    )
    assert ddp.returncode == 0, ddp.stderr
    assert fsdp.returncode == 0, fsdp.stderr
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-4)
    assert (tmp_path / "fsdp" / "model" / "config.json").is_file()
