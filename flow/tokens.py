"""Token counts before a request is sent, with the model's own tokenizer, offline.

`toktok` ships OpenAI's BPE vocabularies compiled in (ids identical to tiktoken's), so
counting needs no download. The limiter reserves `prompt + expected completion` tokens for
each request and corrects the reservation when the response's `usage` arrives.

A vocabulary costs 40-65 MB resident and tens of µs a request, and every real server names a
token limit, mostly far above what a run sends: `PromptTokens` counts exactly only while the
token budget binds, and otherwise estimates from characters at the ratio replies report.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import toktok

# Chat formatting adds a few tokens per message and per reply (OpenAI's cookbook counts 3 and 3).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
DEFAULT_EXPECTED_OUTPUT_TOKENS = 256
CHARS_PER_TOKEN = 4.0  # before any reply: English in OpenAI's encodings runs about 4
RATIO_MIN_CHARS = 2_000  # characters of replied prompts before their ratio is trusted
RATIO_SPAN_CHARS = 1_000_000  # the ratio follows about the last this many characters
LEGACY_PREFIXES = ("gpt-3.5", "gpt-4-", "gpt-4", "text-embedding-3", "text-embedding-ada")
MODERN_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")


def encoding_for_model(model: str) -> str:
    """The BPE encoding a model uses: o200k_base for GPT-4o and later, cl100k_base before."""
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith(MODERN_PREFIXES):
        return "o200k_base"
    if name.startswith(LEGACY_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def count_text_tokens(texts: list[str], model: str) -> list[int]:
    """Token counts of several texts in the model's encoding."""
    return list(toktok.batch_count(texts, encoding_for_model(model), threads=1))


def count_prompt_tokens(messages: list[dict[str, Any]], model: str) -> int:
    """Prompt tokens of a chat request, as the API will count them (within a few tokens)."""
    texts = [str(message.get("content") or "") for message in messages]
    content = sum(count_text_tokens(texts, model))
    return content + TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_REPLY


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of a chat request's message contents: what an estimate scales."""
    return sum(len(str(message.get("content") or "")) for message in messages)


class PromptTokens:
    """Prompt tokens of requests before they are sent: exact (the model's tokenizer) when
    asked, else the characters at the tokens per character that replies' `usage` shows."""

    def __init__(self) -> None:
        self._chars = 0.0
        self._tokens = 0.0

    def count(self, messages: list[dict[str, Any]], model: str, exact: bool) -> tuple[int, int]:
        """The request's prompt tokens, and its characters (for `note`)."""
        chars = prompt_chars(messages)
        if exact:
            return count_prompt_tokens(messages, model), chars
        per_char = (self._tokens / self._chars if self._chars >= RATIO_MIN_CHARS
                    else 1 / CHARS_PER_TOKEN)
        overhead = TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_REPLY
        return int(chars * per_char + 0.5) + overhead, chars

    def note(self, chars: int, messages: int, prompt_tokens: int) -> None:
        """A reply's `usage.prompt_tokens` for a prompt of `chars` in `messages` messages."""
        tokens = prompt_tokens - TOKENS_PER_MESSAGE * messages - TOKENS_PER_REPLY
        if chars <= 0 or tokens <= 0:
            return
        self._chars += chars
        self._tokens += tokens
        if self._chars > RATIO_SPAN_CHARS:  # older replies count for less and less
            self._chars /= 2
            self._tokens /= 2


def expected_output_tokens(params: dict[str, Any], configured: int | None) -> int:
    """Completion tokens to reserve: the configured guess, else the request's own cap."""
    if configured is not None:
        return configured
    for key in ("max_completion_tokens", "max_tokens"):
        value = params.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_EXPECTED_OUTPUT_TOKENS


class OutputReserve:
    """Completion tokens the limiter reserves for each request, corrected from `usage`: the
    configured expectation as it is; otherwise the request's cap (`max_tokens`) until replies
    arrive, then the 90th percentile of what the last `WINDOW` replies used (never above the
    cap), so an estimate far above what replies use does not leave the token limit part
    unused; the few replies above it are charged when their `usage` arrives."""

    WINDOW = 50

    def __init__(self, params: dict[str, Any], configured: int | None) -> None:
        self.cap = expected_output_tokens(params, configured)
        self._fixed = configured is not None
        self._seen: deque[int] = deque(maxlen=self.WINDOW)
        self._tokens: int | None = None  # worked out again after each reply, when asked

    def tokens(self) -> int:
        if self._fixed or len(self._seen) < self.WINDOW // 5:
            return self.cap
        if self._tokens is None:
            self._tokens = min(self.cap, sorted(self._seen)[len(self._seen) * 9 // 10])
        return self._tokens

    def note(self, completion_tokens: int) -> None:
        """A reply's `usage.completion_tokens`."""
        self._seen.append(max(0, completion_tokens))
        self._tokens = None
