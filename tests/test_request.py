"""Rendering requests and keying them by content."""

from __future__ import annotations

import pytest

from flow.config import CallConfig
from flow.errors import ConfigError, TemplateError
from flow.request import HASH_PREFIX, RequestBuilder, canonical_json, content_key


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


def test_content_key_ignores_key_order_and_changes_with_content() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    b = {"temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert content_key(a) == content_key(b)
    assert content_key(a).startswith(HASH_PREFIX)
    assert content_key(a) != content_key({**a, "temperature": 1})
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
