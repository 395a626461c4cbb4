"""llamakin as an lm-evaluation-harness model: lm_eval runs offline on task YAMLs written here
(pointing at local json files), once with ``--model llamakin`` through ``llamakin eval harness``
and once with lm-eval's own ``hf`` backend on the same tiny model; every loglikelihood must agree
within 1e-4 and greedy generations must be identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_assets import TEXT, tiny_llama_dir

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

# trailing space
MC = [
    {
        "question": "Shall I compare thee to a",
        "choices": [" summer's day?", " winter night", " darling bud"],
        "answer": 0,
    },
    {
        "question": "In the beginning God created the",
        "choices": [" heaven", " earth and sea", " light"],
        "answer": 0,
    },
    {
        "question": "And God said, Let there be",
        "choices": [" light", " darkness upon the deep"],
        "answer": 0,
    },
    {"question": "Rough winds do shake ", "choices": ["the darling buds", "of May"], "answer": 1},
]
ROLLING = [
    {"text": TEXT},
    {"text": TEXT[:200]},
    {"text": "So long lives this, and this gives life to thee."},
]
GEN = [
    {"question": "Shall I compare thee", "answer": "x"},
    {"question": "And the earth was", "answer": "x"},
    {"question": "So long as men can", "answer": "x"},
]


def write_tasks(root: Path) -> Path:
    """Three task YAMLs over local json files: multiple choice, rolling loglikelihood, generate_until."""
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    for name, rows in (("mc", MC), ("rolling", ROLLING), ("gen", GEN)):
        (tasks / f"{name}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def yaml(name: str, body: str) -> None:
        (tasks / f"{name}.yaml").write_text(
            f"task: lk_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / (name + '.json')}\n"
            f"test_split: test\n{body}"
        )

    yaml(
        "mc",
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
    )
    yaml(
        "rolling",
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n",
    )
    yaml(
        "gen",
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    )
    return tasks


def offline_env(root: Path) -> dict:
    return {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(root / "hf-home"),
        "HF_DATASETS_CACHE": str(root / "hf-datasets"),
    }


def run_llamakin(
    model: Path, tasks: Path, out: Path, env: dict, *extra: str
) -> dict[str, list[dict]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamakin.cli",
            "eval",
            "harness",
            "--model",
            "llamakin",
            "--model_args",
            f"pretrained={model},dtype=float32",
            "--tasks",
            "lk_mc,lk_rolling,lk_gen",
            "--include_path",
            str(tasks),
            "--batch_size",
            "3",
            "--log_samples",
            "--output_path",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        samples[task] = sorted(
            (json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"]
        )
    return samples


def run_hf(model: Path, tasks: Path, env: dict, **kwargs) -> dict[str, list[dict]]:
    os.environ.update(
        {k: env[k] for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")}
    )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model},dtype=float32",
        tasks=["lk_mc", "lk_rolling", "lk_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=3,
        log_samples=True,
        device="cpu",
        **kwargs,
    )
    return {
        task: sorted(rows, key=lambda s: s["doc_id"]) for task, rows in results["samples"].items()
    }


def numbers(sample: dict) -> list[float]:
    """Every loglikelihood of a sample (lm-eval logs them as numbers or as strings)."""
    values = []
    for resp in sample["resps"]:
        first = resp[0]
        values.append(float(first[0] if isinstance(first, (list, tuple)) else first))
    return values


def compare(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs) == {"lk_mc", "lk_rolling", "lk_gen"}
    for task in ("lk_mc", "lk_rolling"):
        assert len(ours[task]) == len(theirs[task])
        for a, b in zip(ours[task], theirs[task]):
            # 1e-4, or float32 rounding of a long sum: a rolling loglikelihood adds hundreds of
            # per-token log-probs (-4,614.78 here), and on AVX-512 CPUs llamakin's float32 products
            # of 8+ rows are oneDNN's, summed in another order than transformers' MKL (measured
            # 1.8e-4 there, 4e-8 relative; 0.0 on AVX2, where both run MKL)
            assert numbers(a) == pytest.approx(numbers(b), abs=1e-4, rel=1e-7), task
            assert len(numbers(a)) >= 1
    generated = [[s["resps"][0][0] for s in run["lk_gen"]] for run in (ours, theirs)]
    assert generated[0] == generated[1]
    assert any(text.strip() for text in generated[0])  # the model did generate something


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    return tiny_llama_dir(root, bos=True), write_tasks(root), offline_env(root), root


@pytest.mark.slow
def test_loglikelihoods_and_generations_equal_the_hf_backend(setup):
    model, tasks, env, root = setup
    compare(run_llamakin(model, tasks, root / "out", env), run_hf(model, tasks, env))


@pytest.mark.slow
def test_chat_template_runs_equal_the_hf_backend(setup):
    model, tasks, env, root = setup
    ours = run_llamakin(model, tasks, root / "out-chat", env, "--apply_chat_template")
    assert (
        "<|im_start|>" in ours["lk_gen"][0]["arguments"][0][0]
        if isinstance(ours["lk_gen"][0]["arguments"], list)
        else "<|im_start|>" in json.dumps(ours["lk_gen"][0]["arguments"])
    )
    compare(ours, run_hf(model, tasks, env, apply_chat_template=True))


def test_bad_model_args_are_one_sentence(setup, tmp_path):
    model, tasks, env, _ = setup
    from llamakin.errors import LlamakinError
    from llamakin.harness import LlamakinLM

    with pytest.raises(LlamakinError, match="unknown --model_args for llamakin: colour"):
        LlamakinLM.create_from_arg_string(f"pretrained={model},colour=red")
    with pytest.raises(LlamakinError, match="unknown dtype 'int3'"):
        LlamakinLM.create_from_arg_string(f"pretrained={model},dtype=int3")
    with pytest.raises(LlamakinError, match="int3"):
        LlamakinLM.create_from_arg_string(f"pretrained={model},quantize=int3")


def test_quantize_model_arg_runs_quantized_layers(setup):
    """``quantize=int8`` loads int8 weight-only projections; the scores stay close to the float ones."""
    from llamakin.harness import LlamakinLM
    from llamakin.quant.linear import Int8Linear

    model, *_ = setup
    request = [("Shall I compare thee to a", " summer's day?")]
    plain = LlamakinLM.create_from_arg_string(f"pretrained={model}")
    quantized = LlamakinLM.create_from_arg_string(f"pretrained={model},quantize=int8,group_size=32")
    assert not any(isinstance(m, Int8Linear) for m in plain.model.modules())
    assert any(isinstance(m, Int8Linear) for m in quantized.model.modules())

    class Request:
        def __init__(self, args):
            self.args = args

    ((ours, _),) = quantized.loglikelihood([Request(r) for r in request])
    ((reference, _),) = plain.loglikelihood([Request(r) for r in request])
    # a tiny random model: 0.8% here
    assert ours != reference and ours == pytest.approx(reference, rel=0.02)
