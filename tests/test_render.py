"""Rendering requests and keying them by content."""

from __future__ import annotations

import pytest

from flow.config import CallConfig
from flow.errors import ConfigError, TemplateError
from flow.keys import HASH_PREFIX, canonical_json, content_key, key_of_json
from flow.render import RequestBuilder


def call(**overrides: object) -> CallConfig:
    return CallConfig.model_validate({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "{{ question | upper }}"}],
        "params": {"temperature": 0}, **overrides})


def test_build_renders_templates_and_adds_params() -> None:
    request = RequestBuilder(call()).build({"question": "why?"}, "row 1")
    assert request == {"model": "gpt-4o-mini", "temperature": 0,
                       "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "WHY?"}]}


def test_missing_field_names_it_and_the_row() -> None:
    with pytest.raises(TemplateError, match="row 9: call.messages\\[1\\].content: missing "
                                            "template field 'question'"):
        RequestBuilder(call()).build({"q": "x"}, "row 9")


def test_sandbox_refuses_python_internals() -> None:
    builder = RequestBuilder(call(messages=[
        {"role": "user", "content": "{{ question.__class__.__mro__[1].__subclasses__() }}"}]))
    with pytest.raises(TemplateError):
        builder.build({"question": "x"}, "row 1")


def test_syntax_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid template"):
        RequestBuilder(call(messages=[{"role": "user", "content": "{{ oops"}]))


def test_a_message_past_the_limit_fails_while_it_renders_not_after() -> None:
    # 10^11 characters, or 2 TB in one step: measured only once made, they would take the
    # time (step_timeout_s) or the memory before the limit was looked at
    loops = RequestBuilder(call(messages=[{"role": "user", "content": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ question }}"
        "{% endfor %}{% endfor %}")}]))
    with pytest.raises(TemplateError, match="renders to more than 4000000 characters"):
        loops.build({"question": "0123456789"}, "row 1")
    for template, refusal in (("{{ question * 1000000000000 }}", "a repetition too large"),
                              ("{{ [question] * 1000000000000 }}", "a repetition too large"),
                              ("{{ 2 ** 100000000 }}", "exponent 100000000 is too large")):
        builder = RequestBuilder(call(messages=[{"role": "user", "content": template}]))
        with pytest.raises(TemplateError, match=refusal):
            builder.build({"question": "ab"}, "row 1")


def test_content_key_ignores_key_order_and_changes_with_content() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    b = {"temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert content_key(a) == content_key(b)
    assert content_key(a).startswith(HASH_PREFIX)
    assert content_key(a) != content_key({**a, "temperature": 1})
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'


@pytest.mark.parametrize("template", [
    "{{ question }}", "Q: {{question}} / {{ n }}!", "{{ n }}{{ n }}", "plain {{ flag }} end",
    "{{ missing_in_some }}", "{{ nested }}", "{{ none }}", "{{ True }}", "{{ range }}"])
def test_simple_placeholders_render_exactly_as_jinja(template: str) -> None:
    fields = {"question": "why?", "n": 3, "flag": True, "nested": {"a": [1, 2]}, "none": 5,
              "range": "r"}
    fast = RequestBuilder(call(messages=[{"role": "user", "content": template}]))
    slow = RequestBuilder(call(messages=[{"role": "user", "content": template + "{% if 0 %}{% endif %}"}]))
    for row in (fields, {"question": "x"}):
        try:
            expected = slow.build(row, "row 1")
        except TemplateError as e:
            with pytest.raises(TemplateError, match="missing template field"):
                fast.build(row, "row 1")
            assert "missing template field" in str(e)
            continue
        assert fast.build(row, "row 1") == expected


@pytest.mark.parametrize("params", [{}, {"temperature": 0, "max_tokens": 9},
                                    {"response_format": {"type": "json_object", "b": [1, {"z": 1, "a": 2}]},
                                     "top_logprobs": None, "stop": ["\n", "é"]}])
def test_fast_canonical_json_equals_canonical_json(params: dict[str, object]) -> None:
    builder = RequestBuilder(call(params=params, messages=[
        {"role": "system", "content": "Be brief. \"quoted\" ✓"},
        {"role": "user", "content": "{{ question }}"},
        {"role": "assistant", "content": "{% if n %}n={{ n }}{% endif %}"}]))
    for fields in ({"question": "why?", "n": 2}, {"question": "\u2028 \x00 é 🧠 \\", "n": 0},
                   {"question": {"nested": True}, "n": None}):
        request, text = builder.build_with_json(fields, "row 1")
        assert text == canonical_json(request)
        assert content_key(request) == key_of_json(text)
