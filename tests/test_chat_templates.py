"""Chat templates rendered exactly like transformers' apply_chat_template, in a sandbox."""

from __future__ import annotations

import pytest

from llamakin import load_tokenizer
from llamakin.chat_template import TemplateError, render
from assets import qwen3_tokenizer_dir, smollm2_gguf

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? Answer with «six» in Chinese: 六"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "line one\nline two\n\n  indented"},
    ],
]


@pytest.fixture(scope="module")
def cases():
    transformers = pytest.importorskip("transformers")
    return list(_cases(transformers))


def _cases(transformers):
    gguf = smollm2_gguf()
    yield (
        "smollm2",
        load_tokenizer(gguf),
        transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name),
        {},
    )
    qwen = qwen3_tokenizer_dir()
    reference = transformers.AutoTokenizer.from_pretrained(qwen)
    yield "qwen3", load_tokenizer(qwen), reference, {}
    yield "qwen3-no-thinking", load_tokenizer(qwen), reference, {"enable_thinking": False}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_match_transformers(cases, conversation, add_generation_prompt):
    for name, ours, reference, extra in cases:
        expected = reference.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
        got = ours.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, **extra
        )
        assert got == expected, name


def test_template_sees_bos_eos_and_raise_exception():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('Unknown role ' + m.role) }}{% endif %}{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    out = render(template, [{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")
    assert out == "<s>hi</s>>"
    with pytest.raises(TemplateError, match="refused this conversation: Unknown role tool"):
        render(template, [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    "evil",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = messages.append({'role': 'x'}) %}{{ x }}",
    ],
)
def test_templates_run_in_a_sandbox(evil):
    with pytest.raises(TemplateError):
        render(evil, [{"role": "user", "content": "hi"}])


def test_bad_messages_and_broken_templates():
    with pytest.raises(TemplateError, match="non-empty list"):
        render("{{ messages }}", [])
    with pytest.raises(TemplateError, match="string 'role'"):
        render("{{ messages }}", [{"content": "x"}])
    with pytest.raises(TemplateError, match="syntax error on line 1"):
        render("{% for %}", [{"role": "user", "content": "x"}])


def test_tojson_keeps_unicode():
    assert (
        render("{{ messages[0].content | tojson }}", [{"role": "user", "content": "六 é"}])
        == '"六 é"'
    )
