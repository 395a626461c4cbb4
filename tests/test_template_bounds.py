"""Chat templates are untrusted code: rendering is bounded in time and size, and every failure is
one sentence naming the template (issue 12, item 8). The sandbox's escapes are tested in
test_chat_templates.py; here the template is hostile to the machine instead."""

from __future__ import annotations

import resource
import signal

import pytest

from llamakin.chat_template import MAX_OUTPUT_CHARS, TemplateError, render

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
NAME = "the chat template of hostile/tokenizer_config.json"


def _late(*_):
    raise AssertionError("the template was not stopped within 60 s")


def refused(template, fragment):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, _late)
    signal.alarm(60)  # a liveness guard: without the bounds these run for hours
    try:
        with pytest.raises(TemplateError) as info:
            render(template, MESSAGES, name=NAME)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    message = str(info.value)
    fragments = (fragment,) if isinstance(fragment, str) else fragment  # any one of several bounds
    assert message.startswith(NAME) and any(f in message for f in fragments), message
    assert "\n" not in message
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1024, f"rendering grew the peak RSS by {grown_mb:.0f} MB"
    return message


@pytest.mark.parametrize(
    "template,fragment",
    [
        # time: loops that output nothing, or something, for 10^10 iterations
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "ran longer than 2 s",
        ),
        (
            # whichever bound comes first: a fast CPU writes 8,388,608 x's in under 2 s
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            ("ran longer than 2 s", f"output passed {MAX_OUTPUT_CHARS:,} characters"),
        ),
        (
            "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
            "recursed too deeply",
        ),
        # size: one expression or a doubling loop aiming at gigabytes
        ("{{ 'x' * 10**10 }}", "multiplied a str of 1 items"),
        ("{{ (['x' * 100000] * 100000)|join }}", "multiplied a list of 100,000 items by 100,000"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            f"built a str of more than {MAX_OUTPUT_CHARS:,} items",
        ),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
            f"built a str of more than {MAX_OUTPUT_CHARS:,} items",
        ),
        (
            "{% for i in range(1000) %}{{ 'y' * 100000 }}{% endfor %}",
            f"output passed {MAX_OUTPUT_CHARS:,} characters",
        ),
        ("{{ 'x'|center(10**9) }}", "passed the number 1000000000 to a function"),
        ("{{ 'x'.ljust(10**9) }}", "passed the number 1000000000"),
        ("{{ '{:>999999999}'.format(1) }}", "formatted with a width of a million or more"),
        ("{{ '%999999999s' % 'x' }}", "formatted with a width of a million or more"),
        ("{{ '%999999999s'|format('x') }}", "formatted with a width of a million or more"),
        ("{{ 2 ** 100000000 }}", "raised 2 to the power 100000000"),
        # errors Python raises
        ("{% for i in range(10**9) %}{% endfor %}", "passed the number 1000000000"),
        ("{{ range(-50000, 50001)|list|length }}", "asked for a number too large (Range too big"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
        ("{% for %}", "has a syntax error on line 1"),
    ],
)
def test_hostile_templates_are_stopped_with_one_sentence(template, fragment):
    refused(template, fragment)


@pytest.mark.parametrize("template", [123, None, ["{{ x }}"], {"default": "x"}])
def test_a_template_that_is_not_text(template):
    refused(template, f"is a {type(template).__name__}, not Jinja text")


def test_an_oversized_template_source():
    refused("x" * (2 << 20), "characters, more than the 1,048,576 llamakin accepts")


def test_loops_keep_their_semantics_under_the_guards():
    template = (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ m.role }}"
        "{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}{{ loop.revindex }} {% endfor %}"
        "{% for m in messages|reverse %}{{ m.content ~ '!' }}{% else %}none{% endfor %}"
        "{% for x in [] %}y{% else %}empty{% endfor %}"
    )
    assert render(template, MESSAGES) == "1/2:userF2 2/2:assistantL1 hello!hi!empty"


def test_tokenizer_names_its_template(tmp_path):
    from llamakin.tokenizer import Tokenizer

    class Backend:
        def token_to_id(self, token):
            return None

    tok = Tokenizer(Backend(), chat_template="{{ 1 / 0 }}", source="some/model")
    with pytest.raises(
        TemplateError,
        match=r"^the chat template of some/model failed to render \(ZeroDivisionError",
    ):
        tok.apply_chat_template(MESSAGES)
