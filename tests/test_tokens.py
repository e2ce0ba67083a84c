"""Token counting and prices."""

from __future__ import annotations

from flow.config import PriceConfig
from flow.prices import cost_usd, price_for
from flow.tokens import (
    PromptTokens,
    count_prompt_tokens,
    encoding_for_model,
    expected_output_tokens,
)


def test_models_map_to_their_encodings() -> None:
    assert encoding_for_model("gpt-4o-mini") == "o200k_base"
    assert encoding_for_model("openai/gpt-5") == "o200k_base"
    assert encoding_for_model("gpt-4-turbo") == "cl100k_base"
    assert encoding_for_model("gpt-3.5-turbo") == "cl100k_base"


def test_prompt_tokens_match_the_real_tokenizer() -> None:
    messages = [{"role": "user", "content": "hello world"}]
    assert count_prompt_tokens(messages, "gpt-4o-mini") == 2 + 3 + 3


def test_expected_output_prefers_configuration_then_the_request_cap() -> None:
    assert expected_output_tokens({"max_tokens": 50}, None) == 50
    assert expected_output_tokens({"max_completion_tokens": 70}, None) == 70
    assert expected_output_tokens({"max_tokens": 50}, 20) == 20
    assert expected_output_tokens({}, None) > 0


def test_prices_use_the_table_or_the_override() -> None:
    price = price_for("gpt-4o-mini-2024-07-18", None)
    assert price is not None and price.input_per_1m == 0.15
    assert cost_usd(price, 1_000_000, 1_000_000) == 0.75
    assert cost_usd(price, 1_000_000, 0, cached_tokens=1_000_000) == 0.075
    override = price_for("anything", PriceConfig(input_per_1m=1, output_per_1m=2))
    assert cost_usd(override, 500_000, 500_000) == 1.5
    assert price_for("my-local-llama", None) is None
    assert cost_usd(None, 10, 10) is None


def test_prompt_estimates_follow_what_replies_report() -> None:
    prompts = PromptTokens()
    messages = [{"role": "user", "content": "x" * 400}]
    estimate, chars = prompts.count(messages, "gpt-4o-mini", exact=False)
    assert chars == 400
    assert estimate == 100 + 3 + 3  # four characters a token before any reply
    for _ in range(10):  # the replies say: two characters a token
        prompts.note(chars, 1, 200 + 3 + 3)
    assert prompts.count(messages, "gpt-4o-mini", exact=False)[0] == 200 + 3 + 3


def test_prompt_counts_are_exact_when_asked() -> None:
    prompts = PromptTokens()
    messages = [{"role": "user", "content": "hello world"}]
    assert prompts.count(messages, "gpt-4o-mini", exact=True) == (2 + 3 + 3, 11)
