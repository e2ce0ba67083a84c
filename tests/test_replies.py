"""The simulator's reply has the shape the request asks for and fits within its token cap."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from flow.simulator.replies import compose_reply, draft_replies
from flow.tokens import count_text_tokens

MODEL = "gpt-4o-mini"
CLASSIFY = "Classify the sentiment of the review as positive, negative or neutral."
TRIVIA = ('You answer trivia questions. Reply with a JSON object with the keys "answer" (one '
          'short sentence) and "confidence" (low, medium or high).')


class Label(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float = Field(ge=0, le=1)


def request(system: str, user: str, **params: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": user}], **params}


def reply(body: dict[str, Any]) -> tuple[str, int, str]:
    return compose_reply(body, body["messages"], MODEL)


def schema_format(model: type[BaseModel]) -> dict[str, Any]:
    return {"type": "json_schema",
            "json_schema": {"name": model.__name__, "schema": model.model_json_schema()}}


@pytest.mark.parametrize("params", [{}, {"response_format": {"type": "json_object"}},
                                    {"response_format": schema_format(Label)}])
def test_the_reply_is_the_fullest_draft_within_the_cap(params: dict[str, Any]) -> None:
    body = request("Answer briefly.", "What is the capital of Australia?", **params)
    drafts = draft_replies(body, body["messages"])
    sizes = count_text_tokens(drafts, MODEL)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    for cap in range(1, sizes[0] + 2):
        text, tokens, finish = reply({**body, "max_tokens": cap})
        if cap >= sizes[-1]:
            fits = [d for d, size in zip(drafts, sizes) if size <= cap]
            assert (text, finish) == (fits[0], "stop")
            assert tokens == count_text_tokens([text], MODEL)[0] <= cap
        else:
            assert finish == "length" and tokens == cap and drafts[-1].startswith(text)


def test_without_a_cap_the_reply_is_the_fullest_and_the_same_each_time() -> None:
    body = request("Answer briefly.", "hello")
    text, tokens, finish = reply(body)
    assert text.startswith("Simulated reply ") and text.endswith("You asked: hello")
    assert (text, tokens, finish) == reply(body) and finish == "stop"
    assert reply({**body, "max_completion_tokens": 5})[0] == reply({**body, "max_tokens": 5})[0]


def test_a_classification_prompt_gets_one_of_its_labels_within_a_one_word_cap() -> None:
    labels = set()
    for index in range(30):
        text, tokens, finish = reply(request(CLASSIFY, f"Review {index}: fine.", max_tokens=1))
        assert finish == "stop" and tokens == 1
        labels.add(text)
    assert labels == {"positive", "negative", "neutral"}


def test_json_names_the_keys_the_prompt_names_with_their_options() -> None:
    for index in range(10):
        body = request(TRIVIA, f"Question {index}?", max_tokens=20,
                       response_format={"type": "json_object"})
        text, _, finish = reply(body)
        value = json.loads(text)
        assert finish == "stop" and list(value) == ["answer", "confidence"]
        assert isinstance(value["answer"], str) and value["confidence"] in ("low", "medium",
                                                                             "high")


def test_a_one_word_json_label_fits_in_twenty_tokens() -> None:
    body = request(CLASSIFY + ' Reply as JSON {"label": ..., "confidence": ...}', "Loved it.",
                   max_tokens=20)
    text, _, finish = reply(body)
    value = json.loads(text)
    assert finish == "stop" and value["label"] in ("positive", "negative", "neutral")
    assert 0 <= value["confidence"] <= 1


def test_json_without_named_keys_gets_the_default_object() -> None:
    text, _, _ = reply(request("Answer briefly.", "x", response_format={"type": "json_object"}))
    assert json.loads(text)["echo"] == "x"
    text, _, _ = reply(request("Answer in JSON.", "x"))
    assert set(json.loads(text)) == {"answer", "echo", "id"}


@given(user=st.text(max_size=300), cap=st.integers(24, 200))
def test_a_json_schema_reply_conforms_whatever_the_prompt(user: str, cap: int) -> None:
    body = request(CLASSIFY, user, max_tokens=cap, response_format=schema_format(Label))
    text, tokens, finish = reply(body)
    assert finish == "stop" and tokens <= cap
    Label.model_validate_json(text)
