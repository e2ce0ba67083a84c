"""The simulator reads from a prompt the JSON keys it names and the options it lists."""

from __future__ import annotations

import pytest

from flow.simulator.prompts import KeyHint, listed_options, read_prompt


@pytest.mark.parametrize("text, options", [
    ("Classify the review as positive, negative or neutral.", ("positive", "negative", "neutral")),
    ("The label is one of: spam, ham, unsure.", ("spam", "ham", "unsure")),
    ("Answer with one of the following labels: red, green, blue", ("red", "green", "blue")),
    ('Say "very good" or "bad".', ("very good", "bad")),
    ("Reply yes|no|maybe", ("yes", "no", "maybe")),
    ("It is either spam or ham.", ("spam", "ham")),
    ("Answer yes or no.", ("yes", "no")),
])
def test_options_are_read_from_the_common_ways_of_listing_them(
        text: str, options: tuple[str, ...]) -> None:
    assert listed_options(text) == options


@pytest.mark.parametrize("text", [
    "Answer in one short sentence.", "What is 3 plus 3?", "Answer in one or two sentences.",
    "Summarise input/output pairs.", "",
])
def test_prose_without_a_list_of_options_lists_none(text: str) -> None:
    assert listed_options(text) == ()


def test_options_beside_a_key_may_be_two_words_or_slashed() -> None:
    assert listed_options("yes/no", beside_a_key=True) == ("yes", "no")
    assert listed_options("spam or ham", beside_a_key=True) == ("spam", "ham")


def test_keys_of_a_json_template_with_what_their_values_look_like() -> None:
    shape = read_prompt('Classify as positive, negative or neutral. Reply as JSON {"label": '
                        '..., "score": 0.5, "count": 3, "tags": [...], "spam": "true/false", '
                        '"tone": "calm|angry", "stars": "1 to 5"}')
    assert shape.keys == (KeyHint("label"), KeyHint("score", "number"),
                          KeyHint("count", "integer"), KeyHint("tags", "list"),
                          KeyHint("spam", "boolean"), KeyHint("tone", options=("calm", "angry")),
                          KeyHint("stars", "integer", low=1, high=5))
    assert shape.options == ("positive", "negative", "neutral")


def test_keys_named_in_a_phrase_keep_their_own_options_apart_from_the_answers() -> None:
    shape = read_prompt('Reply with a JSON object with the keys "answer" (one short sentence) '
                        'and "confidence" (low, medium or high).')
    assert shape.keys == (KeyHint("answer"), KeyHint("confidence", options=("low", "medium",
                                                                               "high")))
    assert shape.options == ()
    assert [k.name for k in read_prompt("Reply as JSON with keys label and score.").keys] == [
        "label", "score"]
    assert [k.name for k in read_prompt("JSON with fields: title, year, author").keys] == [
        "title", "year", "author"]
    assert read_prompt("with keys label and score").keys[1].kind == "number"


@pytest.mark.parametrize("text", ["The key point: be brief.", "Press any key to go on.",
                                  "Answer briefly.", "Use {braces} freely."])
def test_prose_that_mentions_keys_or_braces_names_no_keys(text: str) -> None:
    assert read_prompt(text).keys == ()
