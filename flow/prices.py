"""What tokens cost: a table of list prices per model, overridable with `call.price`."""

from __future__ import annotations

from dataclasses import dataclass

from flow.config import PriceConfig
from flow.records import CallResult, ResponseRecord, Usage

PRICES_TAKEN_ON = "2026-11-01"


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million tokens."""

    input_per_1m: float
    output_per_1m: float
    cached_input_per_1m: float | None = None


# OpenAI's standard (non-batch) list prices, longest prefix first wins.
PRICES: dict[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "gpt-4o": Price(2.50, 10.00, 1.25),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1": Price(2.00, 8.00, 0.50),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-5-mini": Price(0.25, 2.00, 0.025),
    "gpt-5": Price(1.25, 10.00, 0.125),
    "o4-mini": Price(1.10, 4.40, 0.275),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "o3": Price(2.00, 8.00, 0.50),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    # embeddings: input tokens only
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
}


def price_for(model: str, override: PriceConfig | None) -> Price | None:
    """The price configured in the pipeline, else the table's entry for the model, else None."""
    if override is not None:
        return Price(override.input_per_1m, override.output_per_1m, override.cached_input_per_1m)
    name = model.rsplit("/", 1)[-1].lower()
    for prefix in sorted(PRICES, key=len, reverse=True):
        if name.startswith(prefix):
            return PRICES[prefix]
    return None


def cost_usd(price: Price | None, prompt_tokens: int, completion_tokens: int,
             cached_tokens: int = 0) -> float | None:
    """Dollars for one call's usage; None when the model's price is unknown."""
    if price is None:
        return None
    cached = min(cached_tokens, prompt_tokens)
    cached_rate = price.cached_input_per_1m if price.cached_input_per_1m is not None \
        else price.input_per_1m
    total = ((prompt_tokens - cached) * price.input_per_1m + cached * cached_rate
             + completion_tokens * price.output_per_1m)
    return total / 1_000_000


def priced_reply(result: CallResult, origin: str, price: Price | None) -> ResponseRecord | None:
    """The paid reply of a call's result as the store keeps it, with what it cost."""
    if result.body is None:
        return None
    usage = result.usage or Usage()
    call = result.call
    return ResponseRecord(call.key, origin, call.request["model"], call.request_json,
                          result.body, usage,
                          cost_usd(price, usage.prompt_tokens, usage.completion_tokens,
                                   usage.cached_tokens) if result.usage else None,
                          len(result.attempts), result.latency_ms, result.started_at,
                          result.finished_at, batch_id=result.batch_id,
                          vector=result.vector)


def batch_price(price: Price | None) -> Price | None:
    """The Batch API's price: half the online list price, input, cached and output alike."""
    if price is None:
        return None
    cached = None if price.cached_input_per_1m is None else price.cached_input_per_1m / 2
    return Price(price.input_per_1m / 2, price.output_per_1m / 2, cached)


def estimate_call_usd(price: Price | None, request_json: str, output_tokens: int) -> float:
    """A cheap upper guess of a call's cost before it is sent: about 4 characters of request
    a token, and the output tokens its cap allows (no tokenizer needed)."""
    return cost_usd(price, len(request_json) // 4, output_tokens) or 0.0
